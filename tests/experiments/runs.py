"""Comparing run directories bit for bit, and running the command in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from dynabound.experiments.runner import CHECKPOINT, METRICS, read_metrics

TIMING = {"epoch_time", "time"}


def strip_timing(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING} for m in metrics]


def checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / CHECKPOINT, weights_only=True)


def assert_same_state(a: dict, b: dict) -> None:
    """Two checkpoints hold the same model, optimizer, counters and position."""
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for index in sa:
        for key, value in sa[index].items():
            assert torch.equal(value, sb[index][key]), (index, key)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    assert a.get("inside") is None and b.get("inside") is None  # both at an epoch's end


def assert_same_run(a: Path, b: Path) -> None:
    """Same metrics (but for wall times) and the same final checkpoint, generators included."""
    assert strip_timing(read_metrics(a / METRICS)) == strip_timing(read_metrics(b / METRICS))
    ca, cb = checkpoint(a), checkpoint(b)
    assert_same_state(ca, cb)
    for ra, rb in zip(ca["rng"], cb["rng"], strict=True):
        assert torch.equal(ra["torch"], rb["torch"])
        assert torch.equal(ra["numpy"]["key"], rb["numpy"]["key"])
        assert {k: v for k, v in ra["numpy"].items() if k != "key"} == {
            k: v for k, v in rb["numpy"].items() if k != "key"
        }
        assert ra["python"] == rb["python"]


def command(*args: str, **kwargs) -> subprocess.Popen:
    """``python -m dynabound.experiments ARGS`` with its output in a pipe (not a terminal)."""
    return subprocess.Popen(
        [sys.executable, "-m", "dynabound.experiments", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=kwargs.pop("env", os.environ),
        **kwargs,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args: str, processes: int = 2) -> list[subprocess.Popen]:
    """What ``torchrun --nproc-per-node N -m dynabound.experiments ARGS`` starts, on CPU."""
    port = str(_free_port())
    procs = []
    for rank in range(processes):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(processes),
            LOCAL_WORLD_SIZE=str(processes),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        procs.append(command(*args, env=env))
    return procs


def finish(procs: list[subprocess.Popen], code: int = 0, timeout: float = 600) -> list[str]:
    """Wait for every process, check its exit code and return its output."""
    outputs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == code, out
        outputs.append(out)
    return outputs
