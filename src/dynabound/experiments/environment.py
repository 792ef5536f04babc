"""Where a run was computed: what its numbers depend on besides its configuration.

The same configuration gives other bits with other code, another torch, another number of
threads or another CPU (its instruction set and vendor choose torch's and MKL's matrix
kernels: one epoch of MNIST with torch limited to AVX2 ends elsewhere than with AVX-512).
A run directory keeps one record of these per start or resume, so that a number on a page
can be traced to the code and machine that produced it.
"""

from __future__ import annotations

import datetime
import platform
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import torch

__all__ = ["describe_environment"]


@cache
def _source() -> str | None:
    """The git commit of the source tree this module was imported from, with "+dirty" when
    the package's tracked files differ from it; None outside a git checkout (an installed
    package)."""
    here = Path(__file__).resolve().parent
    package = here.parent

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10
        )
        if done.returncode != 0:
            raise OSError(done.stderr.strip())
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", str(package))
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


@cache
def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_environment(device: torch.device, processes: int = 1) -> dict[str, Any]:
    """A JSON-ready record of the code, library versions, threads, CPU and device."""
    from dynabound import __version__

    record: dict[str, Any] = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dynabound": __version__,
        "source": _source(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": _cpu(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": str(device),
        "processes": processes,
    }
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record
