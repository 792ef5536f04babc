"""`dynabound plot --against`: final test metric against each optimizer's hyperparameter."""

from __future__ import annotations

import json

import pytest

from dynabound.experiments.cli import main
from dynabound.experiments.plots import plot_sensitivity


def write_run(path, optim, hparams, accuracies):
    path.mkdir(parents=True)
    config = {"task": "mnist", "optim": optim, "hparams": hparams, "epochs": len(accuracies)}
    (path / "config.json").write_text(json.dumps(config))
    lines = [json.dumps({"epoch": i + 1, "test_acc": a}) for i, a in enumerate(accuracies)]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def study(tmp_path):
    for lr, acc in [(0.01, [90, 97]), (0.1, [95, 98]), (1.0, [50, 10])]:
        write_run(tmp_path / f"sgdm-{lr}", "sgdm", {"lr": lr}, acc)
    for final_lr, acc in [(0.01, [96, 97.5]), (1.0, [97, 97.4])]:
        write_run(tmp_path / f"adabound-{final_lr}", "adabound",
                  {"lr": 1e-3, "final_lr": final_lr}, acc)  # fmt: skip
    return tmp_path


def test_plot_against_draws_one_figure(study, capsys):
    out = study / "sensitivity.png"
    assert main(["plot", str(study), "--against", "sgdm=lr", "adabound=final_lr",
                 "--out", str(out)]) == 0  # fmt: skip
    assert out.stat().st_size > 1000
    assert str(out) in capsys.readouterr().out


def test_a_run_without_its_optimizer_in_against_is_refused(study):
    with pytest.raises(ValueError, match="no --against given for adabound"):
        plot_sensitivity(sorted(study.glob("*-*")), study / "x.png", {"sgdm": "lr"})


def test_a_missing_hyperparameter_is_refused(study):
    with pytest.raises(ValueError, match="no hyperparameter 'gamma'"):
        plot_sensitivity(sorted(study.glob("adabound-*")), study / "x.png", {"adabound": "gamma"})


def test_against_needs_pairs(study, capsys):
    assert main(["plot", str(study), "--against", "sgdm"]) != 0
    assert "OPTIM=KEY" in capsys.readouterr().err
