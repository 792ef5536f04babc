"""Independent float64 NumPy model of the AdaBound / AMSBound update (design.md section 2).

Deliberately written from the formulas alone, in the *direct* form

    step_size = lr * sqrt(1 - b2^t) / (1 - b1^t)
    eta       = clip(step_size / (sqrt(u) + eps), lower, upper)

with absolute bounds, rather than the lr-free form the library uses, so that an error in
either derivation shows up as a disagreement. It does not import torch.

Complex parameters are modelled as their real view (last axis of size 2: real, imaginary),
the same layout as ``torch.view_as_real``; every component evolves independently.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

Schedule = float | Sequence[float] | Callable[[int], float]
BoundFn = Callable[[float], tuple[float, float]]


def value_at(schedule: Schedule, k: int) -> float:
    """Value of a per-call schedule at optimizer call ``k`` (0-based)."""
    if callable(schedule):
        return float(schedule(k))
    if isinstance(schedule, Sequence | np.ndarray):
        return float(schedule[k])
    return float(schedule)


def real_view(x: np.ndarray) -> np.ndarray:
    """float64 copy of ``x``; complex arrays become (..., 2) arrays of (real, imag)."""
    if np.iscomplexobj(x):
        return np.stack([x.real, x.imag], axis=-1).astype(np.float64)
    return np.array(x, dtype=np.float64, copy=True)


def rate_bounds(
    t: float,
    *,
    lr: float,
    base_lr: float,
    final_lr: float,
    gamma: float,
    beta2: float,
    bounds: str | BoundFn,
) -> tuple[float, float]:
    """Absolute bounds on eta (before the paper's 1/sqrt(t)) at per-parameter step ``t``."""
    final = final_lr * lr / base_lr
    if bounds == "reference":
        return final * (1 - 1 / (gamma * t + 1)), final * (1 + 1 / (gamma * t))
    if bounds == "paper":
        return final * (1 - 1 / ((1 - beta2) * t + 1)), final * (1 + 1 / ((1 - beta2) * t))
    if callable(bounds):
        lower, upper = bounds(float(t))
        return float(lower) * lr / base_lr, float(upper) * lr / base_lr
    raise ValueError(f"unknown bounds {bounds!r}")


@dataclass
class ParamState:
    p: np.ndarray
    is_complex: bool
    step: int = 0
    m: np.ndarray | None = None
    v: np.ndarray | None = None
    vmax: np.ndarray | None = None
    # How often eta came from the lower bound, the upper bound, or the Adam rate itself.
    clip_counts: np.ndarray = field(default_factory=lambda: np.zeros(3, dtype=np.int64))


class AdaBoundOracle:
    """One param group of AdaBound/AMSBound, stepped with explicit per-call lr and beta1."""

    def __init__(
        self,
        params: Sequence[np.ndarray],
        *,
        base_lr: float,
        beta2: float = 0.999,
        final_lr: float = 0.1,
        gamma: float = 1e-3,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsbound: bool = False,
        decoupled_weight_decay: bool = False,
        unscaled_decay: bool = False,
        bounds: str | BoundFn = "reference",
        box: tuple[float, float] | None = None,
        maximize: bool = False,
    ) -> None:
        self.states = [ParamState(real_view(p), bool(np.iscomplexobj(p))) for p in params]
        self.base_lr = base_lr
        self.beta2 = beta2
        self.final_lr = final_lr
        self.gamma = gamma
        self.eps = eps
        self.weight_decay = weight_decay
        self.amsbound = amsbound
        self.decoupled = decoupled_weight_decay
        self.unscaled = unscaled_decay
        self.bounds = bounds
        self.box = box
        self.maximize = maximize

    def step(self, grads: Sequence[np.ndarray | None], lr: float, beta1: float) -> None:
        """Update every parameter whose gradient is not None; others keep their step count."""
        for st, grad in zip(self.states, grads, strict=True):
            if grad is not None:
                self._update(st, real_view(grad), lr, beta1)

    def _update(self, st: ParamState, g: np.ndarray, lr: float, b1: float) -> None:
        b2, wd = self.beta2, self.weight_decay
        if st.m is None:
            st.m = np.zeros_like(st.p)
            st.v = np.zeros_like(st.p)
            st.vmax = np.zeros_like(st.p)
        st.step += 1
        t = st.step
        if self.maximize:
            g = -g
        if self.decoupled:
            if self.unscaled:
                # lr == 0 is a no-op step in dynabound, the authors' unscaled decay included.
                st.p = st.p - wd * st.p if lr != 0 else st.p
            else:
                st.p = st.p * (1 - lr * wd)
        else:
            g = g + wd * st.p
        st.m = b1 * st.m + (1 - b1) * g
        st.v = b2 * st.v + (1 - b2) * g * g
        if self.amsbound:
            st.vmax = np.maximum(st.vmax, st.v)
            u = st.vmax
        else:
            u = st.v
        lower, upper = rate_bounds(
            t,
            lr=lr,
            base_lr=self.base_lr,
            final_lr=self.final_lr,
            gamma=self.gamma,
            beta2=b2,
            bounds=self.bounds,
        )
        if self.bounds == "paper":
            step_size, denom = lr, np.sqrt(u)
        else:
            step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
            denom = np.sqrt(u) + self.eps
        # u == 0 (and eps == 0) means an unbounded Adam rate: the upper bound takes over.
        safe = np.where(denom > 0, denom, 1.0)
        raw = np.where(denom > 0, step_size / safe, np.inf)
        eta = np.clip(raw, lower, upper)
        below, above = raw < lower, raw > upper
        st.clip_counts += [below.sum(), above.sum(), raw.size - below.sum() - above.sum()]
        if self.bounds == "paper":
            eta = eta / math.sqrt(t)
        st.p = st.p - eta * st.m
        if self.box is not None:
            st.p = np.clip(st.p, self.box[0], self.box[1])

    # Results in the real-view layout, ready to compare with torch.view_as_real(...).numpy().
    def params(self) -> list[np.ndarray]:
        return [st.p for st in self.states]

    def steps(self) -> list[int]:
        return [st.step for st in self.states]


def run_oracle(
    params: Sequence[np.ndarray],
    grads: Sequence[Sequence[np.ndarray | None]],
    *,
    lr: Schedule,
    beta1: Schedule = 0.9,
    **hyper: object,
) -> AdaBoundOracle:
    """Run ``len(grads)`` optimizer calls; ``lr``/``beta1`` may change per call."""
    oracle = AdaBoundOracle(params, **hyper)  # type: ignore[arg-type]
    for k, step_grads in enumerate(grads):
        oracle.step(step_grads, value_at(lr, k), value_at(beta1, k))
    return oracle
