"""Both eager implementations against the independent NumPy oracle, float64, thousands of steps.

Gradients are generated up front (independent of the parameters), so the two sides see
identical inputs; the lr and beta1 actually used at every call are read from the torch param
group (schedulers change them) and fed to the oracle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from oracle import AdaBoundOracle, real_view
from torch.optim import lr_scheduler

from dynabound import AdaBound

RTOL = 1e-10
ATOL_FACTOR = 1e-12  # atol = ATOL_FACTOR * max|expected| of the tensor being compared

# (shape, gradient scale, probability that the parameter gets no gradient at a call, complex)
SHAPES = [
    ((), 1.0, 0.0, False),
    ((0,), 1.0, 0.0, False),
    ((7,), 1e-3, 0.3, False),
    ((2, 0, 3), 1.0, 0.5, False),
    ((2, 3, 5), 10.0, 0.7, False),
    ((5,), 1.0, 1.0, False),  # frozen: never receives a gradient
    ((2, 3), 0.5, 0.2, True),
]

# Bounds at lr == base_lr as a user function: a wider band that closes faster than the default.
USER_BOUNDS: Callable[[Any], tuple[Any, Any]] = lambda t: (  # noqa: E731
    0.05 * (1 - 1 / (0.01 * t + 1)),
    0.05 * (1 + 3 / (0.01 * t)),
)

MAX_REL_ERRORS: dict[str, float] = {}


@dataclass
class Case:
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    scheduler: Callable[[torch.optim.Optimizer, int], Any] | None = None
    steps: int = 2000
    lr: float = 1e-3
    tensor_lr: bool = False
    seed: int = 0


def step_lr(opt: torch.optim.Optimizer, n: int) -> Any:
    return lr_scheduler.StepLR(opt, step_size=n // 4, gamma=0.3)


def multistep_lr(opt: torch.optim.Optimizer, n: int) -> Any:
    return lr_scheduler.MultiStepLR(opt, milestones=[n // 3, n // 2, 3 * n // 4], gamma=0.2)


def one_cycle(opt: torch.optim.Optimizer, n: int) -> Any:
    # cycle_momentum=True also cycles beta1, which the oracle follows call by call.
    return lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=n)


CASES = [
    Case("defaults_5000_steps", steps=5000, seed=1),
    Case("amsbound_l2_onecycle", {"amsbound": True, "weight_decay": 1e-2}, one_cycle, seed=2),
    Case("maximize_l2_multisteplr", {"maximize": True, "weight_decay": 5e-2}, multistep_lr),
    Case(
        "decoupled_adamw_maximize_steplr",
        {"decoupled_weight_decay": True, "weight_decay": 0.5, "maximize": True},
        step_lr,
        seed=3,
    ),
    Case(
        "decoupled_unscaled_amsbound",
        {
            "decoupled_weight_decay": True,
            "unscaled_decay": True,
            "weight_decay": 1e-4,
            "amsbound": True,
        },
        seed=4,
    ),
    Case("paper", {"bounds": "paper", "betas": (0.9, 0.99)}, seed=5),
    Case(
        "paper_amsbound_box_steplr",
        {"bounds": "paper", "amsbound": True, "box": (-1.5, 1.0), "betas": (0.8, 0.995)},
        step_lr,
        seed=6,
    ),
    Case("user_bounds_multisteplr", {"bounds": USER_BOUNDS}, multistep_lr, seed=7),
    Case(
        "box_l2_base_lr_eps0_hyperparams",
        {
            "box": (-0.5, 2.0),
            "weight_decay": 1e-3,
            "base_lr": 4e-3,
            "final_lr": 0.03,
            "gamma": 1e-2,
            "eps": 0.0,
            "betas": (0.5, 0.9),
        },
        seed=8,
    ),
    Case("tensor_lr_steplr_amsbound", {"amsbound": True}, step_lr, tensor_lr=True, seed=9),
]


def make_problem(case: Case) -> tuple[list[np.ndarray], list[list[np.ndarray | None]]]:
    rng = np.random.default_rng(case.seed)
    specs = SHAPES

    def draw(shape: tuple[int, ...], is_complex: bool) -> np.ndarray:
        x = rng.standard_normal(shape)
        return x + 1j * rng.standard_normal(shape) if is_complex else x

    params = [draw(s, c) for s, _, _, c in specs]
    grads: list[list[np.ndarray | None]] = []
    for _ in range(case.steps):
        row: list[np.ndarray | None] = []
        for shape, scale, p_skip, is_complex in specs:
            if rng.random() < p_skip:
                row.append(None)
                continue
            # Heavy-tailed magnitudes and some exact zeros exercise both clipping bounds.
            g = draw(shape, is_complex) * scale * np.exp(rng.standard_normal())
            row.append(np.where(rng.random(shape) < 0.1, 0, g))
        grads.append(row)
    return params, grads


def run_torch(
    case: Case, params0: list[np.ndarray], grads: list[list[np.ndarray | None]], foreach: bool
) -> tuple[list[torch.Tensor], AdaBound, list[float], list[float]]:
    params = [torch.tensor(p, requires_grad=True) for p in params0]
    lr: float | torch.Tensor = (
        torch.tensor(case.lr, dtype=torch.float64) if case.tensor_lr else case.lr
    )
    opt = AdaBound(params, lr=lr, foreach=foreach, **case.options)
    sched = case.scheduler(opt, case.steps) if case.scheduler else None
    lrs, beta1s = [], []
    for row in grads:
        for p, g in zip(params, row, strict=True):
            p.grad = None if g is None else torch.tensor(g)
        group = opt.param_groups[0]
        lrs.append(float(group["lr"]))
        beta1s.append(float(group["betas"][0]))
        opt.step()
        if sched is not None:
            sched.step()
    return params, opt, lrs, beta1s


def as_real(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return (torch.view_as_real(t) if t.is_complex() else t).numpy()


def compare(got: np.ndarray, want: np.ndarray, what: str) -> float:
    """Assert got ~= want; return the largest error relative to |want| (+ the tiny atol)."""
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if want.size == 0:
        return 0.0
    atol = ATOL_FACTOR * float(np.max(np.abs(want)))
    err = np.abs(got - want)
    bad = err > atol + RTOL * np.abs(want)
    if bad.any():
        i = np.unravel_index(np.argmax(err - RTOL * np.abs(want)), want.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{want.size} elements differ; worst at {i}: "
            f"got {got[i]!r}, oracle {want[i]!r}"
        )
    return float(np.max(err / (np.abs(want) + atol))) if atol > 0 else 0.0


@pytest.fixture(scope="module", autouse=True)
def _report_max_error():
    yield
    if MAX_REL_ERRORS:
        worst = max(MAX_REL_ERRORS, key=MAX_REL_ERRORS.__getitem__)
        print(
            f"\nmax relative error vs oracle over {len(MAX_REL_ERRORS)} runs: "
            f"{MAX_REL_ERRORS[worst]:.3e} ({worst})"
        )


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_matches_oracle(case: Case) -> None:
    params0, grads = make_problem(case)
    runs = {fe: run_torch(case, params0, grads, fe) for fe in (False, True)}
    _, _, lrs, beta1s = runs[False]
    assert runs[True][2] == lrs and runs[True][3] == beta1s

    opts = dict(case.options)
    b2 = opts.pop("betas", (0.9, 0.999))[1]
    base_lr = opts.pop("base_lr", case.lr)
    oracle = AdaBoundOracle(params0, base_lr=base_lr, beta2=b2, **opts)
    for k, row in enumerate(grads):
        oracle.step(row, lrs[k], beta1s[k])

    for foreach, (params, opt, _, _) in runs.items():
        worst = 0.0
        for i, (p, st) in enumerate(zip(params, oracle.states, strict=True)):
            tag = f"foreach={foreach} param {i} {tuple(p.shape)}"
            worst = max(worst, compare(as_real(p), st.p, f"{tag} value"))
            state = opt.state.get(p, {})
            if st.step == 0:
                assert "step" not in state or float(state["step"]) == 0, tag
                assert np.array_equal(as_real(p), real_view(params0[i])), tag
                continue
            assert float(state["step"]) == st.step, f"{tag} step"
            worst = max(worst, compare(as_real(state["exp_avg"]), st.m, f"{tag} exp_avg"))
            worst = max(worst, compare(as_real(state["exp_avg_sq"]), st.v, f"{tag} exp_avg_sq"))
            if opts.get("amsbound"):
                got = as_real(state["max_exp_avg_sq"])
                worst = max(worst, compare(got, st.vmax, f"{tag} max_exp_avg_sq"))
        MAX_REL_ERRORS[f"{case.name}/foreach={foreach}"] = worst
    # Non-vacuity: the parameters moved, and every regime of the clipped rate occurred.
    moved = [
        not np.allclose(st.p, real_view(p0)) for st, p0 in zip(oracle.states, params0, strict=True)
    ]
    assert sum(moved) == 4, moved
    low, high, inside = sum(st.clip_counts for st in oracle.states)
    assert min(low, high, inside) > 0, (low, high, inside)


def test_oracle_reproduces_hand_computed_first_steps() -> None:
    # Step 1 by hand (eps = 0, g = 2): m = 0.2, sqrt(v) = 2 sqrt(0.001) and
    # step_size = lr sqrt(0.001) / 0.1, so the Adam rate is lr / 0.2 = 5 lr, and the band is
    # final_lr * (lr / base_lr) * [1 - 1/(gamma + 1), 1 + 1/gamma].
    def first_step(lr: float, gamma: float, final_lr: float = 0.1) -> float:
        oracle = AdaBoundOracle(
            [np.array([1.0])], base_lr=1e-3, eps=0.0, gamma=gamma, final_lr=final_lr
        )
        oracle.step([np.array([2.0])], lr=lr, beta1=0.9)
        return float(oracle.params()[0][0])

    # Band [9.99e-5, 100.1] contains the Adam rate 5e-3.
    np.testing.assert_allclose(first_step(1e-3, 1e-3), 1 - 5e-3 * 0.2, rtol=1e-14)
    # gamma = 1000: band 0.1 * [1000/1001, 1.001] lies above 5e-3, the lower bound wins.
    np.testing.assert_allclose(first_step(1e-3, 1e3), 1 - 0.1 * 1000 / 1001 * 0.2, rtol=1e-14)
    # Doubling lr doubles the bounds (lr decay decays final_lr too).
    np.testing.assert_allclose(first_step(2e-3, 1e3), 1 - 0.2 * 1000 / 1001 * 0.2, rtol=1e-14)
    # final_lr = 1e-3: band 1e-3 * [1000/1001, 1.001] lies below 5e-3, the upper bound wins.
    np.testing.assert_allclose(first_step(1e-3, 1e3, 1e-3), 1 - 1.001e-3 * 0.2, rtol=1e-14)
