"""`dynabound plot --against`: final test metric against each optimizer's hyperparameter,
or against the effective SGD step."""

from __future__ import annotations

import json

import pytest
import torch

from dynabound.experiments.cli import main
from dynabound.experiments.optimizers import effective_sgd_step
from dynabound.experiments.plots import plot_sensitivity
from dynabound.experiments.sensitivity import (
    EFFECTIVE_STEP,
    sensitivity_points,
    sensitivity_table,
)


def write_run(path, optim, hparams, accuracies, seed=0):
    path.mkdir(parents=True)
    config = {
        "task": "mnist",
        "optim": optim,
        "hparams": hparams,
        "epochs": len(accuracies),
        "seed": seed,
    }
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


@pytest.mark.parametrize(
    ("optim", "hparams", "step", "formula"),
    [
        ("sgdm", {"lr": 0.1, "momentum": 0.9}, 1.0, "lr/(1-momentum)"),
        ("sgdm", {"lr": 0.1}, 1.0, "lr/(1-momentum)"),  # the harness's momentum 0.9
        ("sgdm", {"lr": 0.3, "momentum": 0.5}, 0.6, "lr/(1-momentum)"),
        ("sgdm", {"lr": 0.1, "momentum": 0.8, "dampening": 0.4}, 0.3, None),
        ("sgdm", {"lr": 0.1, "momentum": 0.0, "dampening": 0.5}, 0.1, "lr"),  # torch ignores it
        ("sgdm-damped", {"lr": 0.1, "momentum": 0.9, "dampening": 0.9}, 0.1, "lr"),
        ("sgdm-damped", {"lr": 0.1, "momentum": 0.5}, 0.1, "lr"),  # dampening = momentum
        ("sgdm-damped", {"lr": 2.0, "momentum": 0.99, "dampening": 0.9}, 20.0, None),
        ("adabound", {"lr": 1e-3, "final_lr": 0.3, "gamma": 1e-3}, 0.3, "final_lr"),
        ("amsboundw", {"lr": 1e-2, "final_lr": 3.0}, 3.0, "final_lr"),
    ],
)
def test_effective_step_is_the_steady_state_step_per_unit_gradient(optim, hparams, step, formula):
    x, text = effective_sgd_step(optim, hparams)
    assert x == pytest.approx(step, rel=1e-12)
    assert text == (formula or "lr(1-dampening)/(1-momentum)")


@pytest.mark.parametrize(
    ("momentum", "dampening"), [(0.9, 0.0), (0.9, 0.9), (0.7, 0.3), (0.5, 0.2)]
)
def test_effective_step_is_what_torch_sgd_steps_under_a_constant_gradient(momentum, dampening):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.01, momentum=momentum, dampening=dampening)
    for _ in range(2000):
        before = p.detach().clone()
        p.grad = torch.ones(1)
        opt.step()
    x, _ = effective_sgd_step("sgdm", {"lr": 0.01, "momentum": momentum, "dampening": dampening})
    assert float(before - p.detach()) == pytest.approx(x, rel=1e-4)


def test_methods_without_an_sgd_regime_have_no_effective_step():
    with pytest.raises(ValueError, match="Adam has no effective SGD step"):
        effective_sgd_step("adam", {"lr": 1e-3})
    with pytest.raises(ValueError, match="divided by sqrt"):
        effective_sgd_step("adabound", {"final_lr": 0.1, "bounds": "paper"})


@pytest.fixture
def matched(tmp_path):
    """SGDM, dampened SGDM and AdaBound, three seeds each at two settings."""
    for seed in (1, 2, 3):
        for lr in (0.01, 0.1):
            write_run(tmp_path / f"sgdm-{lr}-{seed}", "sgdm", {"lr": lr, "momentum": 0.9},
                      [97, 98 + lr + seed / 100], seed)  # fmt: skip
            damped = {"lr": lr, "momentum": 0.9, "dampening": 0.9}
            write_run(tmp_path / f"damped-{lr}-{seed}", "sgdm-damped", damped, [97, 98 - lr], seed)
        for final_lr in (0.1, 1.0):
            write_run(tmp_path / f"adabound-{final_lr}-{seed}", "adabound",
                      {"lr": 1e-3, "final_lr": final_lr, "gamma": 1e-3},
                      [97, 98.2 - final_lr / 2], seed)  # fmt: skip
    return tmp_path


def test_effective_step_puts_every_method_on_one_axis(matched):
    points = sensitivity_points(sorted(matched.iterdir()), EFFECTIVE_STEP)
    assert [(p.optim, round(p.x, 12)) for p in points] == [  # methods in the runs' order
        ("adabound", 0.1), ("adabound", 1.0),
        ("sgdm-damped", 0.01), ("sgdm-damped", 0.1),
        ("sgdm", 0.1), ("sgdm", 1.0),
    ]  # fmt: skip
    sgdm = next(p for p in points if p.optim == "sgdm" and p.value == 0.1)
    assert sgdm.x == pytest.approx(1.0) and sgdm.key == "lr" and sgdm.seeds == (1, 2, 3)
    assert sgdm.final["mean"] == pytest.approx(98.12) and sgdm.final["min"] == 98.11
    table = sensitivity_table(points)
    assert "| SGDM | 1 (lr/(1-momentum)) | lr = 0.1 | 3 | 98.12 ± 0.01 |" in table
    assert table.splitlines()[2].endswith("| 1: 98.15, 2: 98.15, 3: 98.15 | 2 |")
    assert "| AdaBound | 1 (final_lr) | final_lr = 1 | 3 | 97.70 ± 0.00 |" in table


def test_plot_against_effective_step_draws_the_figure_and_prints_the_table(matched, capsys):
    out = matched / "effective.png"
    assert main(["plot", str(matched), "--against", "effective-step", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "effective SGD step" in printed and str(out) in printed
    figure = plot_sensitivity(sorted(matched.glob("sgdm-*")), matched / "x.png", EFFECTIVE_STEP)
    assert figure.stat().st_size > 1000


def test_effective_step_refuses_a_method_without_one_and_mixed_arguments(matched, capsys):
    write_run(matched / "adam", "adam", {"lr": 1e-3}, [97, 98])
    assert main(["plot", str(matched), "--against", "effective-step"]) == 2
    assert "Adam has no effective SGD step" in capsys.readouterr().err
    assert main(["plot", str(matched), "--against", "effective-step", "sgdm=lr"]) == 2
    assert "takes no OPTIM=KEY pairs" in capsys.readouterr().err
