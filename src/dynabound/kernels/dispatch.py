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

from ..state_formats import needs_encoding

__all__ = ["fused_step", "run_kernels"]


def fused_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **kwargs):
    """Run the kernels for tensors that own their storage, one launch group per device."""
    amsbound = kwargs["amsbound"]
    device = params[0].device
    if all(p.device == device for p in params):
        run_kernels(
            device, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
            **kwargs,
        )  # fmt: skip
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
        run_kernels(device, *lists, vmax, steps, **options)


def run_kernels(device: torch.device | str, params, *tensors, **kwargs) -> None:
    """Step tensors of one device with that device's kernels (tests name ``"cuda"`` for CPU
    tensors, to run the Triton kernels in Triton's interpreter)."""
    encoded = needs_encoding(kwargs.get("state_dtype"), kwargs.get("stochastic_rounding"), params)
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
    run(params, *tensors, **kwargs)
