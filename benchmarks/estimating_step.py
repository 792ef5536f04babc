"""What ``final_lr="auto"`` costs: a fused step while the estimate is made, and after.

    python benchmarks/estimating_step.py                 # CPU, 2 threads, 5.4M parameters
    python benchmarks/estimating_step.py --set resnet34  # CIFAR ResNet-34 shapes, 21.3M
    python benchmarks/estimating_step.py --device cuda
    python benchmarks/estimating_step.py --path foreach  # the torch paths: foreach, single

While a group estimates its ``final_lr``, each fused step also adds up the two projection
sums (``StepTensors.projection``) during its pass over memory, and the host reads them and
updates the estimate. Once the estimate is fixed the step is an ordinary one. For each
state format this times, interleaved over repeats (medians; see step_time.py), the fused
step with a numeric ``final_lr`` (ordinary), with ``final_lr="auto"`` while it estimates,
and with ``final_lr="auto"`` after the estimate was fixed, and gives the last two as
ratios to the first: of the medians, and the median of each repeat's ratio (paired). The
target: at most 1.15 while estimating, 1.00 after.

Every repeat builds the optimizers afresh, so the estimating one is still estimating
(``gamma = 1e-2`` fixes an estimate after 100 steps; a sample takes at most 50), and the
fixed one is first stepped until its estimate is fixed; the script checks both.

``--path`` picks the code path: the fused kernel (the default path on CPU and CUDA), or
torch's foreach or single-tensor ops (where the kernel cannot run), whose projection sums
are separate ops: the step as a tensor, float64 copies of it and of the gradient, two dot
products per tensor.

``--clock cpu`` times the process's CPU time instead of wall time (CPU only): on a machine
shared with other jobs, time spent descheduled then counts for no method.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see step_time.py

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import dynabound  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from step_time import gpt_shapes, machine, resnet34_cifar_shapes, synchronize  # noqa: E402

SETS = {
    # GPT-style, 4 layers of width 256, an 8192-token vocabulary: 52 tensors, 5.4M.
    "small": lambda: gpt_shapes(4, 256, vocab=8192, context=512),
    "resnet34": resnet34_cifar_shapes,
}
FORMATS = {"fp32 state": None, "bf16 state": torch.bfloat16, "8-bit state": "8bit"}
GAMMA = 1e-2
MODES = ("ordinary", "estimating", "after")
# The constructor options that select each code path.
PATHS = {
    "fused": {"fused": True},
    "foreach": {"fused": False, "foreach": True},
    "single": {"fused": False, "foreach": False},
}


def make_params(shapes, device: str) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).mul_(0.05).to(device))
        p.grad = torch.randn(shape, generator=gen).to(device)
        params.append(p)
    return params


def build(mode: str, state_dtype, params, path: str) -> dynabound.AdaBound:
    final_lr = 0.1 if mode == "ordinary" else "auto"
    opt = dynabound.AdaBound(
        params, final_lr=final_lr, gamma=GAMMA, state_dtype=state_dtype, **PATHS[path]
    )
    if mode == "after":
        while opt.param_groups[0]["final_lr"] == "auto":
            opt.step()
    return opt


def time_steps(opt: dynabound.AdaBound, steps: int, device: str, clock) -> float:
    synchronize(device)
    start = clock()
    for _ in range(steps):
        opt.step()
    synchronize(device)
    return (clock() - start) / steps


def estimating(opt: dynabound.AdaBound) -> bool:
    return opt.param_groups[0]["final_lr"] == "auto"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--set", default="small", choices=sorted(SETS))
    parser.add_argument(
        "--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS), metavar="FORMAT"
    )
    parser.add_argument("--path", default="fused", choices=list(PATHS))
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu times CPU steps only")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    params = make_params(SETS[args.set](), args.device)
    n = sum(p.numel() for p in params)
    methods: dict[str, Callable[[], dynabound.AdaBound]] = {
        f"{name}, {mode}": (lambda mode=mode, sd=sd: build(mode, sd, params, args.path))
        for name, sd in FORMATS.items()
        if name in args.formats
        for mode in MODES
    }
    steps: dict[str, int] = {}
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(args.repeat):
        order = list(methods)[r % len(methods) :] + list(methods)[: r % len(methods)]
        for name in order:
            opt = methods[name]()
            time_steps(opt, 1, args.device, clock)  # allocates state (and builds the kernel)
            if name not in steps:
                probe = time_steps(opt, 1, args.device, clock)
                steps[name] = max(1, min(50, round(0.3 / probe)))
            samples[name].append(time_steps(opt, steps[name], args.device, clock))
            if estimating(opt) != name.endswith("estimating"):
                raise RuntimeError(f"{name}: the estimate was fixed too early or never")
            del opt
            gc.collect()

    results = {}
    print(
        f"{args.set}: {len(params)} tensors, {n / 1e6:.1f}M parameters, {args.device}, "
        f"{args.threads} threads, {args.path} path, {args.clock} time"
    )
    print(f"{'method':28s} {'ms/step':>8s} {'vs ordinary':>11s} {'paired':>8s}")
    for name, times in samples.items():
        ordinary_samples = samples[name.rsplit(", ", 1)[0] + ", ordinary"]
        ordinary = statistics.median(ordinary_samples)
        t = statistics.median(times)
        # Each repeat's ratio to the ordinary step of the same repeat, timed moments apart:
        # less moved by a shared machine's slow drifts than the ratio of the medians.
        paired = statistics.median(x / o for x, o in zip(times, ordinary_samples, strict=True))
        results[name] = {
            "ms_per_step": t * 1e3,
            "ratio_to_ordinary": t / ordinary,
            "paired_ratio": paired,
            "steps_per_sample": steps[name],
            "samples_ms": [x * 1e3 for x in times],
        }
        print(f"{name:28s} {t * 1e3:8.2f} {t / ordinary:10.3f}x {paired:7.3f}x")
    report = {
        "command": " ".join(["estimating_step.py", *(argv or sys.argv[1:])]),
        "machine": machine(args.device, args.threads),
        "set": args.set,
        "path": args.path,
        "clock": args.clock,
        "tensors": len(params),
        "parameters": n,
        "repeat": args.repeat,
        "methods": results,
    }
    suffix = args.device if args.path == "fused" else f"{args.device}_{args.path}"
    out = args.out or Path(__file__).with_name(f"results_estimating_step_{suffix}.json")
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
