"""Hypothesis properties of the update: finiteness, the rate band, the SGD limit, lr == 0."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from oracle import rate_bounds

from dynabound import AdaBound

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
USER_BOUNDS = lambda t: (0.02 * (1 - 1 / (0.1 * t + 1)), 0.02 * (1 + 1 / (0.1 * t)))  # noqa: E731
SHAPES = [(3,), (2, 2), ()]  # several tensors so foreach really groups them


def gradient_values(limit: float, np_dtype: type) -> st.SearchStrategy[float]:
    # Exact zeros, subnormals and tiny values hit the 0/0 and inf/inf corners of the rate.
    info = np.finfo(np_dtype)
    tiny = [info.smallest_subnormal, -info.smallest_normal / 3, 1e-30, -1e-20]
    return st.one_of(
        st.just(0.0),
        st.floats(-limit, limit, width=info.bits),
        st.sampled_from([float(np_dtype(x)) for x in tiny]),
    )


def gradient_steps(dtype: torch.dtype, limit: float, max_steps: int = 6) -> st.SearchStrategy:
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    one_step = st.tuples(
        *[arrays(np_dtype, shape, elements=gradient_values(limit, np_dtype)) for shape in SHAPES]
    )
    return st.lists(one_step, min_size=1, max_size=max_steps)


def hyperparameters(min_gamma: float, max_beta2: float) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "lr": st.floats(0.0, 1.0),
            "base_lr": st.floats(1e-4, 1.0),
            # 0 is refused (nothing would move); the smallest positive values stay in.
            "final_lr": st.floats(0.0, 1.0, exclude_min=True),
            "gamma": st.floats(min_gamma, 1.0),
            "eps": st.sampled_from([0.0, 1e-30, 1e-8, 1e-3]),
            "betas": st.tuples(st.floats(0.0, 0.999), st.floats(0.0, max_beta2)),
            "weight_decay": st.floats(0.0, 1e-2),
            "amsbound": st.booleans(),
            "decoupled_weight_decay": st.booleans(),
            "unscaled_decay": st.booleans(),
            "bounds": st.sampled_from(["reference", "paper", USER_BOUNDS]),
            "maximize": st.booleans(),
            "foreach": st.booleans(),
        }
    )


def make_optimizer(
    hyper: dict[str, Any], dtype: torch.dtype, seed: int = 0
) -> tuple[list[torch.Tensor], AdaBound]:
    gen = torch.Generator().manual_seed(seed)
    params = [
        (torch.rand(s, generator=gen, dtype=torch.float64) * 4 - 2).to(dtype).requires_grad_()
        for s in SHAPES
    ]
    hyper = dict(hyper)
    lr = hyper.pop("lr")
    # Built at base_lr, then lr is changed the way a scheduler would (lr == 0 included).
    opt = AdaBound(params, lr=hyper["base_lr"], **hyper)
    opt.param_groups[0]["lr"] = lr
    return params, opt


def state_tensors(opt: AdaBound) -> list[torch.Tensor]:
    return [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize(
    "dtype, limit, min_gamma, max_beta2",
    # float32 overflows g*g beyond ~1e19 and a wide band can legitimately diverge, so its
    # domain is narrower; the float64 one reaches extreme gammas and betas.
    [(torch.float32, 1e3, 1e-3, 0.999), (torch.float64, 1e6, 1e-8, 0.99999)],
    ids=["float32", "float64"],
)
@SETTINGS
@given(data=st.data())
def test_finite_gradients_give_finite_params_and_state(
    dtype: torch.dtype, limit: float, min_gamma: float, max_beta2: float, data: st.DataObject
) -> None:
    hyper = data.draw(hyperparameters(min_gamma, max_beta2), label="hyper")
    steps = data.draw(gradient_steps(dtype, limit), label="grads")
    params, opt = make_optimizer(hyper, dtype)
    for grads in steps:
        for p, g in zip(params, grads, strict=True):
            p.grad = torch.from_numpy(g.copy())
        opt.step()
        for t in [*params, *state_tensors(opt)]:
            assert torch.isfinite(t).all(), (t, hyper)


def band_at(step: int, hyper: dict[str, Any]) -> tuple[float, float]:
    """Bounds on the per-element rate lr_eff with p_new = p - lr_eff * m, from the design."""
    lower, upper = rate_bounds(
        step,
        lr=hyper["lr"],
        base_lr=hyper["base_lr"],
        final_lr=hyper["final_lr"],
        gamma=hyper["gamma"],
        beta2=hyper["betas"][1],
        bounds=hyper["bounds"],
    )
    if hyper["bounds"] == "paper":
        return lower / math.sqrt(step), upper / math.sqrt(step)
    return lower, upper


@SETTINGS
@given(hyper=hyperparameters(1e-8, 0.99999), steps=gradient_steps(torch.float64, 1e6, 8))
def test_rate_stays_within_bounds(hyper: dict[str, Any], steps: list[tuple[np.ndarray]]) -> None:
    params, opt = make_optimizer(hyper, torch.float64)
    for t, grads in enumerate(steps, start=1):
        # From p == 0 (decay then has nothing to act on), p_new == -rate * m exactly up to
        # one rounding, so the rate can be read back element by element.
        with torch.no_grad():
            for p in params:
                p.zero_()
        for p, g in zip(params, grads, strict=True):
            p.grad = torch.from_numpy(g.copy())
        opt.step()
        lower, upper = band_at(t, hyper)
        for p in params:
            m = opt.state[p]["exp_avg"]
            readable = (m.abs() > 1e-150) & (p.abs() > 1e-290)
            rate = (-p.detach() / m)[readable]
            assert (rate >= lower * (1 - 1e-12)).all(), (t, rate.min().item(), lower, hyper)
            assert (rate <= upper * (1 + 1e-12)).all(), (t, rate.max().item(), upper, hyper)


@SETTINGS
@given(
    lr=st.floats(1e-4, 1.0),
    base_lr=st.floats(1e-4, 1.0),
    final_lr=st.floats(1e-3, 1.0),
    gamma=st.floats(1e-2, 10.0),
    betas=st.tuples(st.floats(0.0, 0.99), st.floats(0.0, 0.9999)),
    eps=st.sampled_from([0.0, 1e-8]),
    amsbound=st.booleans(),
    maximize=st.booleans(),
    foreach=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_large_step_count_is_momentum_sgd(
    lr: float,
    base_lr: float,
    final_lr: float,
    gamma: float,
    betas: tuple[float, float],
    eps: float,
    amsbound: bool,
    maximize: bool,
    foreach: bool,
    seed: int,
) -> None:
    b1 = betas[0]
    gen = torch.Generator().manual_seed(seed)
    p0 = torch.randn(5, generator=gen, dtype=torch.float64)
    m0 = torch.randn(5, generator=gen, dtype=torch.float64)
    v0 = torch.rand(5, generator=gen, dtype=torch.float64)
    grads = [torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(4)]

    p = p0.clone().requires_grad_()
    opt = AdaBound(
        [p], lr=lr, base_lr=base_lr, final_lr=final_lr, gamma=gamma, betas=betas, eps=eps,
        amsbound=amsbound, maximize=maximize, foreach=foreach,
    )  # fmt: skip
    p.grad = torch.zeros_like(p)
    opt.step()  # creates the state; m == 0, so p does not move
    assert torch.equal(p.detach(), p0)
    state = opt.state[p]
    state["step"].fill_(1e9)
    state["exp_avg"].copy_(m0)
    state["exp_avg_sq"].copy_(v0)
    if amsbound:
        state["max_exp_avg_sq"].copy_(v0)

    final = final_lr * lr / base_lr
    q = p0.clone().requires_grad_()
    sgd = torch.optim.SGD([q], lr=final * (1 - b1), momentum=b1, maximize=maximize)
    if b1 > 0:
        sgd.state[q]["momentum_buffer"] = m0 / (1 - b1)

    for g in grads:
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        sgd.step()
    # At t = 1e9 the band is final * (1 +/- 1/(gamma t)), i.e. within 1e-7 of final.
    moved = (q.detach() - p0).abs().max().item()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-6 * moved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@SETTINGS
@given(
    hyper=hyperparameters(1e-30, 0.9999),
    zero_grads=st.booleans(),
    tensor_lr=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_zero_lr_is_a_no_op(
    dtype: torch.dtype, hyper: dict[str, Any], zero_grads: bool, tensor_lr: bool, seed: int
) -> None:
    hyper = {**hyper, "lr": 0.0}
    params, opt = make_optimizer(hyper, dtype, seed)
    if tensor_lr:
        opt.param_groups[0]["lr"] = torch.tensor(0.0)
    before = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        for p in params:
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype)
            p.grad = torch.zeros_like(p) if zero_grads else g
        opt.step()
        for t in state_tensors(opt):
            assert torch.isfinite(t).all(), (t, hyper)
    # lr == 0 moves nothing, the authors' unscaled decoupled decay included.
    for p, b in zip(params, before, strict=True):
        assert torch.isfinite(p).all()
        assert torch.equal(p.detach(), b), hyper


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@SETTINGS
@given(
    lr=st.floats(1e-4, 1e-2),
    amsbound=st.booleans(),
    bounds=st.sampled_from(["reference", "paper"]),
    foreach=st.booleans(),
    grads=st.lists(
        arrays(np.float32, (6,), elements=st.floats(-100, 100, width=16)), min_size=1, max_size=4
    ),
)
def test_half_precision_stays_finite_with_default_bounds(
    dtype: torch.dtype,
    lr: float,
    amsbound: bool,
    bounds: str,
    foreach: bool,
    grads: list[np.ndarray],
) -> None:
    # With the defaults the early upper bound relative to lr, final_lr/base_lr*(1 + 1/gamma),
    # is about 1e5: above the float16 maximum, so it must not be cast to the parameter dtype.
    p = torch.linspace(-1, 1, 6, dtype=dtype).requires_grad_()
    opt = AdaBound([p], lr=lr, amsbound=amsbound, bounds=bounds, foreach=foreach)
    for g in grads:
        p.grad = torch.from_numpy(g).to(dtype)
        opt.step()
        for t in [p, *state_tensors(opt)]:
            assert torch.isfinite(t).all(), t
