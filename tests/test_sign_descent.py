"""The sign-descent measures: sign_alignment on known updates, SignMonitor on optimizers,
and their record in the harness's runs."""

from __future__ import annotations

import math

import pytest
import torch

import dynabound
from dynabound.diagnostics import SIGN_KEYS, SignMonitor, sign_alignment
from dynabound.experiments.cli import main
from dynabound.experiments.comparators import SignSGD
from dynabound.experiments.runner import read_metrics


def _gradient() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(40) * torch.linspace(0.1, 5.0, 40)  # uneven sizes


def test_sign_descent_scores_one():
    g = _gradient()
    values = sign_alignment([-1e-3 * torch.sign(g)], [g], [1e-3])
    assert values["sign_cosine"] == pytest.approx(1.0)
    assert values["near_lr"] == 1.0
    assert values["grad_cosine"] < 0.95


def test_sgd_on_an_uneven_gradient_is_less_sign_like():
    g = _gradient()
    values = sign_alignment([-0.1 * g], [g], [0.1])
    expected = float(g.abs().sum() / (g.numel() ** 0.5 * g.norm()))
    assert values["sign_cosine"] == pytest.approx(expected) and expected < 0.95
    assert values["grad_cosine"] == pytest.approx(1.0)
    # A gradient with one size everywhere is where the two views agree.
    flat = torch.full((10,), 0.3) * torch.sign(torch.randn(10))
    assert sign_alignment([-0.1 * flat], [flat], [0.1])["sign_cosine"] == pytest.approx(1.0)


def test_near_lr_counts_each_parameters_own_lr_and_a_factor_of_two():
    step = torch.tensor([-1.0, -2.0, -2.1, -0.5, -0.49, 0.0])
    values = sign_alignment([step[:3], step[3:]], [torch.ones(3), torch.ones(3)], [1.0, 1.0])
    assert values["near_lr"] == pytest.approx(3 / 6)
    assert math.isnan(sign_alignment([torch.zeros(2)], [torch.ones(2)], [1.0])["sign_cosine"])
    with pytest.raises(ValueError, match="one step, gradient and lr per parameter"):
        sign_alignment([], [], [])


def _train(optimizer_factory, steps=20, every=1):
    torch.manual_seed(1)
    model = torch.nn.Linear(8, 3)
    opt = optimizer_factory(model.parameters())
    monitor = SignMonitor(opt, every=every)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    monitor.remove()
    return monitor


def test_monitor_on_optimizers_at_either_end():
    sign = _train(lambda p: SignSGD(p, lr=1e-3)).summary()
    assert sign["sign_cosine"] == pytest.approx(1.0) and sign["near_lr"] == pytest.approx(1.0)
    sgd = _train(lambda p: torch.optim.SGD(p, lr=0.1)).summary()
    assert sgd["grad_cosine"] == pytest.approx(1.0) and sgd["sign_cosine"] < 0.99
    # Adam's first step is lr * g / (|g| + eps): sign descent, as Ma, Wu and E describe.
    adam = _train(lambda p: torch.optim.Adam(p, lr=1e-3), steps=1).summary()
    assert adam["sign_cosine"] == pytest.approx(1.0, abs=1e-6)
    # AdaBound late in its run, bounds closed on final_lr, is SGD with momentum: far from it.
    late = _train(lambda p: dynabound.AdaBound(p, lr=1e-3, final_lr=0.1, gamma=10.0), steps=60)
    assert late.summary()["near_lr"] < 0.5


def test_monitor_measures_every_nth_step_and_resumes():
    whole = _train(lambda p: torch.optim.Adam(p, lr=1e-2), steps=20, every=3)
    assert whole.summary()["measured_steps"] == 6
    assert set(SIGN_KEYS) <= set(whole.summary())
    with pytest.raises(ValueError, match="every must be a positive integer"):
        SignMonitor(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), every=0)


def test_runs_record_it_and_plot_draws_it(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "digits", "--optims", "adam", "adabound", "signum", "--epochs", "1"]
    assert main([*argv, "--quiet", "--out", str(out)]) == 0
    metrics = read_metrics(out / "adam" / "metrics.jsonl")
    assert set(SIGN_KEYS) <= set(metrics[0]["sign"]) and metrics[0]["sign"]["measured_steps"] > 0
    signum = read_metrics(out / "signum" / "metrics.jsonl")
    # Signum steps by the sign of its momentum, not of this step's gradient: every element
    # still moves by lr, but for the weights of the digits' always-blank pixels (no gradient).
    assert signum[-1]["sign"]["near_lr"] > 0.75
    assert main(["plot", str(out), "--out", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "sign-descent.png").stat().st_size > 10_000
    assert "sign-descent.png" in capsys.readouterr().out
    quiet = tmp_path / "none"
    assert main([*argv[:3], "adam", "--epochs", "1", "--no-bounds-record", "--quiet",
                 "--out", str(quiet)]) == 0  # fmt: skip
    assert "sign" not in read_metrics(quiet / "adam" / "metrics.jsonl")[0]
