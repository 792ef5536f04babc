"""Optimizer step time and memory: torch Adam, dynabound and any importable peer AdaBound.

    python benchmarks/step_time.py                  # CPU, 2 threads, both shape sets
    python benchmarks/step_time.py --quick          # ResNet-34 shapes only, fewer repeats
    python benchmarks/step_time.py --device cuda    # adds a 1B shape set and CUDA graphs

Every method runs ``optimizer.step()`` on the same parameters and gradients, in the same
process, interleaved: each repeat times every method once (fresh state, one untimed warm-up
step), and the tables report medians over repeats, so a busy machine slows all methods alike
and the ratio to torch's fused Adam stays meaningful.

Columns: ms/step; ns per parameter; ratio to torch fused Adam; achieved GB/s counting the
minimum traffic (28 bytes per fp32 parameter for Adam and AdaBound: read p, g, m, v, write
p, m, v; 36 for AMSBound); peak extra memory during one step. On CPU the peak is measured by
a dispatch-mode tracker that sees every tensor torch allocates during the step (storage
bytes, released when the tensor object dies); memory a compiled kernel allocates internally
is not seen (the fused kernel allocates O(number of tensors) bytes of scalars). On CUDA it is
``torch.cuda.max_memory_allocated`` above the level before the step.

On CPU the script sets ``OMP_WAIT_POLICY=PASSIVE`` unless it is already set (see below).

Peers (never dependencies; measured only when importable): ``adabound`` (the authors'
AdaBound 0.0.5), ``torch_optimizer.AdaBound``, ``pytorch_optimizer.AdaBound``.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting (libgomp's default) make every multi-threaded torch
# CPU op up to 40x slower when other processes share the cores: measured here, torch's
# fused Adam took 860 ms per ResNet-34 step at 2 threads instead of 22 ms. Sleeping waits
# make the timings reflect the kernels. Must be set before torch loads the runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import weakref  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

import dynabound  # noqa: E402
from dynabound import kernels  # noqa: E402

# Minimum traffic per parameter: 8-bit moments also move one float32 scale per 256 elements
# (read and written, two moments).
BYTES_PER_PARAM = {
    "adam": 28,
    "adabound": 28,
    "amsbound": 36,
    "adabound_bf16_state": 20,
    "adabound_8bit_state": 16 + 2 * 2 * 4 / 256,
}


# ---------------------------------------------------------------- shape sets
def resnet34_cifar_shapes() -> list[tuple[int, ...]]:
    """CIFAR ResNet-34 (3x3 stem, BasicBlocks [3, 4, 6, 3]): 110 tensors, 21.3M parameters."""
    shapes: list[tuple[int, ...]] = [(64, 3, 3, 3), (64,), (64,)]
    in_planes = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True):
        for block in range(blocks):
            shapes += [(width, in_planes, 3, 3), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            if block == 0 and in_planes != width:  # 1x1 downsample conv and its BN
                shapes += [(width, in_planes, 1, 1), (width,), (width,)]
            in_planes = width
    return shapes + [(10, 512), (10,)]


def gpt_shapes(layers: int, width: int, vocab: int = 50257, context: int = 1024):
    """GPT-2-style decoder (tied output embedding): 12 layers x 768 is the 124M model."""
    shapes: list[tuple[int, ...]] = [(vocab, width), (context, width)]
    for _ in range(layers):
        shapes += [(width,), (width,), (width, 3 * width), (3 * width,), (width, width), (width,)]
        shapes += [(width,), (width,), (width, 4 * width), (4 * width,), (4 * width, width)]
        shapes += [(width,)]
    return shapes + [(width,), (width,)]


def shape_sets(device: str, quick: bool) -> dict[str, list[tuple[int, ...]]]:
    sets = {"resnet34_cifar": resnet34_cifar_shapes()}
    if not quick:
        sets["gpt_125m"] = gpt_shapes(12, 768)
        if device == "cuda":
            sets["gpt_1b"] = gpt_shapes(18, 2048)
    return sets


# ---------------------------------------------------------------- methods
def methods(device: str) -> dict[str, tuple[str, Callable]]:
    """name -> (traffic kind, factory(params) -> optimizer)."""
    fused_ok = kernels.is_available(device)
    out: dict[str, tuple[str, Callable]] = {
        "torch Adam foreach": ("adam", lambda p: torch.optim.Adam(p, foreach=True)),
        "torch Adam fused": ("adam", lambda p: torch.optim.Adam(p, fused=True)),
        "dynabound single-tensor": (
            "adabound",
            lambda p: dynabound.AdaBound(p, foreach=False),
        ),
        "dynabound foreach": ("adabound", lambda p: dynabound.AdaBound(p, foreach=True)),
    }
    out["dynabound default"] = ("adabound", lambda p: dynabound.AdaBound(p))
    if fused_ok:
        out["dynabound fused"] = ("adabound", lambda p: dynabound.AdaBound(p, fused=True))
        out["dynabound AMSBound fused"] = (
            "amsbound",
            lambda p: dynabound.AMSBound(p, fused=True),
        )
        out["dynabound fused, bf16 state"] = (
            "adabound_bf16_state",
            lambda p: dynabound.AdaBound(p, fused=True, state_dtype=torch.bfloat16),
        )
        out["dynabound fused, 8-bit state"] = (
            "adabound_8bit_state",
            lambda p: dynabound.AdaBound(p, fused=True, state_dtype="8bit"),
        )
    if device == "cuda":
        out["torch Adam fused, CUDA graph"] = (
            "adam",
            lambda p: GraphedStep(torch.optim.Adam(p, fused=True, capturable=True)),
        )
        out["dynabound foreach capturable"] = (
            "adabound",
            lambda p: dynabound.AdaBound(p, foreach=True, capturable=True),
        )
        out["dynabound foreach capturable, CUDA graph"] = (
            "adabound",
            lambda p: GraphedStep(dynabound.AdaBound(p, foreach=True, capturable=True)),
        )
        if fused_ok:
            out["dynabound fused, CUDA graph"] = (
                "adabound",
                lambda p: GraphedStep(dynabound.AdaBound(p, fused=True, capturable=True)),
            )
    try:
        import adabound

        out["adabound 0.0.5 (authors)"] = ("adabound", lambda p: adabound.AdaBound(p))
    except ImportError:
        pass
    try:
        import torch_optimizer

        out["torch_optimizer"] = ("adabound", lambda p: torch_optimizer.AdaBound(p))
    except ImportError:
        pass
    try:
        import pytorch_optimizer

        out["pytorch_optimizer"] = (
            "adabound",
            lambda p: pytorch_optimizer.AdaBound(p, weight_decouple=False, foreach=False),
        )
        out["pytorch_optimizer foreach"] = (
            "adabound",
            lambda p: pytorch_optimizer.AdaBound(p, weight_decouple=False, foreach=True),
        )
    except ImportError:
        pass
    return out


class GraphedStep:
    """``opt.step()`` captured in a CUDA graph on the first call and replayed afterwards:
    the device time of a step with no host work at all."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt
        self.graph: torch.cuda.CUDAGraph | None = None

    def step(self) -> None:
        if self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: state, kernels, launch plans
                for _ in range(3):
                    self.opt.step()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.opt.step()
        self.graph.replay()


