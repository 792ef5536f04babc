"""One training iteration of a CIFAR ResNet-34 with each optimizer: what the step costs in context.

    python benchmarks/train_step.py                  # CPU, 2 threads, batch 16
    python benchmarks/train_step.py --device cuda    # bf16 autocast, channels_last, batch 128

An iteration is forward, loss, backward, ``optimizer.step()`` and ``zero_grad(set_to_none=True)``
on one fixed random batch. Every optimizer gets its own model (same initial weights), takes
untimed warm-up iterations (state allocation; the first dynabound step may build or load the
CPU kernel). Each repeat then runs ``--iters`` rounds of one iteration per method (round-robin;
the order rotated each repeat and reversed every other one), so load that comes and goes hits
all methods alike. The table reports medians over repeats of: ms per iteration; its ratio to
torch's fused Adam in the same repeat; the optimizer step's own time and share of the
iteration, timed inside the same iterations (perf_counter on CPU, where ops are synchronous;
CUDA events around the step on CUDA, which add no synchronization).

"dynabound default, final_lr=auto estimating" is the default AdaBound with
``final_lr="auto"``, kept estimating for the whole run: what an iteration costs while the
estimate is made (each step also sums its projection and sends it to the host).

Peers (never dependencies; measured only when importable): ``adabound`` (the authors'
AdaBound 0.0.5), ``torch_optimizer.AdaBound``, ``pytorch_optimizer.AdaBound``.
"""

from __future__ import annotations

import os

# Spinning OpenMP waits make multi-threaded CPU ops far slower on shared cores (step_time.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import dynabound  # noqa: E402
from dynabound import final_lr, kernels  # noqa: E402
from dynabound.experiments.models import resnet34  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from step_time import machine  # noqa: E402

Factory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def fused_sgd_supported(device: str) -> bool:
    probe = torch.zeros(1, device=device, requires_grad=True)
    try:
        torch.optim.SGD([probe], lr=0.1, momentum=0.9, fused=True)
    except RuntimeError:
        return False
    return True


