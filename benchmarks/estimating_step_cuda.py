"""Cost of a final_lr="auto" estimating step of the fused CUDA path against an ordinary step:
on any machine with the launches stubbed, as in host_cost.py, or on a GPU.

    python benchmarks/estimating_step_cuda.py                # -> results_estimating_step_stub.json
    python benchmarks/estimating_step_cuda.py --device cuda  # -> results_estimating_step_cuda.json

While a group estimates its final_lr, each step's kernels also write their per-program
partial sums of the projection and take the moving estimate as an argument; torch sums the
partials into the step's readings (with its step counter), a non-blocking copy sends them
to pinned host memory behind a CUDA event, and the next step waits for that event (long
done, in training: a forward and backward pass ran in between) and updates the estimate.
This script times ``optimizer.step()`` of the same parameters with a fixed final_lr and
with ``final_lr="auto"`` (kept estimating for the whole run), interleaved, on dynabound's
CUDA code path run on CPU tensors with the Triton kernels replaced by recorders
(``host_cost.route_cpu_steps_through_cuda_path``), and counts what one step enqueues:
kernel launches, and the torch ops it dispatches.

The recorders write nothing, so the partial sums are filled before they are summed (a
fill and one random element per step, counted in the time but not in the ops): the
estimate then moves every step, as a real one does while it settles. Stubbed, the
readings take the GPU's way to the host (a copy into a buffer of their own) with a
stand-in for the event, the step counters live on the CPU (read there, where a GPU copies
them into the readings), and the fill and the sum of the partials run on the CPU, in
proportion to the number of programs (one per 8192 parameters, one per 256 with 8-bit
state), on freshly allocated host memory; on a GPU they are one launch each: the stubbed
times overstate the host's part. What it cannot show: the GPU time of the summing kernel
variant and of the small launches, which need a GPU: ``--device cuda`` times the real
steps there, on the ResNet-34 and GPT-2 124M shapes. Back to back, with no forward and
backward pass between them, each step there waits for the previous one's readings, so
those figures are an upper bound; ``train_step.py --device cuda`` times the estimating
step inside training iterations.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
from pathlib import Path

import torch

import dynabound
from dynabound import final_lr, functional
from dynabound.kernels import triton_common

sys.path.insert(0, str(Path(__file__).parent))
from host_cost import device_ops, route_cpu_steps_through_cuda_path, time_step  # noqa: E402
from step_time import gpt_shapes, resnet34_cifar_shapes, time_steps  # noqa: E402

STATES = {"float32 state": {}, "8-bit state": {"state_dtype": "8bit"}}


class StubCopied:
    """Stands for the CUDA event after the readings' copy to the host (stubbed: the copy
    has run when the step returns)."""

    def synchronize(self) -> None:
        pass


def send_to_host_as_from_a_gpu(readings: torch.Tensor) -> tuple[torch.Tensor, StubCopied]:
    """The stubbed steps' readings take the GPU's way to the host (a copy into a buffer of
    their own, and an event) and are read at the next step, as on a GPU."""
    host = torch.empty(readings.shape, dtype=readings.dtype)
    host.copy_(readings, non_blocking=True)
    return host, StubCopied()


class KeepEstimating:
    """No group settles or reaches its cap during the run, and (stubbed) the recorded
    kernels' partial sums hold numbers: every timed step is an estimating one whose
    estimate moves."""

    def __init__(self, stubbed: bool) -> None:
        final_lr.SETTLE_PATIENCE = 10**12
        self.filling = stubbed
        if stubbed:
            functional._send_to_host = send_to_host_as_from_a_gpu
            add_to = triton_common.Partials.add_to
            keeper = self

            def filled(partials, projection):
                if keeper.filling:
                    partials.values.fill_(1.0)
                    partials.values[0] = 1.0 + random.random()
                add_to(partials, projection)

            triton_common.Partials.add_to = filled


def build(shapes, options, device):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    return dynabound.AdaBound(params, fused=True, **options), params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("stub", "cuda"), default="stub")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--steps", type=int, default=200, help="steps per sample")
    parser.add_argument("--out", type=Path, help="default: results_estimating_step_DEVICE.json")
    args = parser.parse_args(argv)
    stubbed = args.device == "stub"
    if stubbed:
        torch.set_num_threads(1)
        recorders = route_cpu_steps_through_cuda_path()
        device = "cpu"
        shape_lists = {"10 tensors, 41K parameters": [(64, 64)] * 10}
    else:
        recorders = []
        device = "cuda"
        shape_lists = {}
    out = args.out or Path(__file__).with_name(f"results_estimating_step_{args.device}.json")
    shape_lists["ResNet-34, 110 tensors, 21.3M parameters"] = resnet34_cifar_shapes()
    if not stubbed:
        shape_lists["GPT-2, 148 tensors, 124.4M parameters"] = gpt_shapes(12, 768)
    keeper = KeepEstimating(stubbed)
    report = {
        "command": " ".join(["estimating_step.py", *(argv or sys.argv[1:])]),
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if not stubbed else "launches stubbed",
        },
        "results": {},
    }
    # Launches are counted where they are stubbed; torch ops everywhere.
    print(f"{'parameters':42s} {'state':14s} {'ordinary us':>11s} {'estimating us':>13s} "
          f"{'ratio':>6s} {'launches':>9s} {'torch ops':>9s}")  # fmt: skip
    for set_name, shapes in shape_lists.items():
        for state_name, state in STATES.items():
            runs = {
                "ordinary": build(shapes, state, device),
                "estimating": build(shapes, dict(state, final_lr="auto"), device),
            }
            for opt, _ in runs.values():
                opt.step()  # state, launch plan, and the estimate's first (unbounded) step
            samples: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(args.repeat):
                for name, (opt, params) in runs.items():
                    if stubbed:
                        seconds = time_step(opt, params, args.steps, fresh_grads=False)
                    else:
                        seconds = time_steps(opt, args.steps, device)
                    samples[name].append(seconds)
            row = {}
            keeper.filling = False  # what the step itself dispatches
            for name, (opt, _) in runs.items():
                opt.step()  # its hyperparameter table back in the cache the runs share
                before = sum(r.launches for r in recorders)
                _, ops = device_ops(opt, recorders)
                launches = sum(r.launches for r in recorders) - before
                row[name] = {
                    "us_per_step": statistics.median(samples[name]) * 1e6,
                    "launches": launches,
                    "torch_ops": ops,
                }
            keeper.filling = stubbed
            ratio = row["estimating"]["us_per_step"] / row["ordinary"]["us_per_step"]
            row["ratio"] = ratio
            report["results"][f"{set_name} / {state_name}"] = row
            ordinary, estimating = row["ordinary"], row["estimating"]
            print(
                f"{set_name:42s} {state_name:14s} {ordinary['us_per_step']:11.1f} "
                f"{estimating['us_per_step']:13.1f} {ratio:5.2f}x "
                f"{ordinary['launches']:4d}/{estimating['launches']:<4d} "
                f"{len(ordinary['torch_ops']):4d}/{len(estimating['torch_ops']):<4d}"
            )
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
