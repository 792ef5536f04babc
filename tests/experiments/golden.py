"""Golden runs: short fixed-seed trainings whose final metrics are pinned bit for bit.

Every optimizer of the harness trains the digits task for a few hundred steps, and the four
convex-task optimizers run the convex counterexample, all on the default CPU path with one
thread. ``golden_runs.json`` holds their final metrics and a digest of their final
parameters; ``test_golden.py`` trains them again and compares exactly. A change that moves
any bit of any run shows there: a new default code path, a reordered sum, a changed data
order or initialisation.

An intended numerical change updates the file in its own commit that says why the numbers
changed::

    python -m tests.experiments.golden --update

(from the repository root, with the source under test first on PYTHONPATH). Bits depend on
more than the code: the torch version, and the CPU, whose instruction set (AVX-512 or AVX2)
and vendor decide which matrix-multiplication kernels torch and MKL use. The file keeps one
set of runs per such environment; the test compares the current environment's set and skips
where the file has none (``--update`` adds it).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

FILE = Path(__file__).with_name("golden_runs.json")
DIGITS_EPOCHS = 5  # 43 steps each at batch 32: 215 steps
CONVEX_STEPS = 1000
REGENERATE = "python -m tests.experiments.golden --update"


def _cpu_vendor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _fused_cpu_kernel() -> bool:
    from dynabound.kernels import cpu

    return cpu.is_available()


def environment() -> str:
    """What the bits depend on besides the code: torch, the CPU's vendor and the instruction
    set torch dispatches to, and whether the fused CPU kernel (the bounded methods' default
    path) builds here."""
    kernel = "fused CPU kernel" if _fused_cpu_kernel() else "no fused CPU kernel"
    capability = torch.backends.cpu.get_cpu_capability()
    return f"torch {torch.__version__}, {_cpu_vendor()} {capability}, {kernel}, 1 thread"


def _digest(model_state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(model_state):
        h.update(key.encode())
        h.update(model_state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _configs() -> dict[str, dict[str, Any]]:
    from dynabound.experiments.config import build_config
    from dynabound.experiments.optimizers import OPTIMIZERS
    from dynabound.experiments.tasks.convex import ConvexTask

    configs = {}
    for optim in OPTIMIZERS:
        configs[f"digits/{optim}"] = build_config(
            "digits", optim, epochs=DIGITS_EPOCHS, device="cpu", record_bounds=False
        )
    for optim in ConvexTask.optimizers:
        configs[f"convex/{optim}"] = build_config(
            "convex",
            optim,
            epochs=1,
            task_args={"steps_per_epoch": CONVEX_STEPS},
            device="cpu",
            record_bounds=False,
        )
    return configs


def golden_runs() -> dict[str, dict[str, Any]]:
    """Train every golden run in a temporary directory; per run, its last epoch's metrics
    (wall times left out) and the sha256 of its final parameters."""
    from dynabound.experiments.runner import CHECKPOINT, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results = {}
    try:
        # In memory where there is a tmpfs: the runner fsyncs every checkpoint, which on a
        # busy disk takes longer than the training.
        shm = Path("/dev/shm")
        with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as tmp:
            for name, config in _configs().items():
                run_dir = Path(tmp) / name.replace("/", "-")
                result = train(config, run_dir, quiet=True, progress=False, figures=False,
                               checkpoint_every=None)  # fmt: skip
                last = result.metrics[-1]
                metrics = {
                    k: v
                    for k, v in last.items()
                    if isinstance(v, int | float) and not isinstance(v, bool) and "time" not in k
                }
                ckpt = torch.load(run_dir / CHECKPOINT, weights_only=True)
                metrics["params_sha256"] = _digest(ckpt["model"])
                results[name] = metrics
    finally:
        torch.set_num_threads(threads)
    return results


def load() -> dict[str, Any]:
    return json.loads(FILE.read_text()) if FILE.is_file() else {"environments": {}}


def differences(want: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """One line per run or value that differs (floats compared exactly)."""
    lines = []
    for name in sorted(set(want) | set(got)):
        if name not in got or name not in want:
            lines.append(f"{name}: {'missing now' if name not in got else 'new run'}")
            continue
        for key in sorted(set(want[name]) | set(got[name])):
            a, b = want[name].get(key), got[name].get(key)
            if a != b:
                lines.append(f"{name} {key}: pinned {a!r}, now {b!r}")
    return lines


def update() -> str:
    """Train the golden runs and store them as this environment's set in the file."""
    data = load()
    key = environment()
    data["about"] = __doc__.split("\n\n")[1].replace("\n", " ")
    data["regenerate"] = REGENERATE
    data["digits_epochs"], data["convex_steps"] = DIGITS_EPOCHS, CONVEX_STEPS
    data["environments"][key] = {
        "generated": datetime.date.today().isoformat(),
        "python": sys.version.split()[0],
        "runs": golden_runs(),
    }
    FILE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--update", action="store_true", help=f"train the runs and rewrite {FILE.name}"
    )
    ns = parser.parse_args(argv)
    if ns.update:
        print(f"{FILE}: stored the golden runs of {update()}")
        return 0
    key = environment()
    pinned = load()["environments"].get(key)
    if pinned is None:
        print(f"{FILE} has no golden runs for {key}")
        return 1
    lines = differences(pinned["runs"], golden_runs())
    print("\n".join(lines) if lines else f"every golden run matches ({key})")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