def estimating_all_run(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdaBound(final_lr="auto") still estimating at the last timed iteration: an estimate
    never settles (no patience) and its cap is past the run (gamma 1e-5: 100000 steps).
    The bounds' width does not change the work of a step."""
    final_lr.SETTLE_PATIENCE = 10**12
    return dynabound.AdaBound(params, final_lr="auto", gamma=1e-5)


def methods(device: str) -> dict[str, Factory]:
    out: dict[str, Factory] = {}
    if fused_sgd_supported(device):
        out["torch SGD momentum fused"] = lambda p: torch.optim.SGD(
            p, lr=0.1, momentum=0.9, fused=True
        )
    else:
        out["torch SGD momentum foreach"] = lambda p: torch.optim.SGD(
            p, lr=0.1, momentum=0.9, foreach=True
        )
    out["torch Adam fused"] = lambda p: torch.optim.Adam(p, fused=True)
    out["dynabound default"] = lambda p: dynabound.AdaBound(p)
    out["dynabound default, final_lr=auto estimating"] = estimating_all_run
    if kernels.is_available(device):
        out["dynabound fused"] = lambda p: dynabound.AdaBound(p, fused=True)
    out["dynabound foreach"] = lambda p: dynabound.AdaBound(p, foreach=True)
    try:
        import adabound

        out["adabound 0.0.5 (authors)"] = lambda p: adabound.AdaBound(p)
    except ImportError:
        pass
    try:
        import torch_optimizer

        version = metadata.version("torch-optimizer")
        out[f"torch_optimizer {version}"] = lambda p: torch_optimizer.AdaBound(p)
    except ImportError:
        pass
    try:
        import pytorch_optimizer

        version = metadata.version("pytorch-optimizer")
        out[f"pytorch_optimizer {version}"] = lambda p: pytorch_optimizer.AdaBound(
            p, weight_decouple=False
        )
    except ImportError:
        pass
    return out


class Clock:
    """Time marks: perf_counter on CPU, recorded CUDA events on CUDA (read after one sync)."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def iteration(model, opt, x, y, clock: Clock, autocast) -> tuple:
    """One training iteration; returns its (start, before step, after step, end) marks."""
    start = clock.mark()
    with autocast():
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    before = clock.mark()
    opt.step()
    after = clock.mark()
    opt.zero_grad(set_to_none=True)
    return start, before, after, clock.mark()


def mean_seconds(marks: list[tuple], clock: Clock) -> tuple[float, float]:
    """Mean seconds per iteration and per optimizer step over ``marks`` (after a sync)."""
    total = sum(clock.seconds(m[0], m[3]) for m in marks) / len(marks)
    return total, sum(clock.seconds(m[1], m[2]) for m in marks) / len(marks)


def measure(args) -> dict:
    device = args.device
    torch.manual_seed(0)
    base = resnet34(num_classes=10)
    layout = torch.channels_last if device == "cuda" else torch.contiguous_format
    x = torch.randn(args.batch, 3, 32, 32).to(device, memory_format=layout)
    y = torch.randint(0, 10, (args.batch,)).to(device)
    if device == "cuda":

        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16)

    else:
        autocast = contextlib.nullcontext
    clock = Clock(device)
    table = methods(device)
    runs = {}
    first: dict[str, float] = {}
    for name, factory in table.items():
        model = copy.deepcopy(base).to(device, memory_format=layout).train()
        opt = factory(list(model.parameters()))
        runs[name] = (model, opt, x, y, clock, autocast)
        marks = [iteration(*runs[name])]  # state allocation, kernel build or load
        clock.sync()
        first[name] = mean_seconds(marks, clock)[0]
        for _ in range(args.warmup):
            iteration(*runs[name])
        clock.sync()
        print(f"warmed up {name}: first iteration {first[name] * 1e3:.0f} ms", flush=True)

    # Round-robin: each repeat runs one iteration of every method in turn, --iters times, so
    # load that comes and goes within a repeat hits every method alike; the order rotates by
    # one each repeat and reverses every other one, so no method always follows the same
    # neighbour. The ratio is taken within each repeat, then its median over repeats.
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in table}
    ratios: dict[str, list[float]] = {name: [] for name in table}
    names = list(table)
    for r in range(args.repeat):
        order = names[r % len(names) :] + names[: r % len(names)]
        order = order[::-1] if r % 2 else order
        marks = {name: [] for name in order}
        for _ in range(args.iters):
            for name in order:
                marks[name].append(iteration(*runs[name]))
        clock.sync()
        for name in names:
            samples[name].append(mean_seconds(marks[name], clock))
        adam = samples["torch Adam fused"][-1][0]
        for name in names:
            ratios[name].append(samples[name][-1][0] / adam)
        print(f"repeat {r + 1}/{args.repeat} done", flush=True)

    for name, (_, opt, *_) in runs.items():
        if name.endswith("estimating") and opt.param_groups[0]["final_lr"] != "auto":
            raise RuntimeError(f"{name}: the estimate was fixed during the run")

    results = {}
    for name, pairs in samples.items():
        total = statistics.median(t for t, _ in pairs)
        step = statistics.median(s for _, s in pairs)
        results[name] = {
            "ms_per_iteration": total * 1e3,
            "ratio_to_torch_fused_adam": statistics.median(ratios[name]),
            "step_ms": step * 1e3,
            "step_share": statistics.median(s / t for t, s in pairs),
            "first_iteration_ms": first[name] * 1e3,
            "samples_ms": [t * 1e3 for t, _ in pairs],
            "step_samples_ms": [s * 1e3 for _, s in pairs],
            "ratio_samples": ratios[name],
        }
    return results


def print_table(results: dict) -> None:
    print(
        f"\n{'method':44s} {'ms/iter':>9s} {'vs fused Adam':>13s} {'step ms':>9s}"
        f" {'step share':>10s}"
    )
    for name, r in results.items():
        print(
            f"{name:44s} {r['ms_per_iteration']:9.1f} {r['ratio_to_torch_fused_adam']:12.3f}x"
            f" {r['step_ms']:9.1f} {r['step_share']:9.1%}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=None, help="128 on cuda, 16 on cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeat", type=int, default=5, help="samples per method")
    parser.add_argument("--iters", type=int, default=None, help="iterations per sample")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    cuda = args.device == "cuda"
    args.batch = args.batch or (128 if cuda else 16)
    args.iters = args.iters or (20 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cudnn.benchmark = True
    out = args.out or Path(__file__).with_name(f"results_train_step_{args.device}.json")

    report: dict = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "machine": machine(args.device, args.threads),
        "model": "resnet34 (CIFAR), 10 classes, 32x32 inputs",
        "recipe": "bf16 autocast, channels_last" if cuda else "fp32",
        "batch": args.batch,
        "repeat": args.repeat,
        "iters_per_sample": args.iters,
        "warmup_iters": args.warmup,
        "dynabound_kernel_available": kernels.is_available(args.device),
    }
    print(json.dumps(report, indent=1), flush=True)
    report["methods"] = measure(args)
    print_table(report["methods"])
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
