"""Build the optimizers the paper compares from a name and a dict of hyperparameters.

Names: ``sgdm``, ``adagrad``, ``adam``, ``amsgrad``, ``adamw``, ``adabound``, ``amsbound``,
``adaboundw``, ``amsboundw``, and the comparators of :mod:`.comparators` (``adan``,
``adamssm``, ``gclip``, ``signsgd``, ``signum``). Hyperparameters use one vocabulary for
every optimizer (``lr``, ``momentum``, ``beta1``, ``beta2``, ``beta3``, ``final_lr``,
``gamma``, ``eps``, ``weight_decay``, ``bounds``, ``box``, ``unscaled_decay``, ``nesterov``,
``pole``, ``zero``, ``clip_norm``, ``delta``); passing one that an optimizer does not take is
a ValueError, so a typo never goes unnoticed.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from dynabound import AdaBound, AdaBoundW, AMSBound, AMSBoundW

from .comparators import COMPARATORS

__all__ = [
    "DISPLAY_NAMES",
    "DYNABOUND_OPTIMIZERS",
    "OPTIMIZERS",
    "PAPER_SIX",
    "build_optimizer",
    "display_name",
    "is_dynabound",
]

DISPLAY_NAMES = {
    "sgdm": "SGDM",
    "adagrad": "AdaGrad",
    "adam": "Adam",
    "amsgrad": "AMSGrad",
    "adamw": "AdamW",
    "adabound": "AdaBound",
    "amsbound": "AMSBound",
    "adaboundw": "AdaBoundW",
    "amsboundw": "AMSBoundW",
    **{name: display for name, (_, display, _) in COMPARATORS.items()},
}
OPTIMIZERS = tuple(DISPLAY_NAMES)
PAPER_SIX = ("sgdm", "adagrad", "adam", "amsgrad", "adabound", "amsbound")
DYNABOUND_OPTIMIZERS = ("adabound", "amsbound", "adaboundw", "amsboundw")

_ADAM_KEYS = {"lr", "beta1", "beta2", "eps", "weight_decay"}
_BOUND_KEYS = _ADAM_KEYS | {"final_lr", "gamma", "bounds", "box", "state_dtype"}
ALLOWED: dict[str, set[str]] = {
    "sgdm": {"lr", "momentum", "weight_decay", "nesterov"},
    "adagrad": {"lr", "eps", "weight_decay"},
    "adam": _ADAM_KEYS,
    "amsgrad": _ADAM_KEYS,
    "adamw": _ADAM_KEYS,
    "adabound": _BOUND_KEYS,
    "amsbound": _BOUND_KEYS,
    "adaboundw": _BOUND_KEYS | {"unscaled_decay"},
    "amsboundw": _BOUND_KEYS | {"unscaled_decay"},
    **{name: set(keys) for name, (_, _, keys) in COMPARATORS.items()},
}
_DYNABOUND_CLASSES = {
    "adabound": AdaBound,
    "amsbound": AMSBound,
    "adaboundw": AdaBoundW,
    "amsboundw": AMSBoundW,
}


def _check_name(name: str) -> str:
    key = name.lower()
    if key not in ALLOWED:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    return key


def display_name(name: str) -> str:
    """The paper's spelling of an optimizer name (``amsbound`` -> ``AMSBound``)."""
    return DISPLAY_NAMES[_check_name(name)]


def is_dynabound(name_or_optimizer: str | torch.optim.Optimizer) -> bool:
    """Whether the optimizer (or optimizer name) is one of dynabound's bounded methods."""
    if isinstance(name_or_optimizer, str):
        return _check_name(name_or_optimizer) in DYNABOUND_OPTIMIZERS
    return isinstance(name_or_optimizer, AdaBound)


def build_optimizer(
    name: str, params: Iterable[Any], hparams: Mapping[str, Any]
) -> torch.optim.Optimizer:
    """A ready optimizer for ``params``; missing hyperparameters take each class's defaults,
    except SGDM's momentum (0.9, the paper's) and AdaGrad's initial accumulator (0)."""
    key = _check_name(name)
    unknown = set(hparams) - ALLOWED[key]
    if unknown:
        raise ValueError(
            f"{display_name(key)} does not take {', '.join(sorted(unknown))}; "
            f"it takes {', '.join(sorted(ALLOWED[key]))}"
        )
    h = dict(hparams)
    if "lr" in h and not h["lr"] > 0:
        raise ValueError(f"lr must be positive, got {h['lr']}")
    if key == "sgdm":
        return torch.optim.SGD(
            params,
            lr=h.get("lr", 0.1),
            momentum=h.get("momentum", 0.9),
            weight_decay=h.get("weight_decay", 0.0),
            nesterov=bool(h.get("nesterov", False)),
        )
    if key == "adagrad":
        return torch.optim.Adagrad(
            params,
            lr=h.get("lr", 0.01),
            eps=h.get("eps", 1e-10),
            weight_decay=h.get("weight_decay", 0.0),
            initial_accumulator_value=0.0,
        )
    if key in COMPARATORS:
        return _build_comparator(key, params, h)
    betas = (h.pop("beta1", 0.9), h.pop("beta2", 0.999))
    if key in ("adam", "amsgrad", "adamw"):
        cls = torch.optim.AdamW if key == "adamw" else torch.optim.Adam
        default_wd = 1e-2 if key == "adamw" else 0.0
        return cls(
            params,
            lr=h.get("lr", 1e-3),
            betas=betas,
            eps=h.get("eps", 1e-8),
            weight_decay=h.get("weight_decay", default_wd),
            amsgrad=key == "amsgrad",
        )
    box = h.pop("box", None)
    if h.get("state_dtype") == "bfloat16":  # configs are JSON: the dtype travels by name
        h["state_dtype"] = torch.bfloat16
    return _DYNABOUND_CLASSES[key](
        params, betas=betas, box=tuple(box) if box is not None else None, **h
    )


def _build_comparator(key: str, params: Iterable[Any], h: dict[str, Any]) -> torch.optim.Optimizer:
    """A comparator from the harness's names; the betas, given one by one here, become the
    class's ``betas`` tuple (a missing one takes the class default)."""
    cls = COMPARATORS[key][0]
    names = [f"beta{i}" for i in (1, 2, 3) if f"beta{i}" in COMPARATORS[key][2]]
    if names:
        defaults = inspect.signature(cls).parameters["betas"].default
        h["betas"] = tuple(h.pop(n, d) for n, d in zip(names, defaults, strict=True))
    return cls(params, **h)
