"""The option sets every fast path is tested with against the single-tensor reference."""

from __future__ import annotations

# A bound function unlike the built-in schedules (tensor-friendly arithmetic only).
USER_BOUNDS = lambda t: (0.05 * (1 - 1 / (0.01 * t + 1)), 0.05 * (1 + 3 / (0.01 * t)))  # noqa: E731

EVERY_OPTION: dict[str, dict] = {
    "default": {},
    "amsbound": dict(amsbound=True),
    "coupled_wd": dict(weight_decay=0.1),
    "adamw_decay": dict(weight_decay=0.1, decoupled_weight_decay=True),
    "unscaled_decay": dict(weight_decay=0.1, decoupled_weight_decay=True, unscaled_decay=True),
    "maximize": dict(maximize=True),
    "paper": dict(bounds="paper"),
    "callable_bounds": dict(bounds=USER_BOUNDS),
    "box": dict(box=(-0.3, 0.25)),
    "everything": dict(amsbound=True, weight_decay=0.05, maximize=True, box=(-1.0, 1.0)),
    "lr_zero": dict(lr=0.0, base_lr=1e-2),
}
