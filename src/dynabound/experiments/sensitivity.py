"""A sensitivity study read from run directories: each method's final and best test metric
against the hyperparameter its runs vary, or against the effective SGD step that value
gives (:func:`~.optimizers.effective_sgd_step`), over the seeds of each setting.

``plots.plot_sensitivity`` draws these points; :func:`sensitivity_table` writes them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .optimizers import DISPLAY_NAMES, effective_sgd_step
from .rundir import estimated_final_lr, load_run
from .seeds import final_and_best, group_runs, summarize

__all__ = ["EFFECTIVE_STEP", "SensitivityPoint", "sensitivity_points", "sensitivity_table"]

# The `against` that puts every method on the effective SGD step.
EFFECTIVE_STEP = "effective-step"


@dataclass(frozen=True)
class SensitivityPoint:
    """One setting of one method: the hyperparameter ``key`` at ``value``, ``x`` on the
    figure's axis (``value``, or the effective SGD step given by ``formula``), and the
    summaries (:func:`~.seeds.summarize`) of the final and best test metric over its seeds."""

    optim: str
    key: str
    value: float | str  # "auto": final_lr="auto", x is the runs' mean estimate
    x: float
    formula: str | None  # None: x is the value itself
    final: dict[str, Any]
    best: dict[str, Any]
    seeds: tuple[int, ...]
    epochs: tuple[int, ...]  # each run's last finished epoch: a study still running shows
    metric: str

    @property
    def label(self) -> str:
        name = DISPLAY_NAMES.get(self.optim, self.optim)
        return f"{name}: x = {self.formula}" if self.formula else f"{name} ({self.key})"


def sensitivity_points(
    run_dirs: Sequence[str | os.PathLike[str]], against: Mapping[str, str] | str
) -> list[SensitivityPoint]:
    """The points of a sensitivity study, by method and then by ``x``.

    ``against`` maps each optimizer to the hyperparameter its runs vary (``{"sgdm": "lr",
    "adabound": "final_lr"}``: x is that value), or is :data:`EFFECTIVE_STEP` (x is the
    effective SGD step of each run's hyperparameters, for every method that has one). Runs
    that differ only by their seed make one point. Runs of an optimizer that ``against``
    does not name, and runs without a finished epoch, are refused.
    """
    if isinstance(against, str) and against != EFFECTIVE_STEP:
        raise ValueError(f"against must map optimizers to keys or be {EFFECTIVE_STEP!r}")
    runs = []
    for run in run_dirs:
        config, metrics = load_run(run)
        optim = config["optim"]
        if not isinstance(against, str):
            if optim not in against:
                raise ValueError(f"{run}: no --against given for {optim} (use {optim}=KEY)")
            if against[optim] not in config["hparams"]:
                raise ValueError(
                    f"{run}: {optim} has no hyperparameter {against[optim]!r} in its config"
                )
        if not metrics:
            raise ValueError(f"{run} has no finished epoch")
        runs.append((config, metrics, Path(run)))
    points = []
    for group in group_runs(runs):
        config, hparams = group.config, group.config["hparams"]
        metric = "perplexity" if "test_ppl" in group.metrics[0][-1] else "accuracy"
        if hparams.get("final_lr") == "auto" and (isinstance(against, str) or against.get(
            config["optim"]) == "final_lr"):  # fmt: skip
            # Each seed estimates its own: the point sits at their mean.
            estimates = [estimated_final_lr(m) for m in group.metrics]
            key, formula, value = "final_lr", "final_lr (auto)", "auto"
            x = sum(estimates) / len(estimates)
        elif isinstance(against, str):
            try:
                x, formula = effective_sgd_step(config["optim"], hparams)
            except ValueError as exc:
                raise ValueError(f"{group.run_dirs[0]}: {exc}") from None
            key = "final_lr" if formula == "final_lr" else "lr"
            value = hparams.get(key, x)
        else:
            key, formula = against[config["optim"]], None
            x = value = hparams[key]
        finals, bests = zip(*(final_and_best(m, metric) for m in group.metrics), strict=True)
        points.append(
            SensitivityPoint(
                optim=config["optim"],
                key=key,
                value=value,
                x=x,
                formula=formula,
                final=summarize(finals),
                best=summarize(bests),
                seeds=tuple(group.seeds),
                epochs=tuple(m[-1]["epoch"] for m in group.metrics),
                metric=metric,
            )
        )
    if len({p.metric for p in points}) > 1:
        raise ValueError("runs measured in accuracy and in perplexity cannot share a figure")
    order = list(dict.fromkeys(p.optim for p in points))
    return sorted(points, key=lambda p: (order.index(p.optim), p.x))


def sensitivity_table(points: Sequence[SensitivityPoint]) -> str:
    """The points as a markdown table: method, effective step, hyperparameter, seeds, the
    final and best test metric (mean ± sample standard deviation over the seeds), each
    seed's final value and the epochs the runs have reached."""
    if not points:
        return "no runs\n"
    name = "test perplexity" if points[0].metric == "perplexity" else "test accuracy (%)"
    effective = points[0].formula is not None
    lines = [
        f"| method | {'effective SGD step | ' if effective else ''}setting | n | "
        f"final {name} | best {name} | final, seed: value | epochs |",
        "|---|---|---|---|---|---|---|" + ("---|" if effective else ""),
    ]
    for p in points:
        step = f"{p.x:g} ({p.formula}) | " if effective else ""
        per_seed = ", ".join(
            f"{s}: {v:.2f}" for s, v in zip(p.seeds, p.final["values"], strict=True)
        )
        low, high = min(p.epochs), max(p.epochs)
        epochs = str(low) if low == high else f"{low}-{high}"
        lines.append(
            f"| {DISPLAY_NAMES.get(p.optim, p.optim)} | {step}{p.key} = {p.value:g} | "
            f"{len(p.seeds)} | {_mean_std(p.final)} | {_mean_std(p.best)} | {per_seed} | "
            f"{epochs} |"
        )
    return "\n".join(lines) + "\n"


def _mean_std(summary: dict[str, Any]) -> str:
    if summary["std"] is None:
        return f"{summary['mean']:.2f}"
    return f"{summary['mean']:.2f} ± {summary['std']:.2f}"
