"""Fused AdaBound kernels: Triton on CUDA, a compiled C++ kernel on CPU.

Both backends implement only the element-wise update; the per-step scalars come from
:func:`dynabound.bounds.step_coefficients`. Nothing is compiled or imported at package
import: the CPU kernel is built on first use, Triton is imported on first CUDA use.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import torch
from torch import Tensor

from . import compat

__all__ = ["DEVICE_TYPES", "can_fuse", "fused_adabound", "is_available", "unavailable_reason"]

DEVICE_TYPES = ("cpu", "cuda")  # the device types a fused kernel exists for


def dense_layout(t: Tensor) -> bool:
    """Whether ``t`` covers its memory densely (row-major or channels-last), so an
    element-wise kernel may walk it as a flat array."""
    if t.is_contiguous():
        return True
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.is_contiguous(memory_format=torch.channels_last_3d)
    return False


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
        from . import triton_kernel

        return triton_kernel.is_available()
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
        return all(p.dtype in dtypes and dense_layout(p) for p in params)
    return all(p.dtype in allowed[p.device] and dense_layout(p) for p in params)


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
        from . import triton_kernel

        return triton_kernel.unavailable_reason()
    return f"no fused AdaBound kernel for device type {kind!r} (CPU and CUDA only)"


def fused_adabound(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    **kwargs,
) -> None:
    """The fused step; same arguments as :func:`dynabound.functional.adabound` minus
    ``foreach``/``fused``/``differentiable``. Increments ``state_steps``, updates in place.

    Under torch.compile the step is one opaque custom op (``torch.ops.dynabound.fused_step_``),
    so a compiled step costs what an eager one does; a bound function, which an op cannot
    take, and low-precision state run the step eagerly between compiled graphs instead.
    """
    if not params:
        return
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs = _local_shards(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs
    )
    tensors = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
    if not torch.compiler.is_compiling():
        fused_step(*tensors, **kwargs)
        return
    from . import ops  # registers the op; imported on the first traced step

    encoded = kwargs.get("state_dtype") is not None or kwargs.get("stochastic_rounding")
    if callable(kwargs["bounds"]) or encoded or not compat.COMPILES_FUSED_OP:
        # Neither a function nor 8-bit moments (pairs of tensors) fit the op's schema.
        ops.fused_step_outside_graph(*tensors, **kwargs)
    else:
        ops.call_fused_op(*tensors, **kwargs)


def fused_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **kwargs):
    """Run the kernels for tensors that own their storage, one launch group per device."""
    amsbound = kwargs["amsbound"]
    device = params[0].device
    if all(p.device == device for p in params):
        _run_on(device, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, kwargs)
        return
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        by_device[p.device].append(i)
    seeds = kwargs.get("rounding_seeds")
    if seeds is None:
        seeds = list(range(len(params)))  # the default of the reference: the list position
    for device, indices in by_device.items():
        lists = [[t[i] for i in indices] for t in (params, grads, exp_avgs, exp_avg_sqs)]
        vmax = [max_exp_avg_sqs[i] for i in indices] if amsbound else []
        steps = [state_steps[i] for i in indices]
        options = {**kwargs, "rounding_seeds": [seeds[i] for i in indices]}
        _run_on(device, *lists, vmax, steps, options)


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


def _local_shards(*lists: list[Tensor]) -> tuple[list[Tensor], ...]:
    """DTensors (FSDP2, tensor parallel) own no storage: the update is element-wise, so it
    runs on each rank's local shard, as torch's fused Adam does."""
    dtensor = compat.dtensor_type()
    if dtensor is None or not any(isinstance(p, dtensor) for p in lists[0]):
        return lists
    return tuple([t.to_local() if isinstance(t, dtensor) else t for t in ts] for ts in lists)


def _run_on(device, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, kwargs):
    if device.type == "cpu":
        from .cpu import fused_adabound_cpu as run
    elif device.type == "cuda":
        from .triton_kernel import fused_adabound_triton as run
    else:
        raise RuntimeError(f"fused AdaBound supports CPU and CUDA tensors, got one on {device}")
    run(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **kwargs)
