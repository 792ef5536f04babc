"""Per-step scalars of the AdaBound update: bias correction, rate bounds, step scale.

Every backend computes the element-wise rate as

    rate = lr * scale * clamp(numerator / (sqrt(u) + eps), lower, upper)

and takes the scalars from :func:`step_coefficients`. The lower and upper bounds are
expressed relative to ``lr`` (the "lr-free" form of the design): they never divide by
``lr``, so ``lr == 0`` is a valid, update-free step, and a scheduler that scales ``lr``
scales the Adam step and both bounds together, as the authors' code does.

``step`` may be a Python number or a tensor: one step (0-dim) or the steps of many
parameter tensors at once (1-dim: capturable steps evaluate every tensor's scalars in a
fixed number of tensor operations this way). The formulas use only element-wise
arithmetic, so no host synchronisation happens, and a bound function must accept the
same. :func:`within_range` then puts the scalars in the range of the dtype the rate is
computed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple, Protocol

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


def no_bounds(step: Scalar) -> tuple[float, float]:
    """A bound function that bounds nothing: the step is Adam's. final_lr="auto" steps with
    it before the estimate has its first sample, and the diagnostics read that step with it."""
    return 0.0, math.inf


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


class ScheduleParameters(Protocol):
    """What :func:`step_coefficients` reads, as attributes (a :class:`dynabound.spec.StepSpec`).

    Read-only properties, so that a NamedTuple's fields satisfy it."""

    @property
    def bounds(self) -> BoundsSpec: ...
    @property
    def final_lr(self) -> float: ...
    @property
    def base_lr(self) -> float: ...
    @property
    def gamma(self) -> float: ...
    @property
    def beta1(self) -> float: ...
    @property
    def beta2(self) -> float: ...


def step_coefficients_from(step: Scalar, spec: ScheduleParameters) -> StepCoefficients:
    """:func:`step_coefficients` with the hyperparameters of a step's description."""
    return step_coefficients(
        step,
        bounds=spec.bounds,
        final_lr=spec.final_lr,
        base_lr=spec.base_lr,
        gamma=spec.gamma,
        beta1=spec.beta1,
        beta2=spec.beta2,
    )


def decoupled_decay_factor(lr: Scalar, weight_decay: float, unscaled: bool) -> Scalar:
    """Factor that decoupled weight decay multiplies the parameter by before the update.

    AdamW-style ``1 - lr*wd`` by default; the authors' AdaBoundW ``1 - wd`` with
    ``unscaled``, except at ``lr == 0``: warm-up and distributed checkpoint loading step
    once with lr = 0 and expect nothing to move.
    """
    if unscaled:
        return 1 - weight_decay * (lr != 0)
    return 1 - lr * weight_decay


def within_range(
    c: StepCoefficients, dtype: torch.dtype, lr: Scalar | None = None
) -> StepCoefficients:
    """Equivalent scalars whose bounds fit ``dtype``, the dtype the rate is computed in.

    That dtype is float32 or wider: every backend computes float16 and bfloat16 parameters
    in float32, whose range holds bounds that float16's cannot.

    The bounds relative to lr can leave a dtype's range while the rate stays inside it:
    ``final_lr/base_lr * (1 + 1/(gamma*t))`` is about 1e5 at t = 1 with the defaults, and a
    tiny gamma exceeds even float32's range. Out-of-range bounds cannot stay: clamping to an
    out-of-range scalar raises, and an infinite bound turns the 0 * inf of a zero moment
    into NaN. So both bounds are capped at ``dtype``'s largest finite value M.

    The cap changes a clamped value only where the exact clamped value exceeds M (below M, a
    bound above M could not have been the one that applied; an overflowed quotient clamps
    to the same bound either way). That is not yet a changed rate: the rate is the clamped
    value times ``lr * scale``, which can be small: bounds of 99900 capped at float16's 65504
    with lr = 1e-6 cut a rate of 0.0999 to 0.0655. So with ``lr`` given, wherever the
    upper bound or its rate would come within a factor of two of M, the scalars are first
    rescaled by the power of two 2**e that brings ``lr * scale`` into [0.5, 1): numerator,
    lower and upper times 2**e, scale divided by it. Scaling by a power of two is exact
    (short of the subnormal range), so every product a backend forms is the unscaled one
    times 2**e, bit for bit, and the rate is the same. Then

    * the cap changes no rate up to M/2: a changed clamped value exceeded M, and the rate is
      that value times ``lr * scale`` >= 1/2;
    * no rate overflows: clamped values are at most M and ``lr * scale`` is at most 1.

    Elsewhere nothing is rescaled or capped. The exponent e is kept within +/-100, which
    keeps the scaled numerator in float32's normal range (below ``lr * scale`` = 2**-100 the
    first guarantee covers rates up to M * lr * scale * 2**100). Without ``lr`` the bounds
    are only capped, which is exact only where ``lr * scale`` >= 1 or the bounds stay
    inside the range. ``lr`` may be a float or a tensor; the power of two follows lr's value,
    not its gradient, so the rate stays differentiable in lr.
    """
    largest = torch.finfo(dtype).max
    numerator, lower, upper, scale = c.numerator, c.lower, c.upper, c.scale
    if lr is not None:
        two = _rescaling(upper, lr * scale, dtype)
        if isinstance(two, Tensor) or two != 1.0:
            numerator, lower, upper = numerator * two, lower * two, upper * two
            scale = scale / two
    return c._replace(
        numerator=numerator,
        lower=_cap(lower, largest),
        upper=_cap(upper, largest),
        scale=scale,
    )


_EXPONENT_LIMIT = 100


def _rescaling(upper: Scalar, k: Scalar, dtype: torch.dtype) -> Scalar:
    """2**e with k = m * 2**e, m in [0.5, 1), where ``upper`` or ``upper * k`` comes within a
    factor of two of ``dtype``'s largest value; 1 elsewhere."""
    low, high = 2.0**-_EXPONENT_LIMIT, 2.0**_EXPONENT_LIMIT
    two: Scalar
    if isinstance(k, Tensor):
        # In dtype: a float scalar times it then keeps dtype's precision, not k's.
        k = k.detach().to(dtype)
        mantissa, _ = torch.frexp(k)
        # k / mantissa is exactly 2**e: a representable quotient is rounded to itself.
        two = torch.where(torch.isfinite(k) & (k > 0), k / mantissa, 1.0).clamp(low, high)
    else:
        two = min(max(math.ldexp(1.0, math.frexp(k)[1]), low), high) if 0 < k < math.inf else 1.0
    near = torch.finfo(dtype).max / 2
    if isinstance(upper, Tensor) or isinstance(k, Tensor):
        needed = torch.logical_or(torch.as_tensor(upper > near), torch.as_tensor(upper * k > near))
        return torch.where(needed, two, 1.0)
    return two if upper > near or upper * k > near else 1.0


def _cap(x: Scalar, largest: float) -> Scalar:
    if not isinstance(x, Tensor):
        return min(x, largest)
    # A tensor cannot be clamped to a value beyond its own dtype's range.
    return torch.clamp(x, max=min(largest, torch.finfo(x.dtype).max))
