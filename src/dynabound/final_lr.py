"""Choosing ``final_lr``: the AdaBound limit that takes the steps of a given SGD recipe.

Once AdaBound's bounds have closed, its update is ``p -= final * m`` with
``m = beta1*m + (1-beta1)*g`` (``m`` starts at zero) and ``final = final_lr * lr / base_lr``.
``torch.optim.SGD(lr, momentum, dampening)`` steps ``p -= lr * b`` with
``b = momentum*b + (1-dampening)*g``, except on its first step, where torch seeds the buffer
with the gradient itself (``b = g``, no dampening).

Both are linear filters of the gradients. In steady state (a constant gradient ``g``) SGD's
step is ``lr * (1-dampening)/(1-momentum) * g`` and AdaBound's is ``final * g``, so

    final = lr * (1 - dampening) / (1 - momentum)

When ``momentum == beta1`` the two filters have the same shape and the match holds step by
step, not only in steady state:

* ``dampening = 0`` (torch's default): exact from the first step. ``b`` equals
  ``m / (1-beta1)`` at every step, torch's seeding included. An SGD recipe with momentum
  0.9 at lr 0.1 is AdaBound's limit with ``final_lr = 1.0``.
* ``dampening = momentum`` (Savarese, arXiv:1908.04457; Keskar and Socher's SWATS): equal
  filters, ``final = lr``, but torch's undampened first step moves the parameters by an
  extra ``lr * dampening * g1 / (1-momentum)`` over the following steps (``g1`` the first
  gradient), which no ``final_lr`` reproduces. An SGD whose buffer starts at zero (set
  ``optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)`` before the first step)
  is matched exactly.

Otherwise (``momentum != beta1``, Nesterov momentum, or no momentum at all) the match is
the steady-state one: the same step for a slowly varying gradient, with a different
response to fast changes. AdaBound's lr schedule scales ``final`` (``lr / base_lr``), so an
SGD schedule that multiplies its rate by ``k(t)`` is matched by the same schedule on
AdaBound's lr.

``final_lr="auto"`` estimates the value instead (Keskar and Socher's SWATS projection,
arXiv:1712.07628). At each step of a param group, Adam's unclipped step ``p`` and the
gradient ``g`` give the SGD rate that takes the same step along ``p``:
``gamma = (p . p) / (p . g)``, over all the group's parameters. Referred to ``base_lr``
(``final_lr`` scales with ``lr / base_lr``, so does Adam's step) and smoothed by a
bias-corrected exponential average with ``beta2``, that is the ``final_lr`` in use from the
next step on. SWATS's SGD phase is the dampened-momentum step, so its rate is, unit for
unit, AdaBound's ``final``. The estimate is fixed once it has settled: its relative change
from one sample to the next stayed below :data:`SETTLE_TOLERANCE` for
:data:`SETTLE_PATIENCE` samples in a row, or the group has estimated for
:func:`estimation_cap` steps (``ceil(1/gamma)``: by then the bounds are within a factor
two of ``final``, and a ``final`` that still moved would act as an lr schedule). Steps whose
Adam step does not descend (``p . g <= 0``) or has no length give no sample. Until the
first sample exists (a group's first step) the step is Adam's, unclipped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real
from typing import Any

__all__ = [
    "AUTO",
    "SETTLE_PATIENCE",
    "SETTLE_TOLERANCE",
    "estimation_cap",
    "final_lr_at",
    "final_lr_from_sgd",
    "new_estimation",
    "record_sample",
    "sgd_step_factor",
]

AUTO = "auto"
SETTLE_TOLERANCE = 1e-3
SETTLE_PATIENCE = 100

# Why final_lr="auto" is refused with some bounds; every backend says it in these words.
AUTO_WITH_BOUND_FUNCTION = (
    "final_lr='auto' cannot apply with a bound function: the function ignores final_lr"
)
AUTO_WITH_PAPER_BOUNDS = (
    "final_lr='auto' does not apply to bounds='paper': its Adam-phase rate is divided "
    "by sqrt(t), so the SGD rate matching it decays and never settles to one final_lr"
)


def _check(name: str, value: float, low: float, high: float, *, high_open: bool = True) -> None:
    real = isinstance(value, Real) and math.isfinite(value)
    inside = real and (low <= value < high if high_open else low <= value <= high)
    if not inside:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must be in [{low:g}, {high:g}{bracket}, got {value!r}")


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, Real) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def sgd_step_factor(momentum: float, dampening: float = 0.0, *, nesterov: bool = False) -> float:
    """How many gradients one steady-state step of ``torch.optim.SGD`` takes per unit of lr:
    ``(1 - dampening) / (1 - momentum)``, or 1 without momentum (torch then ignores
    ``dampening``).

    Nesterov momentum steps ``lr * (g + momentum*b)``: in steady state
    ``1 + momentum/(1-momentum) = 1/(1-momentum)``, and torch requires ``dampening = 0``
    with it.
    """
    _check("momentum", momentum, 0.0, 1.0)
    _check("dampening", dampening, 0.0, 1.0, high_open=False)
    if nesterov and (momentum == 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening (as in torch)")
    if momentum == 0:
        return 1.0
    return (1.0 - dampening) / (1.0 - momentum)


def final_lr_from_sgd(
    lr: float,
    momentum: float = 0.9,
    dampening: float = 0.0,
    *,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
    adam_lr: float | None = None,
    base_lr: float | None = None,
) -> float:
    """The ``final_lr`` whose SGD phase takes the steps of ``torch.optim.SGD(lr, momentum,
    dampening, nesterov)``.

    ``final = lr * (1 - dampening) / (1 - momentum)``: exact step by step when
    ``momentum == betas[0]`` and ``dampening == 0``, exact but for torch's undampened first
    step when ``dampening == momentum``, and a steady-state match otherwise (see the module
    documentation). Examples: ``final_lr_from_sgd(0.1)`` is 1.0 (momentum 0.9, torch's
    default dampening 0), ``final_lr_from_sgd(0.1, dampening=0.9)`` is 0.1.

    ``final_lr`` is referred to the group's ``base_lr``: AdaBound's final rate is
    ``final_lr * adam_lr / base_lr``. Leave both out when the optimizer is built with its
    ``base_lr`` equal to its lr (the default); give both when they differ, for example when
    building AdaBound from a checkpoint whose lr has already been decayed.

    Args:
        lr: the SGD recipe's learning rate (positive).
        momentum: its momentum, in [0, 1).
        dampening: its dampening, in [0, 1) (1 would make every step zero).
        nesterov: whether the recipe uses Nesterov momentum.
        betas: AdaBound's betas; only ``betas[0]`` matters, for whether the match is exact.
        adam_lr: AdaBound's lr at the time the match should hold, with ``base_lr``.
        base_lr: AdaBound's ``base_lr``, with ``adam_lr``.

    Returns:
        The ``final_lr`` to pass to ``AdaBound`` and its siblings (and to the optax and
        Keras ports, whose ``final_lr`` is referred to their base rate alike).
    """
    _check_positive("lr", lr)
    if dampening == 1 and momentum != 0:
        raise ValueError("dampening 1 makes every SGD step zero; no final_lr matches it")
    _check("betas[0]", betas[0], 0.0, 1.0)
    if (adam_lr is None) != (base_lr is None):
        raise ValueError("give both adam_lr and base_lr, or neither")
    ratio = 1.0
    if adam_lr is not None and base_lr is not None:
        _check_positive("adam_lr", adam_lr)
        _check_positive("base_lr", base_lr)
        ratio = base_lr / adam_lr
    final_lr = lr * sgd_step_factor(momentum, dampening, nesterov=nesterov) * ratio
    # 1 - 0.9 is 0.09999999999999998 in binary, so 0.1 / (1 - 0.9) would print as
    # 1.0000000000000002; 15 significant digits give the decimal value the recipe meant and
    # stay within float rounding of the exact quotient.
    return float(f"{final_lr:.15g}")


def estimation_cap(gamma: float) -> int:
    """The most steps a group estimates before its estimate is fixed: ``ceil(1/gamma)``
    (at least :data:`SETTLE_PATIENCE`). At step ``1/gamma`` the reference bounds are
    ``final/2`` and ``2*final``."""
    return max(SETTLE_PATIENCE, math.ceil(1.0 / gamma))


def new_estimation() -> dict:
    """The record of one group's estimate, as the group keeps it (plain Python values, so
    ``state_dict`` saves it and ``torch.load(weights_only=True)`` reads it back exactly).

    * ``estimate``: the bias-corrected average, the ``final_lr`` in use (None before the
      first sample);
    * ``average``, ``samples``: the uncorrected exponential average and how many samples
      it holds;
    * ``calm``: how many consecutive samples changed the estimate by less than
      :data:`SETTLE_TOLERANCE` (relative);
    * ``steps``: steps taken while estimating; ``fixed_at``: the step at which the
      estimate was fixed (None while estimating);
    * ``history``: ``[step, sample, estimate]`` per estimating step (``sample`` is NaN on a
      step that gave none).
    """
    return {
        "estimate": None,
        "average": 0.0,
        "samples": 0,
        "calm": 0,
        "steps": 0,
        "fixed_at": None,
        "history": [],
    }


def record_sample(record: dict, step: int, sample: float, beta: float, cap: int) -> bool:
    """Add one step's sample (NaN or a non-positive value: none) to ``record``; return
    whether the estimate is now fixed."""
    record["steps"] += 1
    valid = math.isfinite(sample) and sample > 0
    if valid:
        previous = record["estimate"]
        record["samples"] += 1
        record["average"] = beta * record["average"] + (1.0 - beta) * sample
        estimate = record["average"] / (1.0 - beta ** record["samples"])
        record["estimate"] = estimate
        if previous is not None and abs(estimate - previous) < SETTLE_TOLERANCE * estimate:
            record["calm"] += 1
        else:
            record["calm"] = 0
    record["history"].append([step, sample if valid else math.nan, record["estimate"]])
    settled = record["calm"] >= SETTLE_PATIENCE
    if record["estimate"] is not None and (settled or record["steps"] >= cap):
        record["fixed_at"] = step
        return True
    return False


def final_lr_at(group: Mapping[str, Any], step: int) -> float | None:
    """The ``final_lr`` a param group's step ``step`` used (or, for a step not taken yet,
    will use): the group's number, or during estimation the estimate of the step before
    (None: the step was Adam's, unbounded, before the first sample)."""
    record = group.get("final_lr_auto")
    history = record["history"] if record else []
    if history and history[0][0] <= step <= history[-1][0]:
        index = int(step - history[0][0])
        return history[index - 1][2] if index > 0 else None
    final_lr = group["final_lr"]
    if final_lr == AUTO:
        return record["estimate"] if record else None
    return float(final_lr)
