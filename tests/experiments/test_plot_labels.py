"""Legend labels of runs of one optimizer, and lines that coincide."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynabound.experiments.plots import run_label


def config(**hparams):
    return {"task": "mnist", "optim": "adabound", "hparams": {"lr": 1e-3, **hparams}}


def test_named_and_missing_hyperparameters_label_their_runs():
    default, bf16, eight = config(), config(state_dtype="bfloat16"), config(state_dtype="8bit")
    runs = [default, bf16, eight]
    assert run_label(default, runs) == "AdaBound (state_dtype=default)"
    assert run_label(bf16, runs) == "AdaBound (state_dtype=bfloat16)"
    assert run_label(eight, runs) == "AdaBound (state_dtype=8bit)"


def test_numbers_stay_compact():
    a, b = config(final_lr=0.1), config(final_lr=0.03)
    assert run_label(a, [a, b]) == "AdaBound (final_lr=0.1)"


def test_runs_that_share_a_label_get_their_run_names():
    from dynabound.experiments.plots import run_labels

    a, b, c = config(), config(), config(final_lr=0.03)
    c["optim"] = "amsbound"
    assert run_labels([a, b, c], ["runs/first", "runs/second", "runs/third"]) == [
        "AdaBound (first)",
        "AdaBound (second)",
        "AMSBound",
    ]
    # Run directories of the same name are told apart by their parents.
    assert run_labels([a, b], ["x/adabound", "y/adabound"]) == [
        "AdaBound (x-adabound)",
        "AdaBound (y-adabound)",
    ]


def _drawn_lines(monkeypatch, tmp_path, optims, epochs):
    """The lines plot_runs draws for runs of ``optims`` with identical metrics."""
    import json

    from dynabound.experiments import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or Path(path))
    dirs = []
    for i, optim in enumerate(optims):
        d = tmp_path / f"{optim}-{i}"
        d.mkdir()
        cfg = {**config(), "optim": optim, "seed": 0, "task_args": {}}
        (d / "config.json").write_text(json.dumps(cfg))
        rows = [{"epoch": e, "train_acc": 50 + e, "test_acc": 40 + e} for e in range(1, epochs)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        dirs.append(d)
    plots.plot_runs(dirs, tmp_path / "curves.png", band=None)
    return figures[0].axes[0].get_lines()


def _look(line):
    every = line.get_markevery()
    return line.get_linestyle(), line.get_marker(), every if every is None else tuple(every)


@pytest.mark.parametrize("epochs", [6, 200])
def test_lines_that_coincide_stay_visible(monkeypatch, tmp_path, epochs):
    """The demo's six optimizers, all on one curve: every line differs from every other in
    its dashes, its marker or where its markers sit, and its markers are hollow."""
    optims = ["sgdm", "adagrad", "adam", "amsgrad", "adabound", "amsbound"]
    lines = _drawn_lines(monkeypatch, tmp_path, optims, epochs)
    looks = [_look(line) for line in lines]
    assert len(set(looks)) == len(optims), looks
    assert {line.get_fillstyle() for line in lines} == {"none"}
    by_name = dict(zip([line.get_label() for line in lines], looks, strict=True))
    assert by_name["AMSBound"][0] != by_name["AdaBound"][0]  # dashed over solid
    assert by_name["AMSGrad"][0] != by_name["Adam"][0]
    if epochs > 12:  # markers on a few points, at other points for each line
        assert len({look[2][0] for look in looks}) == len(optims)
