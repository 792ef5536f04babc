"""``torch.compile(opt.step)`` against the eager step, with dynabound's defaults.

    python benchmarks/compiled_step.py                  # CPU, 2 threads, ResNet-34 shapes
    python benchmarks/compiled_step.py --device cuda

Under torch.compile dynabound's default step is one custom op (the fused kernel), so a
compiled step should cost what an eager one does. This script times, on the CIFAR
ResNet-34 parameter shapes (110 tensors, 21.3M parameters), interleaved over repeats:
torch's fused Adam (eager), dynabound's default step eager and compiled (one optimizer, so
the same memory), and the compiled step with an ``ExponentialLR`` scheduler changing its
float lr every step (which must not recompile). It reports medians, ratios, the first
compiled call and the number of graphs compiled while timing.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see step_time.py

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import dynabound  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from step_time import machine, resnet34_cifar_shapes, synchronize  # noqa: E402


def make_params(device: str) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in resnet34_cifar_shapes():
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).mul_(0.05).to(device))
        p.grad = torch.randn(shape, generator=gen).to(device)
        params.append(p)
    return params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20, help="steps per sample")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from torch._dynamo.utils import counters

    adam = torch.optim.Adam(make_params(args.device), fused=True)
    # One optimizer for the eager and the compiled steps: the same tensors in the same
    # memory, so only the way the step is called differs.
    opt = dynabound.AdaBound(make_params(args.device))
    compiled = torch.compile(opt.step)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, 0.9999)

    def scheduled_step() -> None:
        compiled()
        scheduler.step()

    methods = {
        "torch Adam fused (eager)": adam.step,
        "dynabound default (eager)": opt.step,
        "dynabound default, compiled": compiled,
        "dynabound default, compiled, lr scheduler": scheduled_step,
    }
    first_call = {}
    for name, step in methods.items():  # state, kernel build and compilation
        synchronize(args.device)
        start = time.perf_counter()
        step()
        step()
        synchronize(args.device)
        first_call[name] = time.perf_counter() - start
    graphs_before = counters["stats"]["unique_graphs"]
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(args.repeat):
        order = list(methods)[r % len(methods) :] + list(methods)[: r % len(methods)]
        for name in order:
            synchronize(args.device)
            start = time.perf_counter()
            for _ in range(args.steps):
                methods[name]()
            synchronize(args.device)
            samples[name].append((time.perf_counter() - start) / args.steps)
    recompiled = counters["stats"]["unique_graphs"] - graphs_before

    base = statistics.median(samples["dynabound default (eager)"])
    adam_time = statistics.median(samples["torch Adam fused (eager)"])
    results = {}
    print(f"{'method':44s} {'ms/step':>8s} {'vs eager':>8s} {'vs Adam':>8s} {'first 2 s':>9s}")
    for name, times in samples.items():
        t = statistics.median(times)
        results[name] = {
            "ms_per_step": t * 1e3,
            "ratio_to_eager_default": t / base,
            "ratio_to_torch_adam_fused": t / adam_time,
            "first_two_calls_s": first_call[name],
            "samples_ms": [x * 1e3 for x in times],
        }
        print(
            f"{name:44s} {t * 1e3:8.2f} {t / base:7.2f}x {t / adam_time:7.2f}x "
            f"{first_call[name]:9.1f}"
        )
    print(f"graphs compiled while timing (a scheduler changed lr every step): {recompiled}")
    report = {
        "command": " ".join(["compiled_step.py", *(argv or sys.argv[1:])]),
        "machine": machine(args.device, args.threads),
        "repeat": args.repeat,
        "steps_per_sample": args.steps,
        "graphs_compiled_while_timing": recompiled,
        "methods": results,
    }
    out = args.out or Path(__file__).with_name(f"results_compiled_step_{args.device}.json")
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
