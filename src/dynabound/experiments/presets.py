"""The paper's optimizer hyperparameters per task; every value can be overridden.

Sources, in order of authority:

* CIFAR-10 (design.md section 5, from the paper and its released demo): SGDM lr 0.1
  momentum 0.9, AdaGrad lr 0.01, Adam/AMSGrad lr 1e-3 with beta1 0.99 (ResNet-34) or 0.9
  (DenseNet-121), AdaBound/AMSBound lr 1e-3 final_lr 0.1 gamma 1e-3, weight decay 5e-4.
* MNIST and digits: the paper tunes each method on the same grids and reports no
  per-method MNIST values, so the CIFAR-10 winners of those grids are used (without weight
  decay, as in the paper's MNIST setup).
* Dampened SGDM (``sgdm-damped``): AdaBound's limit on each task, so it is the SGD that
  AdaBound's preset becomes: momentum and dampening 0.9 (AdaBound's beta1) and lr equal
  to AdaBound's final_lr (0.1; 10 on Penn Treebank), with AdaBound's weight decay. Savarese
  (arXiv 1908.04457) compares AdaBound with this baseline.
* AdamW/AdaBoundW: decoupled decay chosen so that ``lr * weight_decay`` per step equals
  SGDM's ``0.1 * 5e-4``: 0.05 at lr 1e-3.
* Penn Treebank: the paper gives no values and released no code for its LSTMs. The values
  below are this project's: Adam-family lr 1e-3 (the paper's default); SGDM lr 1 with
  momentum 0.9, i.e. steps of about 10x the clipped gradient, like the usual plain-SGD lr
  of 10-20 with clipping at 0.25; AdaBound's final_lr 10, because its SGD phase steps
  ``final_lr * m`` with ``m`` an average (not a sum) of gradients, so this matches SGDM's
  step size; AdaGrad lr 0.05, the top of the paper's grid (0.01 learns far more slowly
  here). A 400-step check on the real data (1-layer, 200 units) gave validation
  perplexities of about 400 for Adam, SGDM and AdaBound with these values, against 650
  for AdaBound with final_lr 1.
* Comparators (comparators.py), the same on every task, without weight decay: Adan
  lr 1e-3 with its paper's betas (0.02, 0.08, 0.01 in the paper's notation, 0.98, 0.92,
  0.99 here) and eps 1e-8; AdamSSM Adam's values with pole 0.9 and zero 0.5 (this
  project's choice: the paper's could not be confirmed); delta-GClip the authors' ViT
  settings, lr 0.2, clip_norm (their gamma) 1 and delta 1e-3; signSGD and Signum lr 1e-4,
  Signum momentum 0.9 (Bernstein et al.'s Signum settings).
* Convex counterexample: Reddi et al.'s step size alpha/sqrt(t) with alpha 0.5 and, for the
  bounded methods, the paper's theory variant (``bounds="paper"``, projection onto [-1, 1]);
  the betas and the bounded methods' final_lr belong to the problem and are set by the task.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .optimizers import ALLOWED, OPTIMIZERS

__all__ = ["TASK_PRESETS", "preset"]

_BASE: dict[str, dict[str, Any]] = {
    "sgdm": {"lr": 0.1, "momentum": 0.9},
    "sgdm-damped": {"lr": 0.1, "momentum": 0.9, "dampening": 0.9},
    "adagrad": {"lr": 0.01},
    "adam": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999},
    "amsgrad": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999},
    "adamw": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.05},
    "adabound": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "final_lr": 0.1, "gamma": 1e-3},
    "amsbound": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "final_lr": 0.1, "gamma": 1e-3},
    "adaboundw": {
        "lr": 1e-3,
        "beta1": 0.9,
        "beta2": 0.999,
        "final_lr": 0.1,
        "gamma": 1e-3,
        "weight_decay": 0.05,
    },
    "adan": {"lr": 1e-3, "beta1": 0.98, "beta2": 0.92, "beta3": 0.99, "eps": 1e-8},
    "adamssm": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "pole": 0.9, "zero": 0.5},
    "gclip": {"lr": 0.2, "clip_norm": 1.0, "delta": 1e-3},
    "signsgd": {"lr": 1e-4},
    "signum": {"lr": 1e-4, "momentum": 0.9},
}
_BASE["amsboundw"] = dict(_BASE["adaboundw"])


def _with(base: Mapping[str, dict[str, Any]], **changes: dict[str, Any]) -> dict:
    out = {k: dict(v) for k, v in base.items()}
    for name, values in changes.items():
        out[name].update(values)
    return out


_CIFAR = _with(
    _BASE,
    **{
        name: {"weight_decay": 5e-4}
        for name in ("sgdm", "sgdm-damped", "adagrad", "adam", "amsgrad", "adabound", "amsbound")
    },
)
_PTB = _with(
    _BASE,
    sgdm={"lr": 1.0},
    adagrad={"lr": 0.05},
    **{"sgdm-damped": {"lr": 10.0}},
    adabound={"final_lr": 10.0},
    amsbound={"final_lr": 10.0},
    adaboundw={"final_lr": 10.0, "weight_decay": 0.0},
    amsboundw={"final_lr": 10.0, "weight_decay": 0.0},
    adamw={"weight_decay": 0.0},
)
# final_lr is the problem's (set by the convex task): 0.5 or 1e-3.
_BOUNDED_THEORY = {"lr": 0.5, "bounds": "paper", "box": (-1.0, 1.0)}
_CONVEX: dict[str, dict[str, Any]] = {
    "adam": {"lr": 0.5},
    "amsgrad": {"lr": 0.5},
    "adabound": dict(_BOUNDED_THEORY),
    "amsbound": dict(_BOUNDED_THEORY),
}

TASK_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "digits": _BASE,
    "mnist": _BASE,
    "cifar10": _CIFAR,
    "ptb": _PTB,
    "convex": _CONVEX,
}


def preset(
    task: str,
    optim: str,
    overrides: Mapping[str, Any] | None = None,
    *,
    model: str | None = None,
) -> dict[str, Any]:
    """Hyperparameters for ``optim`` on ``task`` (``model`` picks CIFAR's Adam beta1), with
    ``overrides`` applied last. Overrides with value None are ignored. Dampened SGDM's
    dampening follows a momentum given without a dampening: the method is dampening =
    momentum."""
    if task not in TASK_PRESETS:
        raise ValueError(f"no presets for task {task!r}; known: {', '.join(TASK_PRESETS)}")
    name = optim.lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optim!r}; choose from {', '.join(OPTIMIZERS)}")
    table = TASK_PRESETS[task]
    if name not in table:
        raise ValueError(
            f"task {task!r} compares {', '.join(table)}; it has no preset for {optim!r}"
        )
    values = dict(table[name])
    if task == "cifar10" and name in ("adam", "amsgrad"):
        values["beta1"] = 0.9 if model == "densenet121" else 0.99
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key, value in given.items():
        if key not in ALLOWED[name]:
            raise ValueError(f"{optim} does not take {key!r}; it takes {sorted(ALLOWED[name])}")
        values[key] = value
    if name == "sgdm-damped" and "momentum" in given and "dampening" not in given:
        values["dampening"] = given["momentum"]
    return values
