"""Build the optimizers the paper compares from a name and a dict of hyperparameters.

Names: ``sgdm``, ``sgdm-damped``, ``adagrad``, ``adam``, ``amsgrad``, ``adamw``,
``adabound``, ``amsbound``, ``adaboundw``, ``amsboundw``, and the comparators of
:mod:`.comparators` (``adan``, ``adamssm``, ``gclip``, ``signsgd``, ``signum``).
Hyperparameters use one vocabulary for every optimizer (``lr``, ``momentum``,
``dampening``, ``beta1``, ``beta2``, ``beta3``, ``final_lr``, ``gamma``, ``eps``,
``weight_decay``, ``bounds``, ``box``, ``unscaled_decay``, ``nesterov``, ``pole``, ``zero``,
``clip_norm``, ``delta``); passing one that an optimizer does not take is a ValueError, so a
typo never goes unnoticed.

``sgdm`` is torch's SGD as it is (dampening 0 unless given). ``sgdm-damped`` is the SGD that
AdaBound becomes once its bounds have closed on ``final`` (design.md, section 2): dampening
equal to the momentum, and the momentum buffer started at zero like AdaBound's first moment
(:class:`DampedSGD`).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from dynabound import AdaBound, AdaBoundW, AMSBound, AMSBoundW

from .comparators import COMPARATORS

__all__ = [
    "COMPARED",
    "DISPLAY_NAMES",
    "DYNABOUND_OPTIMIZERS",
    "OPTIMIZERS",
    "PAPER_SIX",
    "DampedSGD",
    "build_optimizer",
    "display_name",
    "effective_sgd_step",
    "is_dynabound",
]

DISPLAY_NAMES = {
    "sgdm": "SGDM",
    "sgdm-damped": "SGDM (dampened)",
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
# What `compare` runs by default: the paper's six and AdaBound's own limit, the SGD it
# becomes, without which a gain over SGDM cannot be told from the 10x larger step of
# undampened momentum at the same lr.
COMPARED = (*PAPER_SIX, "sgdm-damped")
DYNABOUND_OPTIMIZERS = ("adabound", "amsbound", "adaboundw", "amsboundw")

_ADAM_KEYS = {"lr", "beta1", "beta2", "eps", "weight_decay"}
_BOUND_KEYS = _ADAM_KEYS | {"final_lr", "gamma", "bounds", "box", "state_dtype"}
ALLOWED: dict[str, set[str]] = {
    "sgdm": {"lr", "momentum", "dampening", "weight_decay", "nesterov"},
    "sgdm-damped": {"lr", "momentum", "dampening", "weight_decay", "nesterov"},
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


def effective_sgd_step(name: str, hparams: Mapping[str, Any]) -> tuple[float, str]:
    """The step per unit of gradient that an optimizer takes in its SGD regime, and its
    formula: the common axis on which SGDM's lr and AdaBound's final_lr can be compared.

    * SGD with momentum ``m`` and dampening ``d``: under a steady gradient ``g`` the buffer
      settles at ``g (1-d)/(1-m)``, so the step is ``lr (1-d)/(1-m)``: ``lr/(1-m)`` for
      torch's default d = 0 (ten times lr at m = 0.9), ``lr`` with d = m. Without momentum
      torch ignores the dampening: the step is ``lr``.
    * The bounded methods, once the bounds have closed: ``final * m`` with ``m`` an average
      of gradients, and ``final = final_lr * lr / base_lr`` is ``final_lr`` (a run's lr is
      its base lr). The paper's bounds (``bounds="paper"``) divide the rate by sqrt(t) and
      have no such constant step.

    Missing values take :func:`build_optimizer`'s defaults. Other optimizers have no SGD
    regime: ValueError.
    """
    key = _check_name(name)
    if key in ("sgdm", "sgdm-damped"):
        lr, momentum = hparams.get("lr", 0.1), hparams.get("momentum", 0.9)
        dampening = hparams.get("dampening", momentum if key == "sgdm-damped" else 0.0)
        if not 0 <= momentum < 1:
            raise ValueError(f"{display_name(key)}: momentum must lie in [0, 1), got {momentum}")
        if momentum == 0:
            return lr, "lr"
        if dampening == momentum:
            return lr, "lr"
        if dampening == 0:
            return lr / (1 - momentum), "lr/(1-momentum)"
        return lr * (1 - dampening) / (1 - momentum), "lr(1-dampening)/(1-momentum)"
    if key in DYNABOUND_OPTIMIZERS:
        if hparams.get("bounds", "reference") == "paper":
            raise ValueError(
                f"{display_name(key)} with the paper's bounds has no constant SGD step: its "
                "rate is divided by sqrt(t)"
            )
        return hparams.get("final_lr", 0.1), "final_lr"
    raise ValueError(
        f"{display_name(key)} has no effective SGD step: it is defined for SGDM, dampened "
        f"SGDM and the bounded methods ({', '.join(DYNABOUND_OPTIMIZERS)})"
    )


def build_optimizer(
    name: str, params: Iterable[Any], hparams: Mapping[str, Any]
) -> torch.optim.Optimizer:
    """A ready optimizer for ``params``; missing hyperparameters take each class's defaults,
    except SGDM's momentum (0.9, the paper's), dampened SGDM's dampening (its momentum) and
    AdaGrad's initial accumulator (0)."""
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
    if key in ("sgdm", "sgdm-damped"):
        return _build_sgd(key, params, h)
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


class DampedSGD(torch.optim.SGD):
    """torch's SGD with every momentum buffer started at zero.

    torch's SGD sets a buffer to the first gradient it sees, undampened, and dampens only
    from the second step on. Started at zero, every step is ``buf = momentum*buf +
    (1-dampening)*g; p -= lr*buf``; with dampening = momentum = beta1 that is AdaBound's
    ``m`` and its step once the bounds have closed on ``final = lr``, from the first step
    on. With torch's start the first step would be 1/(1-dampening) times larger (10 at
    0.9), and the buffer would carry that first gradient for tens of steps.
    """

    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:  # the gradients it computes decide which buffers start
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["momentum"] == 0:
                continue
            for p in group["params"]:
                state = self.state[p]
                if p.grad is not None and state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
        super().step()
        return loss


def _build_sgd(key: str, params: Iterable[Any], h: dict[str, Any]) -> torch.optim.Optimizer:
    momentum = h.get("momentum", 0.9)
    dampening = h.get("dampening", momentum if key == "sgdm-damped" else 0.0)
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
    if not 0 <= dampening < 1:
        raise ValueError(f"dampening must lie in [0, 1), got {dampening}")
    nesterov = bool(h.get("nesterov", False))
    if nesterov and (dampening != 0 or momentum == 0):
        raise ValueError(
            f"{display_name(key)} cannot use nesterov with momentum {momentum:g} and "
            f"dampening {dampening:g}: torch's Nesterov momentum needs a momentum and "
            "dampening 0 (sgdm with dampening 0 takes nesterov)"
        )
    cls = DampedSGD if key == "sgdm-damped" else torch.optim.SGD
    return cls(
        params,
        lr=h.get("lr", 0.1),
        momentum=momentum,
        dampening=dampening,
        weight_decay=h.get("weight_decay", 0.0),
        nesterov=nesterov,
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