# ---------------------------------------------------------------- measurement
class AllocationTracker(TorchDispatchMode):
    """Bytes of tensor storage allocated by torch ops and still alive; records the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0

    def _release(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        seen: set[int] = set()
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in inputs or key in seen or storage.nbytes() == 0:
                continue
            seen.add(key)
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._release, storage.nbytes())
        return out


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_step_bytes(opt: torch.optim.Optimizer, device: str) -> int:
    if device == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        opt.step()
        synchronize(device)
        return torch.cuda.max_memory_allocated() - base
    with AllocationTracker() as tracker:
        opt.step()
    return tracker.peak


def copy_bandwidth(device: str) -> float:
    """GB/s of ``dst.copy_(src)`` (read + write counted), median of 5."""
    nbytes = (1 << 30) if device == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times[1:]) / 1e9


def time_steps(opt: torch.optim.Optimizer, steps: int, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's per-parameter state, step counters excluded."""
    inner = getattr(opt, "optimizer", opt)
    return sum(
        t.numel() * t.element_size()
        for state in inner.state.values()
        for key, t in state.items()
        if key != "step" and torch.is_tensor(t)
    )


def run_set(name, shapes, device, repeat, target_seconds, only=None) -> dict:
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).mul_(0.05).to(device))
        p.grad = torch.randn(shape, generator=gen).to(device)
        params.append(p)
    n = sum(p.numel() for p in params)
    table = methods(device)
    if only:
        table = {m: v for m, v in table.items() if m in only or m == "torch Adam fused"}
    samples: dict[str, list[float]] = {m: [] for m in table}
    first_step: dict[str, float] = {}
    memory: dict[str, int] = {}
    stored: dict[str, int] = {}
    steps_per_sample: dict[str, int] = {}
    for r in range(repeat):
        # Rotate the order so no method always runs right after the same neighbour.
        order = list(table)[r % len(table) :] + list(table)[: r % len(table)]
        for method in order:
            opt = table[method][1](params)
            first = time_steps(opt, 1, device)  # allocates state (and loads kernels)
            first_step.setdefault(method, first)
            if method not in steps_per_sample:
                probe = time_steps(opt, 1, device)
                steps_per_sample[method] = max(1, min(50, round(target_seconds / probe)))
                memory[method] = peak_step_bytes(opt, device)
                stored[method] = state_bytes(opt)
            samples[method].append(time_steps(opt, steps_per_sample[method], device))
            del opt
            gc.collect()
    results = {}
    adam = statistics.median(samples["torch Adam fused"])
    for method, times in samples.items():
        t = statistics.median(times)
        kind = table[method][0]
        results[method] = {
            "ms_per_step": t * 1e3,
            "ns_per_param": t / n * 1e9,
            "ratio_to_torch_fused_adam": t / adam,
            "gb_per_s": BYTES_PER_PARAM[kind] * n / t / 1e9,
            "bytes_per_param": BYTES_PER_PARAM[kind],
            "peak_extra_mb": memory[method] / 2**20,
            "state_bytes_per_param": stored[method] / n,
            "first_step_ms": first_step[method] * 1e3,
            "samples_ms": [x * 1e3 for x in times],
            "steps_per_sample": steps_per_sample[method],
        }
    return {"tensors": len(shapes), "parameters": n, "methods": results}


