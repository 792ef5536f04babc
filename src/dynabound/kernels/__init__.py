"""Fused AdaBound kernels: Triton on CUDA, a compiled C++ kernel on CPU.

Both backends implement only the element-wise update; the per-step scalars come from
:func:`dynabound.bounds.step_coefficients`. Nothing is compiled or imported at package
import: the CPU kernel is built on first use, Triton is imported on first CUDA use.

The package's imports run one way: ``layout`` (devices, memory layouts) at the bottom;
``cpu``, ``triton_common`` and the two Triton kernels above it (both Triton kernels import
``triton_common``, neither the other); ``dispatch``, which picks a device's kernel; ``ops``,
the custom op for torch.compile; this module on top.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..spec import StepSpec, StepTensors
from . import compat
from .dispatch import fused_step
from .layout import DEVICE_TYPES, dense_in_standard_order, local_shards

__all__ = ["DEVICE_TYPES", "can_fuse", "fused_adabound", "is_available", "unavailable_reason"]


def _device_type(device: str | torch.device | None) -> str:
    return torch.device(device if device is not None else "cpu").type


def is_available(device: str | torch.device | None = "cpu") -> bool:
    """Whether ``fused=True`` works for tensors on ``device``.

    On CPU this builds the kernel on the first call (a few seconds once; later processes
    load it from the torch extension cache). On CUDA it checks that Triton imports.
    """
    kind = _device_type(device)
    if kind == "cpu":
        from . import cpu

        return cpu.is_available()
    if kind == "cuda":
        from . import triton_common

        return triton_common.is_available()
    return False


_COMPLEX = (torch.complex64, torch.complex128)  # fused as views of their real pairs
_FUSABLE = {torch.float32, torch.float64, torch.bfloat16, torch.float16}


def can_fuse(params: list[Tensor]) -> bool:
    """Whether ``fused=True`` would run for these parameters: a kernel for every device,
    supported dtypes and dense layouts. Never raises; meant for picking a default, so it
    runs every step and is kept to one pass over the parameters."""
    devices = {p.device for p in params}
    allowed = {d: _fusable_dtypes(d.type) for d in devices}
    if not all(allowed.values()):
        return False
    if len(allowed) == 1:  # the usual case: no per-parameter device lookup
        (dtypes,) = allowed.values()
        return all(p.dtype in dtypes and dense_in_standard_order(p) for p in params)
    return all(p.dtype in allowed[p.device] and dense_in_standard_order(p) for p in params)


# Device type -> the dtypes its kernel takes, once the kernel is known to work: a dict
# lookup per step (and a constant for torch.compile), not a call into the kernel library.
_fusable_by_type: dict[str, frozenset[torch.dtype]] = {}


def _fusable_dtypes(device_type: str) -> frozenset[torch.dtype]:
    """The parameter dtypes the kernel for ``device_type`` takes; empty when none works."""
    known = _fusable_by_type.get(device_type)
    if known is not None:
        return known
    if device_type not in DEVICE_TYPES or not is_available(device_type):
        return frozenset()
    real = _FUSABLE
    if device_type == "cpu":
        from . import cpu

        real = cpu.supported_dtypes()
    dtypes = frozenset(real) | {c for c in _COMPLEX if c.to_real() in real}
    _fusable_by_type[device_type] = dtypes
    return dtypes


def unavailable_reason(device: str | torch.device | None = "cpu") -> str | None:
    """Why :func:`is_available` is False for ``device`` (None when it is True)."""
    if is_available(device):
        return None
    kind = _device_type(device)
    if kind == "cpu":
        from . import cpu

        return cpu.unavailable_reason()
    if kind == "cuda":
        from . import triton_common

        return triton_common.unavailable_reason()
    return f"no fused AdaBound kernel for device type {kind!r} (CPU and CUDA only)"


def fused_adabound(tensors: StepTensors, spec: StepSpec) -> None:
    """The fused step of :func:`dynabound.functional.adabound_step`. Increments the step
    counters and updates the tensors in place.

    Under torch.compile the step is one opaque custom op (``torch.ops.dynabound.fused_step_``),
    so a compiled step costs what an eager one does; a bound function, which an op cannot
    take, and low-precision state run the step eagerly between compiled graphs instead.
    """
    if not tensors.params:
        return
    tensors = local_shards(tensors)
    if not torch.compiler.is_compiling():
        fused_step(tensors, spec)
        return
    from . import ops  # registers the op; imported on the first traced step

    encoded = spec.state_dtype is not None or spec.stochastic_rounding
    projecting = tensors.projection is not None
    if callable(spec.bounds) or encoded or projecting or not compat.COMPILES_FUSED_OP:
        # Neither a function, 8-bit moments (pairs of tensors) nor final_lr="auto"'s
        # projection (an output read on the host right after the step) fit the op's schema.
        ops.fused_step_outside_graph(tensors, spec)
    else:
        ops.call_fused_op(tensors, spec)


_warned_unavailable: set[str] = set()


def default_kernel_ready(device_type: str) -> bool:
    """Whether the default (``fused=None``) may run the fused kernel for this device type
    (building the CPU kernel on the first call); warns once per device type when the
    kernel is unavailable, with the reason."""
    if device_type not in DEVICE_TYPES:
        return False
    if _fusable_dtypes(device_type):
        return True
    if device_type not in _warned_unavailable:
        _warned_unavailable.add(device_type)
        warnings.warn(
            f"dynabound: the fused {device_type.upper()} kernel is unavailable, so the default "
            f"step runs the slower foreach path: {unavailable_reason(device_type)}",
            RuntimeWarning,
            stacklevel=5,
        )
    return False
