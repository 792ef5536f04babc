"""Golden runs: every optimizer's short fixed-seed run ends on the pinned bits (golden.py)."""

from __future__ import annotations

import pytest
import torch

from dynabound.experiments.config import build_config
from dynabound.experiments.runner import train

from . import golden
from .runs import strip_timing


def test_golden_runs_end_on_the_pinned_bits():
    key = golden.environment()
    pinned = golden.load()["environments"].get(key)
    if pinned is None:
        pytest.skip(
            f"{golden.FILE.name} pins no runs for {key}: bits depend on the torch version and "
            f"the CPU, so each environment has its own set (`{golden.REGENERATE}` adds it)"
        )
    lines = golden.differences(pinned["runs"], golden.golden_runs())
    assert not lines, (
        f"golden runs changed ({key}):\n  "
        + "\n  ".join(lines)
        + f"\nIf this numerical change is intended, regenerate {golden.FILE.name} with "
        f"`{golden.REGENERATE}` and commit it in a commit of its own that says why the "
        "numbers changed."
    )


def test_the_records_the_golden_runs_leave_out_do_not_change_training(tmp_path):
    # The golden runs skip the bound-activity and sign records to stay fast; that is sound
    # only if recording reads the state without changing what training computes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics = {}
        for record in (True, False):
            config = build_config(
                "digits", "adabound", epochs=2, device="cpu", record_bounds=record
            )
            result = train(config, tmp_path / str(record), quiet=True, figures=False)
            metrics[record] = [
                {k: v for k, v in m.items() if k not in ("bounds", "bounds_by_step", "sign")}
                for m in strip_timing(result.metrics)
            ]
    finally:
        torch.set_num_threads(threads)
    assert metrics[True] == metrics[False]
