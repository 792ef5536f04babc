"""final_lr_from_sgd: AdaBound's closed-bound limit against torch.optim.SGD itself."""

import pytest
import torch

from dynabound import AdaBound, AMSBoundW, final_lr_from_sgd
from dynabound.final_lr import sgd_step_factor

# With gamma this large both bounds equal final to within 1e-12 from the first step, so the
# update is AdaBound's limit p -= final * m from step 1.
CLOSED = 1e12
STEPS = 200


def _problem(seed=0):
    """A float64 quadratic whose gradient depends on the parameters, so any difference
    between two optimizers compounds along the trajectory instead of washing out."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(12, 12, generator=gen, dtype=torch.float64)
    hessian = a @ a.T / 12 + 0.1 * torch.eye(12, dtype=torch.float64)
    target = torch.randn(12, generator=gen, dtype=torch.float64)
    start = torch.randn(12, generator=gen, dtype=torch.float64)
    return hessian, target, start


def _trajectory(make_optimizer, *, zero_buffer=False, steps=STEPS, seed=0):
    hessian, target, start = _problem(seed)
    p = torch.nn.Parameter(start.clone())
    opt = make_optimizer([p])
    if zero_buffer:
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    out = []
    for _ in range(steps):
        p.grad = hessian @ (p.detach() - target)
        opt.step()
        out.append(p.detach().clone())
    return torch.stack(out)


def _adabound(final_lr, *, beta1=0.9, **kw):
    return lambda params: AdaBound(
        params, lr=1e-3, final_lr=final_lr, gamma=CLOSED, betas=(beta1, 0.999), **kw
    )


@pytest.mark.parametrize("path", [{"foreach": False}, {"foreach": True}, {"fused": True}])
@pytest.mark.parametrize("lr", [0.01, 0.1])
def test_undampened_recipe_is_followed_from_the_first_step(lr, path):
    sgd = _trajectory(lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9))
    ours = _trajectory(_adabound(final_lr_from_sgd(lr, momentum=0.9), **path))
    assert final_lr_from_sgd(lr, momentum=0.9) == pytest.approx(10 * lr, rel=1e-15)
    torch.testing.assert_close(ours, sgd, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dampening", [0.5, 0.9])
def test_dampened_recipe_is_followed_when_the_buffer_starts_at_zero(dampening):
    sgd = _trajectory(
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=dampening),
        zero_buffer=True,
    )
    ours = _trajectory(_adabound(final_lr_from_sgd(0.1, momentum=0.9, dampening=dampening)))
    torch.testing.assert_close(ours, sgd, rtol=1e-10, atol=1e-12)


def test_dampened_recipe_differs_only_by_torchs_undampened_first_step():
    """torch seeds the buffer with g1 instead of (1 - dampening) * g1; on a gradient that
    does not depend on the parameters the extra displacement after t steps is
    lr * dampening * g1 * (1 + momentum + ... + momentum**(t-1)), and nothing else differs."""
    lr, momentum, dampening = 0.1, 0.9, 0.9
    gen = torch.Generator().manual_seed(1)
    grads = torch.randn(STEPS, 5, generator=gen, dtype=torch.float64)

    def run(opt_factory):
        p = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
        opt = opt_factory([p])
        out = []
        for g in grads:
            p.grad = g.clone()
            opt.step()
            out.append(p.detach().clone())
        return torch.stack(out)

    sgd = run(lambda ps: torch.optim.SGD(ps, lr=lr, momentum=momentum, dampening=dampening))
    ours = run(_adabound(final_lr_from_sgd(lr, momentum=momentum, dampening=dampening)))
    t = torch.arange(1, STEPS + 1, dtype=torch.float64)
    geometric = (1 - momentum**t) / (1 - momentum)
    predicted = -lr * dampening * geometric[:, None] * grads[0]
    torch.testing.assert_close(sgd - ours, predicted, rtol=1e-9, atol=1e-12)


def test_decoupled_variant_and_amsbound_follow_the_same_recipe():
    """Without weight decay AMSBoundW's limit is the same SGD (the max of v does not enter
    once the bounds have closed)."""
    sgd = _trajectory(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9))
    ours = _trajectory(
        lambda ps: AMSBoundW(
            ps, lr=1e-3, final_lr=final_lr_from_sgd(0.05), gamma=CLOSED, weight_decay=0.0
        )
    )
    torch.testing.assert_close(ours, sgd, rtol=1e-10, atol=1e-12)


def test_base_lr_different_from_lr_is_referred_back():
    """An optimizer built with a decayed lr (lr 1e-4, base_lr 1e-3) steps final_lr*lr/base_lr."""
    final_lr = final_lr_from_sgd(0.1, adam_lr=1e-4, base_lr=1e-3)
    assert final_lr == 10.0
    sgd = _trajectory(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    ours = _trajectory(
        lambda ps: AdaBound(ps, lr=1e-4, base_lr=1e-3, final_lr=final_lr, gamma=CLOSED)
    )
    torch.testing.assert_close(ours, sgd, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "recipe",
    [
        {"momentum": 0.99},  # a momentum other than beta1
        {"momentum": 0.9, "nesterov": True},
        {"momentum": 0.0},  # plain SGD
        {"momentum": 0.95, "dampening": 0.5},
    ],
)
def test_other_recipes_match_in_steady_state(recipe):
    """On a constant gradient both optimizers settle on the same step, however different
    their filters are."""
    lr, g = 0.02, torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    def last_step(opt_factory):
        p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        opt = opt_factory([p])
        for _ in range(3000):
            before = p.detach().clone()
            p.grad = g.clone()
            opt.step()
        return p.detach() - before

    sgd = last_step(lambda ps: torch.optim.SGD(ps, lr=lr, **recipe))
    ours = last_step(_adabound(final_lr_from_sgd(lr, **recipe)))
    torch.testing.assert_close(ours, sgd, rtol=1e-9, atol=0)


def test_values_users_ask_about():
    assert final_lr_from_sgd(0.1) == 1.0  # the usual CIFAR recipe: ten times the default
    assert final_lr_from_sgd(0.1, dampening=0.9) == 0.1  # Savarese's dampened SGDM
    assert final_lr_from_sgd(0.1, momentum=0.0) == 0.1
    assert final_lr_from_sgd(0.05, momentum=0.9, nesterov=True) == 0.5
    assert sgd_step_factor(0.9, 0.5) == pytest.approx(5.0)
    assert sgd_step_factor(0.0, 0.7) == 1.0  # torch ignores dampening without momentum


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.0}, "lr must be a positive number"),
        ({"lr": float("nan")}, "lr must be a positive number"),
        ({"lr": 0.1, "momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"lr": 0.1, "momentum": -0.1}, r"momentum must be in \[0, 1\)"),
        ({"lr": 0.1, "dampening": 1.0}, "makes every SGD step zero"),
        ({"lr": 0.1, "dampening": 1.5}, r"dampening must be in \[0, 1\]"),
        ({"lr": 0.1, "dampening": 0.5, "nesterov": True}, "zero dampening"),
        ({"lr": 0.1, "momentum": 0.0, "nesterov": True}, "requires a momentum"),
        ({"lr": 0.1, "adam_lr": 1e-3}, "both adam_lr and base_lr"),
        ({"lr": 0.1, "adam_lr": 1e-3, "base_lr": 0.0}, "base_lr must be a positive number"),
        ({"lr": 0.1, "betas": (1.0, 0.999)}, r"betas\[0\] must be in"),
    ],
)
def test_bad_recipes_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        final_lr_from_sgd(**kwargs)
