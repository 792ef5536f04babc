"""Per-step scalars of the AdaBound update: bias correction, rate bounds, step scale.

Every backend computes the element-wise rate as

    rate = lr * scale * clamp(numerator / (sqrt(u) + eps), lower, upper)

and takes the scalars from :func:`step_coefficients`. The lower and upper bounds are
expressed relative to ``lr`` (the "lr-free" form of the design): they never divide by
``lr``, so ``lr == 0`` is a valid, update-free step, and a scheduler that scales ``lr``
scales the Adam step and both bounds together, as the authors' code does.

``step`` may be a Python number or a 0-dim tensor (capturable mode); the formulas use
only arithmetic that works for both, so no host synchronisation happens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor

Scalar = float | Tensor
BoundFunction = Callable[[Scalar], tuple[Scalar, Scalar]]
BoundsSpec = Literal["reference", "paper"] | BoundFunction

BOUND_NAMES = ("reference", "paper")


class StepCoefficients(NamedTuple):
    """Scalars of one step; ``rate = lr * scale * clamp(numerator / denom, lower, upper)``."""

    numerator: Scalar
    lower: Scalar
    upper: Scalar
    scale: Scalar
    eps_used: bool


def reference_bounds(step: Scalar, final_lr: float, gamma: float) -> tuple[Scalar, Scalar]:
    """The authors' bounds: ``final_lr * (1 -/+ ...)``, converging to ``final_lr`` as 1/t."""
    return (
        final_lr * (1 - 1 / (gamma * step + 1)),
        final_lr * (1 + 1 / (gamma * step)),
    )


def paper_bounds(step: Scalar, final_lr: float, beta2: float) -> tuple[Scalar, Scalar]:
    """Bounds of the paper's convergence analysis (Theorem 4 / Algorithm 2), tied to beta2."""
    return (
        final_lr * (1 - 1 / ((1 - beta2) * step + 1)),
        final_lr * (1 + 1 / ((1 - beta2) * step)),
    )


def validate_bounds(bounds: object) -> None:
    if callable(bounds):
        return
    if bounds not in BOUND_NAMES:
        raise ValueError(
            f"bounds must be 'reference', 'paper' or a callable step -> (lower, upper), "
            f"got {bounds!r}"
        )


def _sqrt(x: Scalar) -> Scalar:
    return x.sqrt() if isinstance(x, Tensor) else math.sqrt(x)


def step_coefficients(
    step: Scalar,
    *,
    bounds: BoundsSpec,
    final_lr: float,
    base_lr: float,
    gamma: float,
    beta1: float,
    beta2: float,
) -> StepCoefficients:
    """Scalars for the update at (1-based) ``step``.

    * ``"reference"``: AdaBound 0.0.5, bias-corrected Adam step, eps in the denominator.
    * ``"paper"``: Algorithm 2 of the paper: no bias correction, no eps, bounds tied to
      beta2, and the clipped rate divided by sqrt(t).
    * a callable ``f(step) -> (lower, upper)``: bounds on the rate at ``lr == base_lr``
      (they scale with ``lr / base_lr`` like the built-in ones); otherwise as "reference".
    """
    if bounds == "paper":
        lower, upper = paper_bounds(step, final_lr, beta2)
        return StepCoefficients(1.0, lower / base_lr, upper / base_lr, 1 / _sqrt(step), False)
    if callable(bounds):
        lower, upper = bounds(step)
        if not isinstance(lower, Tensor) and not isinstance(upper, Tensor):
            if not 0 <= lower <= upper:
                raise ValueError(
                    f"bound function returned invalid bounds at step {step}: "
                    f"need 0 <= lower <= upper, got ({lower}, {upper})"
                )
    else:
        lower, upper = reference_bounds(step, final_lr, gamma)
    numerator = _sqrt(1 - beta2**step) / (1 - beta1**step)
    return StepCoefficients(numerator, lower / base_lr, upper / base_lr, 1.0, True)


def decoupled_decay_factor(lr: Scalar, weight_decay: float, unscaled: bool) -> Scalar:
    """Factor that decoupled weight decay multiplies the parameter by before the update.

    AdamW-style ``1 - lr*wd`` by default; the authors' AdaBoundW ``1 - wd`` with
    ``unscaled``, except at ``lr == 0``: warm-up and distributed checkpoint loading step
    once with lr = 0 and expect nothing to move.
    """
    if unscaled:
        return 1 - weight_decay * (lr != 0)
    return 1 - lr * weight_decay


def within_range(c: StepCoefficients, dtype: torch.dtype) -> StepCoefficients:
    """Cap the bounds at ``dtype``'s largest finite value.

    Early upper bounds (``final_lr/base_lr * (1 + 1/(gamma*t))``, about 1e5 at t = 1 with the
    defaults) exceed float16's range, and a tiny gamma exceeds float32's: clamping to an
    out-of-range scalar raises, and an infinite bound turns the 0 * inf of a zero moment
    into NaN. Capping changes no representable result.
    """
    largest = torch.finfo(dtype).max
    if isinstance(c.upper, Tensor) or isinstance(c.lower, Tensor):
        return c._replace(
            lower=torch.clamp(torch.as_tensor(c.lower), max=largest),
            upper=torch.clamp(torch.as_tensor(c.upper), max=largest),
        )
    return c._replace(lower=min(c.lower, largest), upper=min(c.upper, largest))
