"""A run's configuration: built from a task's defaults, the paper's presets and the values
given, checked in full before any data is touched, and compared with a saved run's on resume."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch

from dynabound.scaling import SCALABLE_METHODS, scale_batch_size

from .optimizers import build_optimizer
from .presets import preset
from .tasks import get_task

__all__ = [
    "RESUMABLE_CHANGES",
    "build_config",
    "check_hparams",
    "check_resume_config",
    "scaled_hparams",
]

# Options that may differ when a run is resumed; everything else must match the saved run.
RESUMABLE_CHANGES = ("epochs", "device", "amp", "data_dir", "download")


def check_hparams(optim: str, hparams: dict[str, Any]) -> None:
    """Raise the ValueError the optimizer would raise for these hyperparameters, by building
    it on a placeholder parameter: one place decides what is valid, and it is the optimizer."""
    build_optimizer(optim, [torch.zeros(1, requires_grad=True)], hparams)


def scaled_hparams(
    optim: str, hparams: dict[str, Any], from_batch: int, to_batch: int
) -> dict[str, Any]:
    """``hparams`` tuned for batch size ``from_batch``, carried to ``to_batch`` by
    :func:`dynabound.scale_batch_size` (the square root rule; for the bounded methods also
    ``final_lr`` and ``gamma`` times the batch ratio)."""
    name = optim.lower()
    if name not in SCALABLE_METHODS:
        raise ValueError(
            f"--scale-from-batch: no batch-size scaling rule for {optim}; it has one for "
            f"{', '.join(SCALABLE_METHODS)}"
        )
    return scale_batch_size(hparams, from_batch, to_batch, method=name)


def build_config(
    task: str,
    optim: str,
    *,
    hparams: dict[str, Any] | None = None,
    task_args: dict[str, Any] | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    milestones: list[int] | None = None,
    lr_decay: float | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    device: str = "auto",
    amp: bool | None = None,
    record_bounds: bool = True,
    scale_from_batch: int | None = None,
) -> dict[str, Any]:
    """A complete run configuration: the task's defaults and the paper's presets, with
    every value given here taking precedence. Every value is checked here, so that a bad
    one is reported before a run loads any data.

    ``scale_from_batch``: the hyperparameters (presets and overrides) are taken as tuned for
    that batch size and scaled to ``batch_size`` (:func:`scaled_hparams`); the configuration
    then also keeps them as given, under ``tuned_hparams``."""
    cls = get_task(task)
    args = {k: v for k, v in (task_args or {}).items() if v is not None}
    cls.check_args(args)
    d = cls.defaults
    batch = int(d["batch_size"] if batch_size is None else batch_size)
    if batch < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {batch}")
    if scale_from_batch is not None and scale_from_batch < 1:
        raise ValueError(f"--scale-from-batch must be a positive integer, got {scale_from_batch}")
    values = preset(task, optim, hparams, model=cls.preset_model(args))
    tuned = dict(values)
    if scale_from_batch is not None:
        values = scaled_hparams(optim, values, scale_from_batch, batch)
    values = cls.adjust_hparams(optim.lower(), values, args)
    check_hparams(optim, values)
    config: dict[str, Any] = {
        "task": task,
        "optim": optim.lower(),
        "hparams": values,
        "task_args": args,
        "epochs": int(d["epochs"] if epochs is None else epochs),
        "batch_size": batch,
        "seed": int(seed),
        "milestones": list(d["milestones"] if milestones is None else milestones),
        "lr_decay": float(d["lr_decay"] if lr_decay is None else lr_decay),
        "data_dir": str(data_dir if data_dir is not None else "data"),
        "download": bool(download),
        "device": device,
        "amp": amp,
        "record_bounds": bool(record_bounds),
    }
    if scale_from_batch is not None:
        # Only when used, so that configurations saved before the option compare equal.
        config.update(scale_from_batch=int(scale_from_batch), tuned_hparams=tuned)
    if config["epochs"] < 1:
        raise ValueError(f"--epochs must be a positive integer, got {config['epochs']}")
    if not (math.isfinite(config["lr_decay"]) and config["lr_decay"] > 0):
        raise ValueError(f"--lr-decay must be positive, got {config['lr_decay']}")
    if any(m < 1 for m in config["milestones"]):
        raise ValueError(f"--milestones are epochs, 1 or more, got {config['milestones']}")
    return json.loads(json.dumps(config))  # tuples become lists, as after a reload


def check_resume_config(saved: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The saved configuration with the allowed changes in ``given`` applied."""
    merged = dict(saved)
    diffs = []
    for key, value in given.items():
        if key in RESUMABLE_CHANGES:
            merged[key] = value
        elif saved.get(key) != value:
            diffs.append(f"{key}: saved {saved.get(key)!r}, given {value!r}")
    if diffs:
        raise ValueError(
            "cannot resume with a different configuration (only "
            f"{', '.join(RESUMABLE_CHANGES)} may change):\n  " + "\n  ".join(diffs)
        )
    return merged
