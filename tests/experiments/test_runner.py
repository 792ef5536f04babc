"""The training loop: exact resume, Ctrl-C, metrics files, DDP sharding and a 2-process run."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynabound.experiments.runner import (
    METRICS,
    build_config,
    load_run,
    read_metrics,
    train,
)
from dynabound.experiments.tasks import ClassificationTask, DistInfo

from .runs import assert_same_state, checkpoint, finish, launch, strip_timing


def _mnist_config(data: Path, optim: str = "adabound", epochs: int = 4) -> dict:
    return build_config(
        "mnist",
        optim,
        epochs=epochs,
        batch_size=16,
        data_dir=data,
        device="cpu",
        task_args={"hidden": 8},
    )


def _ptb_config(data: Path, epochs: int = 4, batch_size: int = 4) -> dict:
    return build_config(
        "ptb",
        "amsbound",
        epochs=epochs,
        batch_size=batch_size,
        data_dir=data,
        device="cpu",
        task_args={"embed": 8, "hidden": 8, "layers": 2, "dropout": 0.3, "bptt": 5},
    )


@pytest.mark.parametrize("kind", ["mnist", "ptb"])
def test_resume_is_bit_identical(kind, mnist_dir, ptb_dir, tmp_path):
    # PTB with dropout checks that the global RNG is restored, MNIST the data order.
    make = (
        (lambda e: _mnist_config(mnist_dir, epochs=e))
        if kind == "mnist"
        else (lambda e: _ptb_config(ptb_dir, epochs=e))
    )
    full = train(make(4), tmp_path / "full", quiet=True, figures=False)
    half = train(make(2), tmp_path / "half", quiet=True, figures=False)
    assert half.epochs_done == 2
    resumed = train({"epochs": 4}, tmp_path / "half", resume=True, quiet=True, figures=False)
    assert resumed.epochs_done == 4
    assert strip_timing(read_metrics(tmp_path / "half" / METRICS)) == strip_timing(full.metrics)
    assert_same_state(checkpoint(tmp_path / "full"), checkpoint(tmp_path / "half"))


def test_interrupt_mid_epoch_then_resume(mnist_dir, tmp_path):
    config = _mnist_config(mnist_dir, optim="sgdm", epochs=4)
    reference = train(config, tmp_path / "ref", quiet=True, figures=False)

    def interrupt(epoch: int, batch: int) -> None:
        if epoch == 3 and batch == 1:
            raise KeyboardInterrupt

    cut = train(config, tmp_path / "cut", quiet=True, on_batch=interrupt, figures=False)
    assert cut.interrupted and cut.epochs_done == 2
    assert checkpoint(tmp_path / "cut")["epoch"] == 2
    assert [m["epoch"] for m in read_metrics(tmp_path / "cut" / METRICS)] == [1, 2]
    assert not list((tmp_path / "cut").glob(".*.tmp")), "a temporary file was left behind"
    done = train(config, tmp_path / "cut", resume=True, quiet=True, figures=False)
    assert not done.interrupted
    assert strip_timing(done.metrics) == strip_timing(reference.metrics)
    assert_same_state(checkpoint(tmp_path / "ref"), checkpoint(tmp_path / "cut"))


def test_interrupt_in_first_epoch_leaves_resumable_run(mnist_dir, tmp_path):
    def interrupt(epoch: int, batch: int) -> None:
        raise KeyboardInterrupt

    config = _mnist_config(mnist_dir, epochs=1)
    assert train(config, tmp_path, quiet=True, on_batch=interrupt).interrupted
    assert checkpoint(tmp_path)["epoch"] == 0
    assert train(config, tmp_path, resume=True, quiet=True, figures=False).epochs_done == 1


def test_torn_metrics_line_after_kill_is_dropped_on_resume(mnist_dir, tmp_path):
    train(_mnist_config(mnist_dir, epochs=1), tmp_path, quiet=True, figures=False)
    with open(tmp_path / METRICS, "a") as fh:  # a kill while writing epoch 2's line
        fh.write('{"epoch": 2, "train_lo')
    result = train({"epochs": 2}, tmp_path, resume=True, quiet=True, figures=False)
    assert [m["epoch"] for m in read_metrics(tmp_path / METRICS)] == [1, 2]
    assert result.epochs_done == 2


def test_metrics_schema_and_run_directory(mnist_dir, tmp_path):
    result = train(_mnist_config(mnist_dir, epochs=2), tmp_path / "bound", quiet=True)
    config, metrics = load_run(tmp_path / "bound")
    assert config["optim"] == "adabound" and config["hparams"]["final_lr"] == 0.1
    assert metrics == json.loads(json.dumps(result.metrics))
    expected = {
        "epoch",
        "train_loss",
        "train_acc",
        "test_loss",
        "test_acc",
        "lr",
        "epoch_time",
        "time",
        "steps",
        "bounds",
        "bounds_by_step",
        "sign",
    }
    early = [[r["step"] for r in m["bounds_by_step"]] for m in metrics]
    assert early == [[1, 2, 4], [8]]  # 4 steps an epoch: the powers of two among 1..8
    for i, m in enumerate(metrics, start=1):
        assert set(m) == expected and m["epoch"] == i and m["steps"] == 4 * i
        assert 0 <= m["test_acc"] <= 100 and m["lr"] == pytest.approx(1e-3)
        b = m["bounds"]
        assert b["lower"] + b["upper"] + b["free"] == pytest.approx(1.0)
        assert b["step"] == m["steps"] and 0 < b["lower_bound"] < b["upper_bound"]
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "curves.png", "transition.png"):
        assert (tmp_path / "bound" / name).stat().st_size > 0, name
    plain = train(
        _mnist_config(mnist_dir, optim="adam", epochs=1),
        tmp_path / "adam",
        quiet=True,
        figures=False,
    )
    assert "bounds" not in plain.metrics[0]
    assert not (tmp_path / "adam" / "transition.png").exists()


def test_run_directory_is_not_overwritten_and_resume_checks_config(mnist_dir, tmp_path):
    config = _mnist_config(mnist_dir, epochs=1)
    train(config, tmp_path, quiet=True, figures=False)
    with pytest.raises(ValueError, match="already holds a run"):
        train(config, tmp_path, quiet=True)
    with pytest.raises(ValueError, match="batch_size"):
        train({"batch_size": 32}, tmp_path, resume=True, quiet=True)
    with pytest.raises(ValueError, match="nothing to resume"):
        train(config, tmp_path / "empty", resume=True, quiet=True)


def test_lr_milestones_decay_after_the_epoch(mnist_dir, tmp_path):
    config = build_config(
        "mnist",
        "sgdm",
        epochs=3,
        batch_size=32,
        data_dir=mnist_dir,
        device="cpu",
        milestones=[2],
        lr_decay=0.1,
        task_args={"hidden": 4},
    )
    metrics = train(config, tmp_path, quiet=True, figures=False).metrics
    assert [m["lr"] for m in metrics] == pytest.approx([0.1, 0.1, 0.01])


def test_distributed_shards_partition_each_global_batch():
    class Shards(ClassificationTask):
        pass

    n, batch, world = 64, 16, 2
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    config = {"batch_size": batch, "task_args": {}}
    shards = [
        Shards(config, torch.device("cpu"), DistInfo(r, world, r))._shard(perm)
        for r in range(world)
    ]
    local = batch // world
    for i in range(n // batch):
        together = torch.cat([s[i * local : (i + 1) * local] for s in shards])
        assert sorted(together.tolist()) == sorted(perm[i * batch : (i + 1) * batch].tolist())
    odd = [Shards(config, torch.device("cpu"), DistInfo(r, 3, r))._shard(perm) for r in range(3)]
    assert len({s.numel() for s in odd}) == 1  # padded like DistributedSampler
    assert set(torch.cat(odd).tolist()) == set(range(n))


def test_two_process_gloo_ddp_matches_single_process(ptb_dir, tmp_path):
    """What ``torchrun --nproc-per-node 2 -m dynabound.experiments run ptb`` does, on CPU."""
    args = [
        "run",
        "ptb",
        "--optim",
        "adabound",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--data-dir",
        str(ptb_dir),
        "--embed",
        "8",
        "--hidden",
        "8",
        "--bptt",
        "5",
        "--device",
        "cpu",
        "--quiet",
        "--threads",
        "1",
    ]
    finish(launch(*args, "--out", str(tmp_path / "ddp")))
    config = build_config(
        "ptb",
        "adabound",
        epochs=2,
        batch_size=4,
        data_dir=ptb_dir,
        device="cpu",
        task_args={"embed": 8, "hidden": 8, "bptt": 5},
    )
    single = train(config, tmp_path / "single", quiet=True, figures=False)
    ddp_metrics = read_metrics(tmp_path / "ddp" / METRICS)
    assert [m["epoch"] for m in ddp_metrics] == [1, 2]
    for a, b in zip(ddp_metrics, single.metrics, strict=True):
        for key in ("train_loss", "valid_loss", "test_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
        assert a["steps"] == b["steps"]
    ddp, ref = checkpoint(tmp_path / "ddp"), checkpoint(tmp_path / "single")
    assert len(ddp["rng"]) == 2  # both ranks' generators are saved
    for key, tensor in ref["model"].items():
        torch.testing.assert_close(ddp["model"][key], tensor, rtol=1e-4, atol=1e-6)
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["batch_size"] == 4


def test_a_run_directory_in_use_is_refused_and_a_stale_lock_is_taken_over(mnist_dir, tmp_path):
    config = _mnist_config(mnist_dir, epochs=1)
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / ".lock").write_text(str(os.getppid()))  # a live process
    with pytest.raises(ValueError, match="in use by process"):
        train(config, tmp_path, quiet=True, figures=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(str(dead.pid))
    assert train(config, tmp_path, quiet=True, figures=False).epochs_done == 1
    assert not (tmp_path / ".lock").exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_run_files_get_the_umasks_permissions(umask, mnist_dir, tmp_path):
    def interrupt(epoch: int, batch: int) -> None:
        if (epoch, batch) == (2, 1):
            raise KeyboardInterrupt

    previous = os.umask(umask)
    try:
        config = _mnist_config(mnist_dir, epochs=2)
        train(config, tmp_path, quiet=True, checkpoint_steps=1, on_batch=interrupt)
        assert checkpoint(tmp_path)["inside"] is not None  # written inside the epoch
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
        train({}, tmp_path, resume=True, quiet=True)  # rewrites all three, draws the figures
        modes_after = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    files = ("config.json", "metrics.jsonl", "checkpoint.pt", "environment.jsonl")
    assert modes == dict.fromkeys(files, expected)
    names = (*files, "curves.png", "transition.png")
    assert modes_after == dict.fromkeys(names, expected)


def test_every_start_and_resume_records_the_code_and_machine(mnist_dir, tmp_path):
    def interrupt(epoch: int, batch: int) -> None:
        if (epoch, batch) == (2, 1):
            raise KeyboardInterrupt

    config = _mnist_config(mnist_dir, epochs=2)
    first = train(config, tmp_path, quiet=True, checkpoint_steps=1, on_batch=interrupt)
    train({}, tmp_path, resume=True, quiet=True, figures=False)
    lines = (tmp_path / "environment.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["from_step"] for r in records] == [0, first.steps_done]
    for r in records:
        assert r["torch"] == torch.__version__ and r["threads"] == torch.get_num_threads()
        assert r["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
        assert r["device"] == "cpu" and r["processes"] == 1
        # The checkout's commit (this test runs from one), "+dirty" if the package differs.
        assert r["source"] is None or len(r["source"].split("+")[0]) == 40
