"""Host cost of one fused CUDA step, measured on any machine: the launch is stubbed.

    python benchmarks/host_cost.py            # -> benchmarks/results_host_cost.json

An eager GPU step is bound by the host when the kernel is fast: what the Python side does
per step (validation, tables, scalar math) and how many device operations it enqueues.
This script runs dynabound's CUDA code path (``dynabound.kernels.triton_kernel``, and
``triton_encoded`` for bf16 and 8-bit state) on CPU tensors with the Triton kernels replaced
by recorders, so it needs no GPU. It reports,
for parameter lists of growing length:

* microseconds per ``optimizer.step()`` (median of interleaved repeats), whole step and per
  tensor, for gradients kept between steps and for gradients re-allocated every step (as by
  ``zero_grad(set_to_none=True)``);
* device operations per step: kernel launches plus every torch op the step dispatches (each
  would be at least one launch or copy on a GPU).

What it cannot show: Triton's own launch overhead and the GPU time, which need a GPU
(``benchmarks/step_time.py --device cuda``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dynabound
from dynabound.kernels import dispatch, triton_common, triton_encoded, triton_kernel

sys.path.insert(0, str(Path(__file__).parent))
from step_time import resnet34_cifar_shapes  # noqa: E402


class LaunchRecorder:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` records the launch."""

    def __init__(self) -> None:
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1

        return launch


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace != "profiler":  # optimizer.step()'s annotations, not device work
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def route_cpu_steps_through_cuda_path() -> list[LaunchRecorder]:
    """CPU tensors take the CUDA code path, with recorders instead of kernels; torch's
    fused Adam keeps its Python side and loses its kernel the same way, as a yardstick."""
    recorders = [LaunchRecorder(), LaunchRecorder(), LaunchRecorder(), LaunchRecorder()]
    triton_kernel._adabound_kernel, triton_common.advance_steps = recorders[:2]
    triton_encoded._encoded_kernel = recorders[3]
    run_kernels = dispatch.run_kernels
    dispatch.run_kernels = lambda device, *args, **kwargs: run_kernels("cuda", *args, **kwargs)
    adam_kernel = recorders[2][None]
    torch._fused_adam_ = torch._fused_adamw_ = lambda *args, **kwargs: adam_kernel()
    return recorders


def shape_lists() -> dict[str, list[tuple[int, ...]]]:
    resnet = resnet34_cifar_shapes()
    return {
        "10 tensors": [(64, 64)] * 10,
        "ResNet-34 (110 tensors)": resnet,
        "1000 tensors": [(64, 64)] * 1000,
    }


def build(shapes, options) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for p in params:
        p.grad = torch.ones_like(p)
    if options is None:
        return torch.optim.Adam(params, fused=True), params
    return dynabound.AdaBound(params, fused=True, **options), params


def time_step(opt, params, steps: int, fresh_grads: bool) -> float:
    # More gradient sets than the table cache holds: every step sees addresses it has not
    # cached (the worst case; the caching allocator usually hands back the same ones).
    sets = triton_common.CACHE_SIZE + 1 if fresh_grads else 0
    grads = [[torch.ones_like(p) for p in params] for _ in range(sets)]
    start = time.perf_counter()
    for i in range(steps):
        if grads:
            for p, g in zip(params, grads[i % sets], strict=True):
                p.grad = g
        opt.step()
    return (time.perf_counter() - start) / steps


def device_ops(opt, recorders) -> tuple[int, list[str]]:
    before = sum(r.launches for r in recorders)
    with OpCounter() as counter:
        opt.step()
    return sum(r.launches for r in recorders) - before + len(counter.ops), counter.ops


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--steps", type=int, default=200, help="steps per sample")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).with_name("results_host_cost.json")
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    recorders = route_cpu_steps_through_cuda_path()
    configs = {
        "torch Adam fused": None,
        "AdaBound": {},
        "AMSBound, weight decay": dict(amsbound=True, weight_decay=5e-4),
        "bound function": dict(bounds=lambda t: (0.1 - 0.1 / (t + 1), 0.1 + 0.1 / t)),
        "AdaBound, bf16 state": dict(state_dtype=torch.bfloat16),
        "AdaBound, 8-bit state": dict(state_dtype="8bit"),
    }
    report = {
        "command": " ".join(["host_cost.py", *(argv or sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "results": {},
    }
    print(f"{'parameters':24s} {'optimizer':24s} {'us/step':>8s} {'vs Adam':>7s} "
          f"{'us/tensor':>9s} {'us/step, new grads':>18s} {'device ops':>10s}")  # fmt: skip
    for set_name, shapes in shape_lists().items():
        for config_name, options in configs.items():
            opt, params = build(shapes, options)
            opt.step()  # state and launch plan
            kept, fresh = [], []
            for _ in range(args.repeat):
                kept.append(time_step(opt, params, args.steps, fresh_grads=False))
                fresh.append(time_step(opt, params, args.steps, fresh_grads=True))
            ops, names = device_ops(opt, recorders)
            if config_name == "torch Adam fused":
                adam_us = statistics.median(kept) * 1e6
            row = {
                "tensors": len(shapes),
                "ratio_to_torch_adam_fused": statistics.median(kept) * 1e6 / adam_us,
                "us_per_step": statistics.median(kept) * 1e6,
                "us_per_step_new_grads": statistics.median(fresh) * 1e6,
                "device_ops_per_step": ops,
                "torch_ops": sorted(set(names)),
            }
            report["results"][f"{set_name} / {config_name}"] = row
            print(
                f"{set_name:24s} {config_name:24s} {row['us_per_step']:8.1f} "
                f"{row['ratio_to_torch_adam_fused']:6.2f}x {row['us_per_step'] / len(shapes):9.2f} "
                f"{row['us_per_step_new_grads']:18.1f} "
                f"{ops:10d}"
            )
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
