"""Progress lines for output that is not a terminal: their pace and content."""

from __future__ import annotations

import math

import pytest

from dynabound.experiments.cli import main
from dynabound.experiments.console import ProgressLines, format_duration


def test_progress_lines_come_at_a_steady_pace_with_rate_and_eta():
    now = [0.0]
    out: list[str] = []
    losses: list[int] = []

    def loss() -> float:
        losses.append(1)
        return 4.5

    lines = ProgressLines(30.0, epochs=40, write=out.append, clock=lambda: now[0])
    lines.begin_epoch(3, total=1000, done=100)  # a resumed epoch: 100 steps done before
    for done in range(101, 1001):
        now[0] = (done - 100) / 10  # 10 steps a second
        lines.step(done, loss)
    assert out == [
        "epoch 3/40 | step 400/1000 | loss 4.5000 | 10 steps/s | ETA 1m00s",
        "epoch 3/40 | step 700/1000 | loss 4.5000 | 10 steps/s | ETA 30s",
        "epoch 3/40 | step 1000/1000 | loss 4.5000 | 10 steps/s | ETA 0s",
    ]
    assert len(losses) == 3  # the running loss is read only for a line


@pytest.mark.parametrize("every", [None, 0.0])
def test_no_progress_lines_when_switched_off(every):
    out: list[str] = []
    lines = ProgressLines(every, epochs=1, write=out.append, clock=lambda: 1e9)
    lines.begin_epoch(1, total=10, done=0)
    lines.step(1, lambda: pytest.fail("no line, so no loss to read"))
    assert out == []


def test_format_duration():
    assert [format_duration(s) for s in (5, 75, 3599, 7300, math.inf)] == [
        "5s",
        "1m15s",
        "59m59s",
        "2h01m",
        "?",
    ]


def test_a_run_logging_to_a_file_prints_progress_inside_epochs(tmp_path, capsys):
    # Under capsys the output is not a terminal, as when it goes to a log file.
    argv = ["run", "digits", "--optim", "adam", "--epochs", "1", "--hidden", "8"]
    assert main([*argv, "--out", str(tmp_path / "a"), "--progress-every", "1e-9"]) == 0
    out = capsys.readouterr().out.splitlines()
    progress = [line for line in out if line.startswith("epoch 1/1 | step ")]
    assert len(progress) == 43  # a line after every step at this pace
    assert progress[0].startswith("epoch 1/1 | step 1/43 | loss ")
    assert all("steps/s | ETA " in line for line in progress)
    assert progress[-1].endswith("ETA 0s")
    assert main([*argv, "--out", str(tmp_path / "b"), "--progress-every", "0"]) == 0
    assert " | step " not in capsys.readouterr().out
    assert main([*argv, "--out", str(tmp_path / "c"), "--progress-every", "1e-9", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
