"""Run checkpoints load with ``torch.load(weights_only=True)``: a file that would run code
when unpickled is refused before anything in it runs, the generators still resume exactly,
and a checkpoint of the earlier format is converted only on request."""

from __future__ import annotations

import io
import os
import random
import zipfile
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from dynabound.experiments.cli import main
from dynabound.experiments.generators import rng_state, set_rng_state
from dynabound.experiments.rundir import (
    CHECKPOINT,
    FORMAT,
    FORMAT_1,
    DamagedCheckpointError,
    UnsafeCheckpointError,
    convert_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from dynabound.experiments.runner import build_config, restore, train

from .runs import assert_same_run

CPU = torch.device("cpu")


class _Payload:
    """Unpickled in full, this creates ``marker``: what a hostile checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _hostile_run(run_dir: Path) -> Path:
    """A run directory whose checkpoint carries the payload among ordinary entries."""
    marker = run_dir.parent / f"{run_dir.name}-payload-ran"
    run_dir.mkdir()
    save_checkpoint(run_dir, {"epoch": 1, "rng": [_Payload(marker)]})
    return marker


def _convex(epochs: int = 2) -> dict:
    return build_config("convex", "adam", epochs=epochs, task_args={"steps_per_epoch": 30})


def _stopped_run(run_dir: Path, config: dict, stop_at: int) -> None:
    """``config`` trained until a stop after optimizer step ``stop_at``, saving every 7 steps
    (the checkpoint holds step ``stop_at // 7 * 7``, inside an epoch)."""
    steps = 0

    def on_batch(epoch: int, batch: int) -> None:
        nonlocal steps
        steps += 1
        if steps == stop_at:
            raise KeyboardInterrupt

    result = train(
        config,
        run_dir,
        quiet=True,
        figures=False,
        checkpoint_every=0,
        checkpoint_steps=7,
        on_batch=on_batch,
    )
    assert result.interrupted


def _as_format_1(run_dir: Path) -> None:
    """Rewrite a checkpoint as the earlier harness wrote it: numpy's and Python's generator
    states as the tuples numpy and ``random`` return."""
    path = run_dir / CHECKPOINT
    ckpt = torch.load(path, weights_only=True)
    for state in ckpt["rng"]:
        n, p = state["numpy"], state["python"]
        state["numpy"] = (
            n["algorithm"],
            n["key"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
        state["python"] = (p["version"], tuple(p["internal"]), p["gauss_next"])
    ckpt["format"] = FORMAT_1
    torch.save(ckpt, path)


def _plain(value, where: str = "checkpoint") -> None:
    """Only tensors, numbers, strings, None, lists, tuples and dicts (a scheduler's
    milestones are a Counter, which torch's weights-only loader accepts)."""
    if isinstance(value, dict):
        assert type(value) in (dict, OrderedDict, Counter), (where, type(value))
        for key, item in value.items():
            assert isinstance(key, str | int), (where, key)
            _plain(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        assert type(value) in (list, tuple), where
        for i, item in enumerate(value):
            _plain(item, f"{where}[{i}]")
    else:
        assert value is None or type(value) in (torch.Tensor, bool, int, float, str), (
            where,
            type(value),
        )


# --- a hostile file is refused before anything in it runs -------------------------------------


def test_loading_a_checkpoint_carrying_code_refuses_it_without_running_it(tmp_path):
    run_dir = tmp_path / "shared"
    marker = _hostile_run(run_dir)
    with pytest.raises(UnsafeCheckpointError) as caught:
        load_checkpoint(run_dir / CHECKPOINT)
    message = str(caught.value)
    assert str(run_dir / CHECKPOINT) in message
    assert "cannot be loaded safely" in message and "posix.system" in message
    assert f"dynabound convert-checkpoint {run_dir} --trust" in message
    with pytest.raises(UnsafeCheckpointError):
        train({"epochs": 2}, run_dir, resume=True, quiet=True, figures=False)
    with pytest.raises(UnsafeCheckpointError):
        restore(run_dir)
    assert not marker.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "convex", "--resume", "--out", "{run}"],
        ["probe", "{run}"],
        ["convert-checkpoint", "{run}"],
    ],
    ids=["resume", "probe", "convert-without-trust"],
)
def test_the_commands_refuse_a_checkpoint_carrying_code(argv, tmp_path, capsys):
    run_dir = tmp_path / "shared"
    marker = _hostile_run(run_dir)
    (run_dir / "config.json").write_text('{"task": "convex", "optim": "adam"}')
    assert main([a.format(run=run_dir) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "cannot be loaded safely" in err and str(run_dir / CHECKPOINT) in err
    assert not marker.exists()
    assert not (run_dir / ".lock").exists()


# --- a damaged file is said to be damaged, never taken for one carrying code -------------------


def _foreign_zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "not a checkpoint")


def _broken_pickle(path: Path) -> None:
    """torch.save's archive with its pickled data replaced by bytes that are no pickle."""
    source = zipfile.ZipFile(io.BytesIO(path.read_bytes()))
    with zipfile.ZipFile(path, "w") as archive:
        for info in source.infolist():
            data = source.read(info)
            archive.writestr(
                info, b"\x80\x02garbage" if info.filename.endswith("data.pkl") else data
            )


DAMAGE = {
    "truncated": (
        lambda p: p.write_bytes(p.read_bytes()[:5000]),
        "is truncated: a zip archive that stops after 5000 bytes",
    ),
    "text": (lambda p: p.write_text("garbage\n"), "is not a checkpoint: torch.save writes a zip"),
    "empty": (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    "foreign_zip": (_foreign_zip, "is a zip archive that torch.save did not write"),
    "broken_pickle": (_broken_pickle, "holds data that cannot be unpickled"),
}


def _damaged_run(tmp_path: Path, damage: str) -> Path:
    run_dir = tmp_path / damage
    _stopped_run(run_dir, _convex(), stop_at=10)
    DAMAGE[damage][0](run_dir / CHECKPOINT)
    return run_dir


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_named_and_told_apart_from_an_unsafe_one(damage, tmp_path):
    run_dir = _damaged_run(tmp_path, damage)
    path = run_dir / CHECKPOINT
    for load in (
        lambda: load_checkpoint(path),
        lambda: convert_checkpoint(run_dir),
        lambda: convert_checkpoint(run_dir, trust=True),
        lambda: train({"epochs": 2}, run_dir, resume=True, quiet=True, figures=False),
        lambda: restore(run_dir),
    ):
        with pytest.raises(DamagedCheckpointError) as caught:
            load()
        assert not isinstance(caught.value, UnsafeCheckpointError)
        message = str(caught.value)
        assert message.startswith(f"damaged checkpoint: {path} {DAMAGE[damage][1]}"), message
        assert "with or without --trust" in message and "cannot be loaded safely" not in message
    assert not (run_dir / ".lock").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "convex", "--resume", "--out", "{run}"],
        ["convert-checkpoint", "{run}"],
        ["convert-checkpoint", "{run}", "--trust"],
    ],
    ids=["resume", "convert", "convert-trust"],
)
def test_the_commands_say_in_one_line_which_file_is_damaged(argv, tmp_path, capsys):
    run_dir = _damaged_run(tmp_path, "truncated")
    before = (run_dir / CHECKPOINT).read_bytes()
    capsys.readouterr()  # the stopped run's own message
    assert main([a.format(run=run_dir) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    prog = "dynabound " + argv[0]
    assert err == [
        f"{prog}: error: damaged checkpoint: {run_dir / CHECKPOINT} is truncated: a zip archive "
        "that stops after 5000 bytes, without the directory that ends one. It cannot be "
        "loaded, with or without --trust; restore it from a copy, or start the run again "
        "with another --out"
    ]
    assert (run_dir / CHECKPOINT).read_bytes() == before


def test_a_checkpoint_of_another_kind_says_what_it_holds(tmp_path):
    run_dir = tmp_path / "other"
    _stopped_run(run_dir, _convex(), stop_at=10)
    torch.save({"model": {}, "epoch": 3}, run_dir / CHECKPOINT)
    message = (
        f"{run_dir / CHECKPOINT} is not a dynabound run checkpoint (it holds a dict with keys "
        "model, epoch and no format entry)"
    )
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_checkpoint(run_dir / CHECKPOINT)
    torch.save([1, 2], run_dir / CHECKPOINT)
    with pytest.raises(ValueError, match=r"not a dynabound run checkpoint \(it holds a list\)"):
        convert_checkpoint(run_dir)


def test_a_checkpoint_whose_contents_do_not_fit_its_run_is_damaged(tmp_path):
    run_dir = tmp_path / "swapped"
    _stopped_run(run_dir, _convex(), stop_at=10)
    ckpt = torch.load(run_dir / CHECKPOINT, weights_only=True)
    del ckpt["scheduler"]
    torch.save(ckpt, run_dir / CHECKPOINT)
    with pytest.raises(DamagedCheckpointError, match="does not fit the run it belongs to"):
        train({"epochs": 2}, run_dir, resume=True, quiet=True, figures=False)


def test_a_damaged_config_is_named(tmp_path, capsys):
    run_dir = tmp_path / "cfg"
    _stopped_run(run_dir, _convex(), stop_at=10)
    (run_dir / "config.json").write_text('{"task": "convex", "optim"')
    capsys.readouterr()
    assert main(["run", "convex", "--resume", "--out", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"{run_dir / 'config.json'} is damaged: it is not valid JSON" in err


# --- what a checkpoint holds, and the generators' exact round trip -----------------------------


def test_a_checkpoint_holds_only_plain_data_and_loads_weights_only(tmp_path):
    config = build_config("digits", "adabound", epochs=1, device="cpu", task_args={"hidden": 8})
    _stopped_run(tmp_path / "run", config, stop_at=10)
    ckpt = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    assert ckpt["format"] == FORMAT == "dynabound-run/2"
    assert ckpt["inside"]["batch"] == 7 and len(ckpt["inside"]["bounds_by_step"]) == 3
    _plain(ckpt)


def test_numpy_and_python_generator_states_round_trip_exactly_through_a_checkpoint(tmp_path):
    np.random.seed(12345)
    random.seed(678)
    np.random.standard_normal()  # leaves a cached Gaussian: has_gauss = 1
    random.gauss(0.0, 1.0)  # leaves gauss_next set
    np_before, py_before = np.random.get_state(), random.getstate()
    assert np_before[3] == 1 and py_before[2] is not None
    save_checkpoint(tmp_path, {"rng": [rng_state(CPU)]})

    np.random.seed(0)
    random.seed(0)
    set_rng_state(load_checkpoint(tmp_path / CHECKPOINT)["rng"][0], CPU)
    np_after, py_after = np.random.get_state(), random.getstate()
    assert np_after[0] == np_before[0] and np_after[1].dtype == np.uint32
    assert np.array_equal(np_after[1], np_before[1])
    assert np_after[2:] == np_before[2:]
    assert py_after == py_before
    drawn = (np.random.standard_normal(5).tolist(), [random.gauss(0.0, 1.0) for _ in range(5)])
    np.random.set_state(np_before)
    random.setstate(py_before)
    assert drawn == (np.random.standard_normal(5).tolist(), [random.gauss(0, 1) for _ in range(5)])


# --- the earlier format: refused, then converted on request ------------------------------------


def test_a_checkpoint_of_the_earlier_format_is_refused_then_converted_and_resumes_exactly(
    tmp_path, capsys
):
    config = _convex()
    run_dir = tmp_path / "old"
    _stopped_run(run_dir, config, stop_at=40)  # saved at step 35, inside epoch 2
    _as_format_1(run_dir)
    old_bytes = (run_dir / CHECKPOINT).read_bytes()

    with pytest.raises(UnsafeCheckpointError, match="numpy"):
        train({"epochs": 2}, run_dir, resume=True, quiet=True, figures=False)
    with pytest.raises(UnsafeCheckpointError):
        convert_checkpoint(run_dir)
    assert (run_dir / CHECKPOINT).read_bytes() == old_bytes

    assert main(["convert-checkpoint", str(tmp_path), "--trust"]) == 0
    assert f"{run_dir / CHECKPOINT}: converted to {FORMAT}" in capsys.readouterr().out
    assert load_checkpoint(run_dir / CHECKPOINT)["global_step"] == 35
    assert not (run_dir / ".lock").exists()
    assert convert_checkpoint(run_dir, trust=True) is False  # already current

    result = train({"epochs": 2}, run_dir, resume=True, quiet=True, figures=False)
    assert not result.interrupted and result.epochs_done == 2
    train(config, tmp_path / "reference", quiet=True, figures=False)
    assert_same_run(tmp_path / "reference", run_dir)


def test_conversion_leaves_a_run_in_use_alone(tmp_path):
    run_dir = tmp_path / "busy"
    _stopped_run(run_dir, _convex(), stop_at=10)
    _as_format_1(run_dir)
    (run_dir / ".lock").write_text(str(os.getppid()))  # a live process other than this one
    with pytest.raises(ValueError, match="in use by process"):
        convert_checkpoint(run_dir, trust=True)
    assert torch.load(run_dir / CHECKPOINT, weights_only=False)["format"] == FORMAT_1
