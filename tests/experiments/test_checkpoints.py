"""Checkpoints inside an epoch: a run killed or stopped mid-epoch, then resumed, ends exactly
as an uninterrupted run does (metrics, parameters, optimizer state, generators)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dynabound.experiments.cli import main
from dynabound.experiments.runner import METRICS, build_config, read_metrics, train
from dynabound.experiments.savepoints import SYNC_STEPS, SaveSchedule
from dynabound.experiments.tasks import DistInfo

from .runs import assert_same_run, checkpoint, command, finish, launch

# Trains a config and SIGKILLs itself right after optimizer step KILL_AT (a real kill: no
# handler runs, the lock and any temporary file stay behind).
KILLED_RUN = """
import json, os, signal, sys
from dynabound.experiments.runner import train

config, run_dir = json.loads(sys.argv[1]), sys.argv[2]
every, kill_at = int(sys.argv[3]), int(sys.argv[4])
steps = 0

def on_batch(epoch, batch):
    global steps
    steps += 1
    if steps == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

train(config, run_dir, quiet=True, figures=False, checkpoint_every=0, checkpoint_steps=every,
      on_batch=on_batch)
"""


def _configs(data: dict[str, Path]) -> dict[str, tuple[dict, int, int, int]]:
    """task -> (config, save every N steps, kill after step K, epoch the last save is in)."""
    return {
        # Adam's lr changes every step here: the epoch's recorded lr must be the saved one.
        "convex": (
            build_config("convex", "adam", epochs=2, task_args={"steps_per_epoch": 40}),
            15,
            50,
            2,
        ),
        # 43 steps an epoch; the save at step 10 holds the bound records of steps 1, 2, 4, 8.
        "digits": (
            build_config("digits", "adabound", epochs=1, device="cpu", task_args={"hidden": 8}),
            5,
            13,
            1,
        ),
        "mnist": (
            build_config(
                "mnist",
                "amsbound",
                epochs=3,
                batch_size=16,
                data_dir=data["mnist"],
                device="cpu",
                task_args={"hidden": 8},
            ),
            3,
            7,
            2,
        ),
        # Random crops and flips: the augmentation generator is part of the epoch's state.
        "cifar10": (
            build_config(
                "cifar10",
                "sgdm",
                epochs=1,
                batch_size=2,  # 5 steps
                data_dir=data["cifar10"],
                device="cpu",
                task_args={"model": "resnet18"},
            ),
            2,
            3,
            1,
        ),
        # Dropout draws from the global generator; the LSTM state is carried between batches.
        "ptb": (
            build_config(
                "ptb",
                "amsbound",
                epochs=2,
                batch_size=4,
                data_dir=data["ptb"],
                device="cpu",
                task_args={"embed": 8, "hidden": 8, "layers": 2, "dropout": 0.3, "bptt": 5},
            ),
            4,
            6,
            1,
        ),
    }


@pytest.mark.parametrize("task", ["convex", "digits", "mnist", "cifar10", "ptb"])
def test_a_run_killed_inside_an_epoch_resumes_bit_identically(
    task, mnist_dir, cifar_dir, ptb_dir, tmp_path
):
    data = {"mnist": mnist_dir, "cifar10": cifar_dir, "ptb": ptb_dir}
    config, every, kill_at, epoch = _configs(data)[task]
    killed = tmp_path / "killed"
    script = [sys.executable, "-c", KILLED_RUN, json.dumps(config), str(killed)]
    proc = subprocess.run(
        [*script, str(every), str(kill_at)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (killed / ".lock").is_file()  # nothing ran after the kill
    ckpt = checkpoint(killed)
    saved = kill_at // every * every
    assert ckpt["global_step"] == saved and ckpt["inside"]["epoch"] == epoch
    if task == "digits":
        assert [r["step"] for r in ckpt["inside"]["bounds_by_step"]] == [1, 2, 4, 8]

    resumed = train({"epochs": config["epochs"]}, killed, resume=True, quiet=True, figures=False)
    assert not resumed.interrupted and resumed.epochs_done == config["epochs"]
    train(config, tmp_path / "reference", quiet=True, figures=False)
    assert_same_run(tmp_path / "reference", killed)
    assert not (killed / ".lock").exists()


def _mnist(data: Path, epochs: int = 3) -> dict:
    return build_config(
        "mnist",
        "adabound",
        epochs=epochs,
        batch_size=16,  # 4 steps an epoch
        data_dir=data,
        device="cpu",
        task_args={"hidden": 8},
    )


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_the_next_step_and_stops(signum, mnist_dir, tmp_path):
    config = _mnist(mnist_dir)
    before = signal.getsignal(signum)

    def signal_once(epoch: int, batch: int) -> None:
        if (epoch, batch) == (2, 0):  # step 5
            os.kill(os.getpid(), signum)

    cut = train(
        config,
        tmp_path / "cut",
        quiet=True,
        figures=False,
        checkpoint_every=0,
        on_batch=signal_once,
    )
    assert cut.interrupted and (cut.epochs_done, cut.steps_done) == (1, 6)
    assert checkpoint(tmp_path / "cut")["inside"]["batch"] == 2
    assert signal.getsignal(signum) == before
    train({"epochs": 3}, tmp_path / "cut", resume=True, quiet=True, figures=False)
    train(config, tmp_path / "reference", quiet=True, figures=False)
    assert_same_run(tmp_path / "reference", tmp_path / "cut")


def test_a_second_signal_interrupts_at_once_keeping_the_last_checkpoint(mnist_dir, tmp_path):
    def signal_twice(epoch: int, batch: int) -> None:
        if (epoch, batch) == (2, 0):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    cut = train(
        _mnist(mnist_dir),
        tmp_path,
        quiet=True,
        figures=False,
        checkpoint_every=0,
        on_batch=signal_twice,
    )
    assert cut.interrupted and (cut.epochs_done, cut.steps_done) == (1, 4)
    assert checkpoint(tmp_path)["inside"] is None


def test_checkpoints_by_time_inside_the_epoch(mnist_dir, tmp_path):
    config = _mnist(mnist_dir)

    def interrupt(epoch: int, batch: int) -> None:
        if (epoch, batch) == (2, 1):
            raise KeyboardInterrupt

    for every, steps in ((3600.0, 4), (1e-9, 6)):
        run_dir = tmp_path / f"every-{every:g}"
        cut = train(
            config,
            run_dir,
            quiet=True,
            figures=False,
            checkpoint_every=every,
            on_batch=interrupt,
        )
        assert cut.interrupted and cut.steps_done == steps
        assert not list(run_dir.glob(".*.tmp")), "a temporary file was left behind"
    run_dir = tmp_path / "every-1e-09"
    assert checkpoint(run_dir)["inside"]["batch"] == 2
    train({"epochs": 3}, run_dir, resume=True, quiet=True, figures=False)
    train(config, tmp_path / "reference", quiet=True, figures=False)
    assert_same_run(tmp_path / "reference", run_dir)


def test_a_checkpoint_saved_inside_an_epoch_by_two_processes_needs_two(mnist_dir, tmp_path):
    def interrupt(epoch: int, batch: int) -> None:
        if (epoch, batch) == (1, 1):
            raise KeyboardInterrupt

    train(_mnist(mnist_dir), tmp_path, quiet=True, checkpoint_steps=1, on_batch=interrupt)
    ckpt = checkpoint(tmp_path)
    ckpt["inside"]["task"] *= 2  # as if two processes had saved it
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="saved inside epoch 1 by 2 process"):
        train({}, tmp_path, resume=True, quiet=True)


def test_save_schedule_by_time_and_by_steps():
    now = [0.0]
    schedule = SaveSchedule(60.0, 20, DistInfo(), torch.device("cpu"), clock=lambda: now[0])
    due = []
    for step in range(1, 31):
        now[0] = 7.0 * step  # 7 s a step: 60 s pass in 9 steps
        save, stop = schedule.after_step(step, stop_requested=False)
        assert not stop
        if save:
            due.append(step)
            schedule.saved()
    assert due == [9, 18, 20, 29]
    assert schedule.after_step(31, stop_requested=True) == (True, True)
    off = SaveSchedule(0, None, DistInfo(), torch.device("cpu"), clock=lambda: 1e9)
    assert off.after_step(100, stop_requested=False) == (False, False)


# How long a test waits for a child process to reach a point (a first epoch, a checkpoint
# inside an epoch) or to exit: seconds on an idle machine, far longer on a loaded CI worker.
# Only a hung or broken child reaches it.
PATIENCE_S = 600

PTB_ARGS = [
    "run",
    "ptb",
    "--optim",
    "adabound",
    "--embed",
    "8",
    "--hidden",
    "8",
    "--layers",
    "2",
    "--dropout",
    "0.3",
    "--bptt",
    "5",
    "--device",
    "cpu",
    "--quiet",
]


def _kill_inside_an_epoch(proc: subprocess.Popen, run_dir: Path, min_epoch: int) -> dict:
    """Wait until the checkpoint is one saved inside epoch ``min_epoch`` or later, freeze the
    process (SIGSTOP, so that nothing is written between looking and killing), SIGKILL it
    and return that checkpoint."""
    deadline = time.monotonic() + PATIENCE_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        ckpt = _peek(run_dir)
        if ckpt and ckpt["inside"] and ckpt["inside"]["epoch"] >= min_epoch:
            os.kill(proc.pid, signal.SIGSTOP)
            ckpt = _peek(run_dir)
            if ckpt["inside"]:
                proc.kill()
                proc.wait()
                return ckpt
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError("no checkpoint inside an epoch appeared")


def _peek(run_dir: Path) -> dict | None:
    try:
        return checkpoint(run_dir)
    except FileNotFoundError:
        return None


def test_the_command_killed_from_outside_resumes_bit_identically(ptb_dir, tmp_path):
    args = [*PTB_ARGS, "--batch-size", "4", "--data-dir", str(ptb_dir), "--checkpoint-steps", "3"]
    killed = tmp_path / "killed"
    proc = command(*args, "--epochs", "1000", "--out", str(killed))
    try:
        ckpt = _kill_inside_an_epoch(proc, killed, min_epoch=2)
    finally:
        proc.kill()
        proc.wait()
    epochs = str(ckpt["inside"]["epoch"])
    assert main([*args, "--resume", "--epochs", epochs, "--out", str(killed)]) == 0
    assert main([*args, "--epochs", epochs, "--out", str(tmp_path / "reference")]) == 0
    assert_same_run(tmp_path / "reference", killed)
    assert not list(killed.glob(".*.tmp")) and not (killed / ".lock").exists()


def test_the_command_stopped_by_sigterm_says_where_and_resumes_bit_identically(ptb_dir, tmp_path):
    args = [*PTB_ARGS, "--batch-size", "4", "--data-dir", str(ptb_dir), "--checkpoint-every", "0"]
    cut = tmp_path / "cut"
    proc = command(*args, "--epochs", "1000", "--out", str(cut))
    deadline = time.monotonic() + PATIENCE_S
    while not read_metrics(cut / METRICS) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=PATIENCE_S)
    assert proc.returncode == 130, out
    ckpt = checkpoint(cut)
    assert f"interrupted: {cut / 'checkpoint.pt'} holds" in out and "--resume" in out
    assert f"(step {ckpt['global_step']})" in out
    epochs = str(ckpt["inside"]["epoch"] if ckpt["inside"] else ckpt["epoch"] + 1)
    assert main([*args, "--resume", "--epochs", epochs, "--out", str(cut)]) == 0
    assert main([*args, "--epochs", epochs, "--out", str(tmp_path / "reference")]) == 0
    assert_same_run(tmp_path / "reference", cut)


def test_two_processes_stopped_by_sigterm_agree_on_a_step_and_resume_bit_identically(
    ptb_dir, tmp_path
):
    # One stream per process and 2-step windows: 38 steps an epoch, so some of the steps at
    # which the ranks agree to stop (multiples of SYNC_STEPS) fall well inside epochs.
    args = [*PTB_ARGS, "--bptt", "2", "--batch-size", "2", "--data-dir", str(ptb_dir)]
    args += ["--threads", "1"]
    cut = tmp_path / "cut"
    procs = launch(*args, "--checkpoint-steps", "1", "--epochs", "1000", "--out", str(cut))
    deadline = time.monotonic() + PATIENCE_S
    while not read_metrics(cut / METRICS):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    per_epoch = read_metrics(cut / METRICS)[0]["steps"]
    while True:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        for p in procs:
            os.kill(p.pid, signal.SIGSTOP)
        # Saving every step keeps the ranks within a step of the checkpoint's; past an
        # epoch's end they may not have looked for a stop request yet.
        step = checkpoint(cut)["global_step"]
        agree = (step // SYNC_STEPS + 1) * SYNC_STEPS
        inside = step % per_epoch and agree - step >= 3 and agree // per_epoch == step // per_epoch
        if inside:
            for p in procs:
                p.send_signal(signal.SIGTERM)  # delivered when the process continues
        for p in procs:
            os.kill(p.pid, signal.SIGCONT)
        if inside:
            break
        time.sleep(0.01)
    finish(procs, code=130)
    ckpt = checkpoint(cut)
    assert ckpt["global_step"] == agree and len(ckpt["rng"]) == 2
    assert len(ckpt["inside"]["task"]) == 2
    epochs = str(ckpt["inside"]["epoch"])
    resume = [*args, "--resume", "--epochs", epochs, "--out", str(cut)]
    assert main(resume) == 2  # one process cannot take over two processes' states
    finish(launch(*resume))
    finish(launch(*args, "--epochs", epochs, "--out", str(tmp_path / "reference")))
    assert_same_run(tmp_path / "reference", cut)
