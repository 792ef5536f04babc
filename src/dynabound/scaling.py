"""Batch-size scaling of Adam-family and AdaBound hyperparameters.

:func:`scale_batch_size` carries a configuration tuned at one batch size to another, so that
training at the new batch size follows (approximately) the same trajectory per sample seen.

Adam, AMSGrad, AdamW: the square root scaling rule of Malladi, Lyu, Panigrahi and Arora,
"On the SDEs and Scaling Rules for Adaptive Gradient Algorithms" (NeurIPS 2022,
arXiv:2205.10287), their scaling rule for Adam: when the batch size is multiplied by
``kappa``, use ``lr * sqrt(kappa)``, ``1 - beta1`` and ``1 - beta2`` times ``kappa``, and
``eps / sqrt(kappa)``. It comes from their SDE approximation of Adam and holds while the
gradient noise dominates the gradient (small batches, late training); it says nothing
about a ``kappa`` for which a beta would leave [0, 1), which is refused here.

AdaBound, AMSBound (and their W variants) are not covered by that paper; the extension here
is this library's. The Adam phase follows the square root rule. The SGD phase, where both
bounds have closed on ``final_lr``, is SGD with momentum in the form ``p -= final_lr * m``
with ``m`` an average of gradients, whose SDE scaling rule is linear: ``final_lr`` times
``kappa`` (with ``1 - beta1`` times ``kappa`` as above). ``gamma`` times ``kappa`` makes the
bounds close after the same number of samples rather than of steps, since they depend on
``gamma * step``. The two phases agree: with noise-dominated gradients the second moment
scales as 1/batch, so the Adam phase's per-element rate ``lr / sqrt(v)`` also grows by
``kappa`` under the square root rule, and the same elements are clipped before and after.
(``bounds="paper"`` closes the bounds with ``(1 - beta2) * step``, which the rule already
keeps per sample.)

Weight decay: a coupled (L2) decay is part of the objective and is not changed. A decoupled
decay is scaled so that the decay per sample is unchanged: ``lr * weight_decay`` per step
times ``kappa`` (so ``weight_decay`` times ``sqrt(kappa)``), or, for the authors' unscaled
``p -= weight_decay * p`` (``unscaled_decay=True``), ``weight_decay`` times ``kappa``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["SCALABLE_METHODS", "scale_batch_size"]

_ADAM_METHODS = ("adam", "amsgrad", "adamw")
_BOUNDED_METHODS = ("adabound", "amsbound", "adaboundw", "amsboundw")
SCALABLE_METHODS = _ADAM_METHODS + _BOUNDED_METHODS
_DECOUPLED_METHODS = ("adamw", "adaboundw", "amsboundw")

# The constructors' defaults (torch.optim.Adam/AdamW, dynabound.AdaBound): a key the rule
# scales must be known to be scaled, so a missing one takes its default first. AdamW's
# weight decay default differs from Adam's.
_DEFAULTS: dict[str, Any] = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
_BOUNDED_DEFAULTS: dict[str, Any] = {"final_lr": 0.1, "gamma": 1e-3}
_WEIGHT_DECAY_DEFAULTS = {"adamw": 1e-2}


def scale_batch_size(
    hyperparameters: Mapping[str, Any],
    from_batch: int,
    to_batch: int,
    *,
    method: str | None = None,
) -> dict[str, Any]:
    """The hyperparameters for batch size ``to_batch`` of a configuration tuned at
    ``from_batch`` (``kappa = to_batch / from_batch``), as a new dict.

    ``hyperparameters`` uses the names of the constructors (``lr``, ``betas``, ``eps``,
    ``weight_decay``, ``final_lr``, ``gamma``, ``decoupled_weight_decay``,
    ``unscaled_decay``) or the harness's ``beta1`` and ``beta2`` in place of ``betas``; the
    result uses the same spelling as the input. ``method`` is one of ``adam``, ``amsgrad``,
    ``adamw``, ``adabound``, ``amsbound``, ``adaboundw``, ``amsboundw`` (case-insensitive);
    it may instead be given as the key ``"method"`` of ``hyperparameters``, which is then
    kept in the result. Keys the rule does not touch (``amsbound``, ``bounds``, ``box``,
    ...) are copied unchanged; a scaled key that is missing takes the optimizer's default
    first, so the result always spells it out.

    With ``kappa = to_batch / from_batch``: ``lr * sqrt(kappa)``, ``1 - beta`` times
    ``kappa`` for both betas, ``eps / sqrt(kappa)`` (Malladi et al. 2022, square root
    scaling rule for Adam); for the bounded methods also ``final_lr * kappa`` and
    ``gamma * kappa``; see the module's documentation for the reasons and for weight decay.

    Raises ValueError for a batch size that is not a positive integer, an unknown method,
    both ``betas`` and ``beta1``/``beta2``, or a ``kappa`` that takes a beta below 0 (the
    largest allowed ``kappa`` is ``1 / (1 - beta)``).

    >>> scale_batch_size({"lr": 1e-3, "betas": (0.9, 0.999)}, 128, 32, method="adam")
    {'lr': 0.0005, 'betas': (0.975, 0.99975), 'eps': 2e-08}
    """
    for name, batch in (("from_batch", from_batch), ("to_batch", to_batch)):
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"{name} must be a positive integer batch size, got {batch!r}")
    key = _method(hyperparameters, method)
    h = dict(hyperparameters)
    if "betas" in h and ("beta1" in h or "beta2" in h):
        raise ValueError("give the betas either as 'betas' or as 'beta1'/'beta2', not both")
    as_pair = "betas" in h
    if as_pair:
        beta1, beta2 = h.pop("betas")
    else:
        beta1, beta2 = h.pop("beta1", _DEFAULTS["beta1"]), h.pop("beta2", _DEFAULTS["beta2"])
    bounded = key in _BOUNDED_METHODS
    for name in ("lr", "eps", *(_BOUNDED_DEFAULTS if bounded else ())):
        h.setdefault(name, {**_DEFAULTS, **_BOUNDED_DEFAULTS}[name])
    decoupled = key in _DECOUPLED_METHODS or bool(h.get("decoupled_weight_decay", False))
    if decoupled:
        h.setdefault("weight_decay", _WEIGHT_DECAY_DEFAULTS.get(key, 0.0))

    kappa = to_batch / from_batch
    if kappa != 1:  # kappa 1 gives back the values exactly, not 1 - (1 - beta) rounded
        beta1, beta2 = (_scaled_beta(b, kappa, n) for n, b in (("beta1", beta1), ("beta2", beta2)))
        root = math.sqrt(kappa)
        h["lr"] = h["lr"] * root
        h["eps"] = h["eps"] / root
        if bounded:
            if h["final_lr"] != "auto":  # an estimate is made at the new batch size
                h["final_lr"] = h["final_lr"] * kappa
            h["gamma"] = h["gamma"] * kappa
        if decoupled and h.get("weight_decay"):
            unscaled = bool(h.get("unscaled_decay", False))
            h["weight_decay"] = h["weight_decay"] * (kappa if unscaled else root)
    if as_pair:
        h["betas"] = (beta1, beta2)
    else:
        h["beta1"], h["beta2"] = beta1, beta2
    order = [k for k in hyperparameters if k in h]
    return {k: h[k] for k in order + [k for k in h if k not in order]}


def _method(hyperparameters: Mapping[str, Any], method: str | None) -> str:
    given = hyperparameters.get("method")
    if method is None and given is None:
        raise ValueError(
            "say which optimizer the hyperparameters are for: method=... or the key 'method' "
            f"(one of {', '.join(SCALABLE_METHODS)})"
        )
    if method is not None and given is not None and str(given).lower() != method.lower():
        raise ValueError(f"method={method!r} disagrees with the key 'method': {given!r}")
    key = str(method if method is not None else given).lower()
    if key not in SCALABLE_METHODS:
        raise ValueError(
            f"no batch-size scaling rule for {key!r}; known: {', '.join(SCALABLE_METHODS)}"
        )
    return key


def _scaled_beta(beta: float, kappa: float, name: str) -> float:
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {beta}")
    scaled = 1.0 - (1.0 - beta) * kappa
    if scaled < 0.0:
        raise ValueError(
            f"batch-size factor {kappa:g} takes {name} {beta} to {scaled:.4g}, below 0: "
            f"the square root rule allows at most 1 / (1 - {name}) = {1 / (1 - beta):.4g}"
        )
    return scaled
