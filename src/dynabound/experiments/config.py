"""A run's configuration: built from a task's defaults, the paper's presets and the values
given, checked in full before any data is touched, and compared with a saved run's on resume."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch

from .optimizers import build_optimizer
from .presets import preset
from .tasks import get_task

__all__ = ["RESUMABLE_CHANGES", "build_config", "check_hparams", "check_resume_config"]

# Options that may differ when a run is resumed; everything else must match the saved run.
RESUMABLE_CHANGES = ("epochs", "device", "amp", "data_dir", "download")


def check_hparams(optim: str, hparams: dict[str, Any]) -> None:
    """Raise the ValueError the optimizer would raise for these hyperparameters, by building
    it on a placeholder parameter: one place decides what is valid, and it is the optimizer."""
    build_optimizer(optim, [torch.zeros(1, requires_grad=True)], hparams)


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
) -> dict[str, Any]:
    """A complete run configuration: the task's defaults and the paper's presets, with
    every value given here taking precedence. Every value is checked here, so that a bad
    one is reported before a run loads any data."""
    cls = get_task(task)
    args = {k: v for k, v in (task_args or {}).items() if v is not None}
    cls.check_args(args)
    values = preset(task, optim, hparams, model=cls.preset_model(args))
    values = cls.adjust_hparams(optim.lower(), values, args)
    check_hparams(optim, values)
    d = cls.defaults
    config = {
        "task": task,
        "optim": optim.lower(),
        "hparams": values,
        "task_args": args,
        "epochs": int(d["epochs"] if epochs is None else epochs),
        "batch_size": int(d["batch_size"] if batch_size is None else batch_size),
        "seed": int(seed),
        "milestones": list(d["milestones"] if milestones is None else milestones),
        "lr_decay": float(d["lr_decay"] if lr_decay is None else lr_decay),
        "data_dir": str(data_dir if data_dir is not None else "data"),
        "download": bool(download),
        "device": device,
        "amp": amp,
        "record_bounds": bool(record_bounds),
    }
    if config["epochs"] < 1 or config["batch_size"] < 1:
        raise ValueError("epochs and batch size must be positive")
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