def kernel_load_times(device: str) -> dict:
    """First-use build (this process) and cached load (a fresh process) of the kernel."""
    out: dict = {}
    if device == "cpu":
        from dynabound.kernels import cpu

        start = time.perf_counter()
        ok = cpu.is_available()
        out["cpu_kernel_first_use_s"] = time.perf_counter() - start
        out["cpu_kernel_available"] = ok
        if not ok:
            out["cpu_kernel_error"] = cpu.unavailable_reason()
            return out
        out["cpu_kernel_vector_isa"] = cpu.vector_isa()
        probe = (
            "import time, torch; t = time.perf_counter(); from dynabound.kernels import cpu; "
            "cpu.load(); print(time.perf_counter() - t)"
        )
        done = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True
        )
        out["cpu_kernel_cached_load_s"] = float(done.stdout.strip().splitlines()[-1])
    return out


def machine(device: str, threads: int) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_table(name: str, result: dict) -> None:
    print(f"\n{name}: {result['tensors']} tensors, {result['parameters'] / 1e6:.1f}M parameters")
    header = f"{'method':28s} {'ms/step':>9s} {'ns/param':>9s} {'vs fused Adam':>13s}"
    print(
        header + f" {'GB/s':>7s} {'peak extra MB':>13s} {'first step ms':>13s}"
        f" {'state B/param':>13s}"
    )
    for method, r in result["methods"].items():
        print(
            f"{method:28s} {r['ms_per_step']:9.2f} {r['ns_per_param']:9.3f} "
            f"{r['ratio_to_torch_fused_adam']:12.2f}x {r['gb_per_s']:7.1f} "
            f"{r['peak_extra_mb']:13.1f} {r['first_step_ms']:13.1f}"
            f" {r['state_bytes_per_param']:13.3f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeat", type=int, default=None, help="samples per method")
    parser.add_argument("--quick", action="store_true", help="ResNet-34 shapes, 3 repeats")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    parser.add_argument(
        "--methods", nargs="+", default=None, metavar="NAME",
        help="only these methods (names as in the tables; torch Adam fused always runs)",
    )  # fmt: skip
    parser.add_argument(
        "--sets", nargs="+", default=None, metavar="SET", help="only these shape sets"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    torch.set_num_threads(args.threads)
    repeat = args.repeat or (3 if args.quick else 7)
    out = args.out or Path(__file__).with_name(f"results_{args.device}.json")

    report: dict = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "machine": machine(args.device, args.threads),
        "repeat": repeat,
    }
    report["kernel_load"] = kernel_load_times(args.device)
    report["copy_bandwidth_gb_per_s"] = copy_bandwidth(args.device)
    print(json.dumps(report, indent=1))
    report["sets"] = {}
    for name, shapes in shape_sets(args.device, args.quick).items():
        if args.sets and name not in args.sets:
            continue
        result = run_set(name, shapes, args.device, repeat, target_seconds=0.3, only=args.methods)
        report["sets"][name] = result
        print_table(name, result)
        gc.collect()
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
