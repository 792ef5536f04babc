"""Dampened SGDM (`--optim sgdm-damped`): the SGD that AdaBound becomes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dynabound import AdaBound
from dynabound.experiments.arguments import build_parser
from dynabound.experiments.cli import _hparam_overrides
from dynabound.experiments.config import build_config
from dynabound.experiments.optimizers import DampedSGD, build_optimizer
from dynabound.experiments.presets import preset

STEPS = 200


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _train(optimizers: list[tuple[nn.Module, torch.optim.Optimizer]], steps: int = STEPS):
    """The same batches for every (model, optimizer); yields after each step."""
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g)
        for model, opt in optimizers:
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        yield


def _max_difference(a: nn.Module, b: nn.Module) -> float:
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return max(float((p - q).detach().abs().max()) for p, q in pairs)


@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
def test_the_harness_optimizer_is_torch_sgd_with_buffers_started_at_zero(weight_decay):
    ours, theirs = _model(), _model()
    hparams = {"lr": 0.1, "momentum": 0.9, "dampening": 0.9, "weight_decay": weight_decay}
    opt = build_optimizer("sgdm-damped", ours.parameters(), hparams)
    assert isinstance(opt, DampedSGD) and isinstance(opt, torch.optim.SGD)
    reference = torch.optim.SGD(theirs.parameters(), **hparams)
    for p in theirs.parameters():
        reference.state[p]["momentum_buffer"] = torch.zeros_like(p)
    for _ in _train([(ours, opt), (theirs, reference)]):
        pass
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p, q)


def test_torch_sgd_started_from_the_first_gradient_steps_ten_times_further_at_first():
    # Why the harness starts the buffers itself: torch's SGD copies the first gradient into
    # its buffer undampened, so its first step is 1/(1 - dampening) times AdaBound's.
    ours, theirs = _model(), _model()
    start = [p.detach().clone() for p in ours.parameters()]
    opt = build_optimizer("sgdm-damped", ours.parameters(), {"lr": 0.1})
    plain = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9, dampening=0.9)
    for _ in _train([(ours, opt), (theirs, plain)], steps=1):
        pass
    for p, q, p0 in zip(ours.parameters(), theirs.parameters(), start, strict=True):
        torch.testing.assert_close(q - p0, 10 * (p - p0))


@pytest.mark.parametrize("weight_decay", [0.0, 5e-4])
def test_adabound_with_closed_bounds_follows_dampened_sgdm(weight_decay):
    # gamma 1e12: both bounds are final_lr * (1 -/+ 1e-12), the same float32 number from
    # the first step, so AdaBound's rate is final everywhere: p -= final * m.
    sgd_model, bound_model = _model(), _model()
    sgd = build_optimizer(
        "sgdm-damped", sgd_model.parameters(), {"lr": 0.1, "weight_decay": weight_decay}
    )
    bound = AdaBound(
        bound_model.parameters(), lr=1e-3, final_lr=0.1, gamma=1e12, weight_decay=weight_decay
    )
    worst = 0.0
    for _ in _train([(sgd_model, sgd), (bound_model, bound)]):
        worst = max(worst, _max_difference(sgd_model, bound_model))
    assert worst < 1e-6  # float32 rounding of lr * (final / lr): about 1e-7 here
    moved = _max_difference(sgd_model, _model())
    assert moved > 0.1  # the parameters travelled far further than the difference


@pytest.mark.parametrize("task", ["digits", "mnist", "cifar10", "ptb"])
def test_the_presets_are_adabounds_limit(task):
    damped, adabound = preset(task, "sgdm-damped"), preset(task, "adabound")
    assert damped["lr"] == adabound["final_lr"]
    assert damped["momentum"] == damped["dampening"] == adabound["beta1"]
    assert damped.get("weight_decay", 0.0) == adabound.get("weight_decay", 0.0)


def test_dampening_follows_a_momentum_given_alone():
    assert preset("mnist", "sgdm-damped", {"momentum": 0.5})["dampening"] == 0.5
    both = preset("mnist", "sgdm-damped", {"momentum": 0.5, "dampening": 0.2})
    assert (both["momentum"], both["dampening"]) == (0.5, 0.2)
    assert "dampening" not in preset("mnist", "sgdm", {"momentum": 0.5})


def test_bad_dampening_and_nesterov_are_clear_errors():
    p = [nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="cannot use nesterov with momentum 0.9 and dampening 0.9"):
        build_optimizer("sgdm-damped", p, {"nesterov": True})
    with pytest.raises(ValueError, match="dampening must lie in"):
        build_optimizer("sgdm", p, {"dampening": 1.5})
    with pytest.raises(ValueError, match="momentum must lie in"):
        build_optimizer("sgdm-damped", p, {"momentum": 1.0})
    assert build_optimizer("sgdm", p, {"nesterov": True}).param_groups[0]["nesterov"]


def test_the_command_line_takes_dampening():
    ns = build_parser().parse_args(["run", "digits", "--optim", "sgdm", "--dampening", "0.5"])
    config = build_config("digits", ns.optim, hparams=_hparam_overrides(ns))
    assert config["hparams"] == {"lr": 0.1, "momentum": 0.9, "dampening": 0.5}
    ns = build_parser().parse_args(["run", "ptb", "--optim", "sgdm-damped"])
    config = build_config("ptb", ns.optim, hparams=_hparam_overrides(ns))
    assert config["hparams"] == {"lr": 10.0, "momentum": 0.9, "dampening": 0.9}
