"""The convex task's section3 problem (the AdaBound paper's Section 3 example): its piecewise
losses and gradients, the theorem's condition, the best fixed point and the regret, and what
the four optimizers do on it."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from dynabound.experiments.runner import build_config, train
from dynabound.experiments.tasks.convex import (
    SECTION3_LOW,
    ConvexTask,
    best_fixed_point,
    section3_condition,
    section3_gradient,
    section3_loss,
    section3_min_period,
)

from .runs import assert_same_run

# x on every piece and on every seam of F = [-1, 1], and beyond it on the right.
POINTS = [-1.0, -0.5, -1e-12, 0.0, 1e-12, 0.3, 1.0, 1.5]


def _section3(optim, tmp_path, steps, epochs=1, hparams=None, **task_args):
    config = build_config(
        "convex",
        optim,
        epochs=epochs,
        device="cpu",
        hparams=hparams,
        task_args={"problem": "section3", "steps_per_epoch": steps, **task_args},
    )
    return train(config, tmp_path, quiet=True, figures=False).metrics


def _xs(metrics):
    # Runs of at most 200 steps an epoch keep every x_t in their trace.
    return [x for m in metrics for x in m["trace_x"]]


@pytest.mark.parametrize("slope", [-1.0, 2.0, 0.0])
def test_section3_loss_and_gradient_on_each_piece_and_seam(slope):
    x = torch.tensor(POINTS, dtype=torch.float64)
    a = torch.full_like(x, slope)
    low = SECTION3_LOW
    expected_loss = [low, low, low, 0.0, slope * 1e-12, slope * 0.3, slope, 0.0]
    assert section3_loss(a, x).tolist() == pytest.approx(expected_loss, abs=0, rel=1e-15)
    # x = 0 belongs to the middle piece (its value is 0, not -100), and so does its
    # gradient: the right derivative. Flat on x < 0 and beyond 1.
    expected_grad = [0.0, 0.0, 0.0, slope, slope, slope, slope, 0.0]
    assert section3_gradient(a, x).tolist() == expected_grad


def test_section3_gradients_come_once_a_period_in_order():
    task = ConvexTask(
        {"task_args": {"problem": "section3", "period": 7}}, torch.device("cpu"), None
    )
    g = task.gradients(1, 21).tolist()
    assert g == [-1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0] * 3  # t mod 7 == 1, then t mod 7 == 2
    assert task.gradients(8, 2).tolist() == [-1.0, 2.0]
    default = ConvexTask({"task_args": {"problem": "section3"}}, torch.device("cpu"), None)
    assert len(default.sequence) == 50 and default.sequence.sum() == 1


def test_section3_condition_and_smallest_period():
    assert section3_condition(50, 0.9) and not section3_condition(49, 0.9)
    for beta2 in (0.0, 0.1, 0.5, 0.9, 0.99, 0.999):
        period = section3_min_period(beta2)
        brute = next(c for c in range(3, 100_000) if section3_condition(c, beta2))
        assert period == brute, beta2
    assert section3_min_period(0.9) == 50 and section3_min_period(0.1) == 4
    with pytest.raises(ValueError, match="beta2"):
        section3_min_period(1.0)


def test_section3_defaults_satisfy_the_condition_and_violations_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the defaults must not warn
        config = build_config("convex", "adam", task_args={"problem": "section3"})
    assert (config["hparams"]["beta1"], config["hparams"]["beta2"]) == (0.0, 0.9)
    bounded = build_config("convex", "amsbound", task_args={"problem": "section3"})["hparams"]
    assert bounded["final_lr"] == 0.5 and bounded["bounds"] == "paper"
    with pytest.warns(UserWarning, match="smallest period for this beta2 is 50"):
        build_config("convex", "adam", task_args={"problem": "section3", "period": 49})
    with pytest.warns(UserWarning, match="smallest period for this beta2 is 730"):
        build_config(
            "convex", "amsgrad", hparams={"beta2": 0.99}, task_args={"problem": "section3"}
        )
    with pytest.warns(UserWarning, match="beta1 is 0.9"):
        build_config("convex", "adam", hparams={"beta1": 0.9}, task_args={"problem": "section3"})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"C": 3.0}, "takes no --C"),
        ({"slope": 1.0}, "takes no --slope"),
        ({"sequence": "1,-1"}, "takes no --sequence"),
        ({"period": 2}, "period >= 3"),
    ],
)
def test_section3_refuses_options_that_do_not_apply(args, message):
    with pytest.raises(ValueError, match=message):
        build_config("convex", "adam", task_args={"problem": "section3", **args})


def test_best_fixed_point_piece_by_piece_against_a_grid():
    # Summed section3 losses over a grid of F, for prefixes of a sequence of slopes that
    # includes a leading -1 run (where x = 1 beats x = 0 on [0, 1]).
    slopes = torch.tensor([-1.0, -1.0, 2.0, 0.0, -1.0, 2.0, 2.0, 0.0], dtype=torch.float64)
    grid = torch.linspace(-1, 1, 2001, dtype=torch.float64)
    for n in range(1, len(slopes) + 1):
        a = slopes[:n]
        totals = section3_loss(a[:, None], grid[None, :]).sum(0)
        point, value = best_fixed_point(a.sum(), torch.tensor(float(n)), piecewise=True)
        assert value == totals.min() == SECTION3_LOW * n  # any x < 0: -100 a step
        assert point < 0
        assert section3_loss(a, point.expand(n)).sum() == value
    zero_steps = best_fixed_point(torch.tensor(0.0), torch.tensor(0.0), piecewise=True)[1]
    assert zero_steps == 0
    # Linear losses: the end of F against the summed gradient.
    for total, point in ((3.0, -1.0), (-2.0, 1.0)):
        p, v = best_fixed_point(torch.tensor(total), torch.tensor(5.0), piecewise=False)
        assert (p, v) == (point, -abs(total))


@pytest.mark.filterwarnings("ignore:section3 outside the theorem")
def test_section3_regret_is_against_the_best_fixed_point(tmp_path):
    # A short period, so that 150 steps hold many -1/+2 pairs on both sides of x = 0.
    metrics = _section3("amsgrad", tmp_path, steps=150, period=5)
    xs = torch.tensor(_xs(metrics), dtype=torch.float64)
    t = torch.tensor(metrics[0]["trace_t"], dtype=torch.float64)
    assert t.tolist() == list(range(1, 151))
    assert xs[0] == 1 and xs.min() < 0
    slopes = torch.tensor([-1.0, 2.0, 0.0, 0.0, 0.0] * 30, dtype=torch.float64)
    losses = section3_loss(slopes, xs)
    expected = (torch.cumsum(losses, 0) - SECTION3_LOW * t) / t
    regret = torch.tensor(metrics[0]["trace_avg_regret"], dtype=torch.float64)
    assert torch.allclose(regret, expected, rtol=1e-12, atol=0)
    assert metrics[0]["loss"] == pytest.approx(float(losses.mean()))


def test_section3_outcomes_adam_stays_on_x_ge_0_the_others_cross(tmp_path):
    """The default settings, 800 steps: the outcome documented in
    docs/figures/section3-results.md (same numbers over 5000 steps)."""
    finals, crossed = {}, {}
    for optim in ConvexTask.optimizers:
        metrics = _section3(optim, tmp_path / optim, steps=200, epochs=4)
        xs = _xs(metrics)
        assert xs[0] == 1.0  # x_1 = 1
        finals[optim] = metrics[-1]
        crossed[optim] = next((t for t, x in enumerate(xs, 1) if x < 0), None)
        if crossed[optim] is not None:  # beta1 = 0: after crossing, x never moves again
            assert len(set(xs[crossed[optim] - 1 :])) == 1, optim
    assert crossed["adam"] is None and finals["adam"]["x"] > 0.5
    assert finals["adam"]["avg_regret"] > 99  # about 100: -100 a step is out of reach
    # AdaBound and AMSBound overshoot at their second step (their Adam-phase rate there,
    # 0.5/sqrt(0.49) / sqrt(2), times 2 exceeds 1): regret 99 + 102 from steps 1 and 2.
    for optim in ("adabound", "amsbound"):
        assert crossed[optim] == 3, optim
        assert finals[optim]["avg_regret"] * 800 == pytest.approx(201), optim
    # AMSGrad keeps its largest second moment, so its +2 steps outweigh its -1 steps and
    # it drifts down to 0, overshooting at its 14th +2 step (t = 652).
    assert crossed["amsgrad"] == 653 and finals["amsgrad"]["x"] < 0
    assert finals["amsgrad"]["avg_regret"] < 0.85 * finals["adam"]["avg_regret"]


def test_section3_adam_crosses_at_step_2_above_a_step_size_threshold(tmp_path):
    # torch's Adam (bias-corrected, beta2 0.9) takes a +2 step of 2 alpha / sqrt(2) /
    # sqrt(0.49 / 0.19) at t = 2, from x = 1: past 0 once alpha > 1.1356. So Adam's failure
    # here holds for small step sizes only.
    threshold = math.sqrt(2) * math.sqrt(0.49 / 0.19) / 2
    assert threshold == pytest.approx(1.1356, abs=1e-4)
    below = _xs(_section3("adam", tmp_path / "below", steps=60, hparams={"lr": 1.13}))
    above = _xs(_section3("adam", tmp_path / "above", steps=60, hparams={"lr": 1.14}))
    assert min(below) > 0
    assert above[2] < 0 and above[1] == 1.0


def test_section3_bounded_method_crosses_through_its_bounds(tmp_path):
    # With a small Adam-phase lr there is no early overshoot: AdaBound crosses once its
    # bounds have pinned both steps' rates near final_lr / sqrt(t), where +2 beats -1.
    metrics = _section3("adabound", tmp_path, steps=200, epochs=14, hparams={"lr": 0.05})
    xs = _xs(metrics)
    first = next(t for t, x in enumerate(xs, 1) if x < 0)
    assert 2000 < first < 2800 and xs[-1] == xs[first - 1]


def test_section3_resumes_mid_epoch_exactly(tmp_path):
    config = build_config(
        "convex",
        "amsgrad",
        epochs=2,
        device="cpu",
        task_args={"problem": "section3", "steps_per_epoch": 400},
    )
    train(config, tmp_path / "whole", quiet=True, figures=False)

    def interrupt(epoch: int, batch: int) -> None:
        if (epoch, batch) == (2, 250):  # after the crossing at t = 653
            raise KeyboardInterrupt

    cut = train(
        config,
        tmp_path / "cut",
        quiet=True,
        figures=False,
        checkpoint_every=0,
        checkpoint_steps=1,
        on_batch=interrupt,
    )
    assert cut.interrupted
    train(config, tmp_path / "cut", resume=True, quiet=True, figures=False)
    assert_same_run(tmp_path / "whole", tmp_path / "cut")
