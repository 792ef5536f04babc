"""Which kernel runs a fused step: one launch group per device, and for each device the
float kernel or the encoded one (low-precision moments, stochastically rounded bfloat16
parameters), chosen here for both devices:

* CPU: ``cpu.float_step`` or ``cpu.encoded_step`` (one compiled library);
* CUDA: ``triton_kernel.float_step`` or ``triton_encoded.encoded_step``.

The backends are imported on first use: the CPU kernel is compiled then, Triton is
imported on the first CUDA step.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..spec import StepSpec, StepTensors

__all__ = ["PROJECTING", "fused_step", "run_kernels"]

# Device types whose kernels (float and encoded) add the projection sums of
# final_lr="auto" (StepTensors.projection); another refuses a step that asks for them
# rather than leave them at zero.
PROJECTING = {"cpu", "cuda"}


def fused_step(tensors: StepTensors, spec: StepSpec) -> None:
    """Run the kernels for tensors that own their storage, one launch group per device."""
    params = tensors.params
    device = params[0].device
    if all(p.device == device for p in params):
        run_kernels(device, tensors, spec)
        return
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        by_device[p.device].append(i)
    for device, indices in by_device.items():
        # Each tensor keeps its seed: by default its place in the whole list, as in the
        # reference.
        run_kernels(device, tensors.take(indices), spec)


def run_kernels(device: torch.device | str, tensors: StepTensors, spec: StepSpec) -> None:
    """Step tensors of one device with that device's kernels (tests name ``"cuda"`` for CPU
    tensors, to run the Triton kernels in Triton's interpreter)."""
    encoded = spec.encodes(tensors.params)
    device_type = getattr(device, "type", device)
    if device_type == "cpu":
        from . import cpu

        run = cpu.encoded_step if encoded else cpu.float_step
    elif device_type == "cuda":
        if encoded:
            from .triton_encoded import encoded_step as run
        else:
            from .triton_kernel import float_step as run
    else:
        raise RuntimeError(f"fused AdaBound supports CPU and CUDA tensors, got one on {device}")
    if tensors.projection is not None and device_type not in PROJECTING:
        raise RuntimeError(
            f"the fused {device_type.upper()} kernel cannot compute the projection that "
            "final_lr='auto' estimates from; use foreach=True (or fused=False) for this group"
        )
    run(tensors, spec)
