"""Skip or fail the tests of the fused kernels where they cannot run.

A developer without a C++ compiler still gets the rest of the suite: the kernel's tests
skip, with the build's reason. Under ``CI=true`` or ``DYNABOUND_REQUIRE_KERNEL=1`` they fail
with that reason instead, so a machine whose default step silently runs the slower foreach
path cannot pass. ``DYNABOUND_REQUIRE_KERNEL=0`` turns the requirement off, CI included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dynabound import kernels


def kernel_required() -> bool:
    """Whether an unbuildable CPU kernel fails the tests that need it."""
    explicit = os.environ.get("DYNABOUND_REQUIRE_KERNEL", "").strip()
    if explicit:
        return explicit.lower() not in ("0", "false", "no")
    return os.environ.get("CI", "").strip().lower() in ("1", "true")


def require_cpu_kernel() -> None:
    """Build the fused CPU kernel (cached after the first time); skip the calling test or
    fixture where it cannot be built, or fail it where the kernel is required."""
    if kernels.is_available("cpu"):
        return
    reason = f"the fused CPU kernel cannot be built: {kernels.unavailable_reason('cpu')}"
    if kernel_required():
        pytest.fail(
            f"{reason} (required under CI=true or DYNABOUND_REQUIRE_KERNEL=1; "
            "DYNABOUND_REQUIRE_KERNEL=0 skips these tests instead)",
            pytrace=False,
        )
    pytest.skip(reason)


def require_tested_triton():
    """The installed ``triton`` module; skip the calling test where there is none, or where
    it is older than the oldest Triton the fused CUDA kernel is tested with: the default
    step never runs the kernel there (it warns and runs foreach), and the older
    interpreters and compilers do not run its tests."""
    triton = pytest.importorskip("triton")
    from dynabound.kernels import compat

    if compat.triton_version(triton) < compat.MIN_TRITON:
        oldest = ".".join(map(str, compat.MIN_TRITON))
        pytest.skip(f"Triton {triton.__version__} is older than {oldest}: no fused CUDA kernel")
    return triton


def run_on_each_isa(script: str) -> dict[str, dict]:
    """Run ``script`` once per vector copy of the CPU kernel (``DYNABOUND_CPU_ISA`` generic,
    avx2 and best, one thread each, this checkout's source first on the path) and return
    the JSON object each run prints last, by copy."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    results = {}
    for cap in ("generic", "avx2", "best"):
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
            DYNABOUND_CPU_ISA=cap,
            OMP_NUM_THREADS="1",
        )
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        results[cap] = json.loads(done.stdout.strip().splitlines()[-1])
    return results
