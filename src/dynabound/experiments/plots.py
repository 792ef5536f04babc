"""Paper-style figures from run directories (config.json + metrics.jsonl).

Every function writes a PNG and returns its path; matplotlib's object API is used with the
Agg canvas, so nothing here needs a display or touches pyplot's global state.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .optimizers import DISPLAY_NAMES
from .rundir import load_run
from .seeds import SeedGroup, group_runs

__all__ = [
    "BANDS",
    "COLOURS",
    "default_title",
    "plot_convex",
    "plot_run_transition",
    "plot_runs",
    "plot_sensitivity",
    "plot_sign_descent",
    "plot_sweep",
    "run_label",
    "run_labels",
    "run_names",
]

PathLike = str | os.PathLike[str]

# One colour per optimizer in every figure; the bounded methods get the warm colours.
COLOURS = {
    "sgdm": "#1f77b4",
    "sgdm-damped": "#6baed6",
    "adagrad": "#9467bd",
    "adam": "#2ca02c",
    "amsgrad": "#17becf",
    "adamw": "#8c564b",
    "adabound": "#d62728",
    "amsbound": "#ff7f0e",
    "adaboundw": "#e377c2",
    "amsboundw": "#bcbd22",
    "adan": "#7f7f7f",
    "adamssm": "#393b79",
    "gclip": "#637939",
    "signsgd": "#8c6d31",
    "signum": "#843c39",
}
_PANELS = {
    "accuracy": [("train_acc", "train accuracy (%)"), ("test_acc", "test accuracy (%)")],
    "perplexity": [("train_ppl", "train perplexity"), ("test_ppl", "test perplexity")],
}


def _figure(rows: int, cols: int, width: float = 11.0, height: float = 4.2) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _save(fig: Any, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path


def run_label(config: dict[str, Any], others: Sequence[dict[str, Any]] = ()) -> str:
    """The optimizer's paper name, plus the hyperparameters that tell it apart from
    ``others`` with the same optimizer (as in a sweep)."""
    label = DISPLAY_NAMES.get(config["optim"], config["optim"])
    same = [o for o in others if o["optim"] == config["optim"] and o is not config]
    if same:
        hparams = config["hparams"]
        keys = sorted(
            k
            for k in {*hparams, *(k for o in same for k in o["hparams"])}
            if any(o["hparams"].get(k) != hparams.get(k) for o in same)
        )
        args = config.get("task_args", {})
        arg_keys = sorted(
            k for k in args if any(o.get("task_args", {}).get(k) != args[k] for o in same)
        )
        if keys:
            label += " (" + ", ".join(f"{k}={_value(hparams.get(k))}" for k in keys) + ")"
        elif arg_keys:
            label += " (" + ", ".join(f"{k}={args[k]}" for k in arg_keys) + ")"
        elif any(o.get("seed") != config.get("seed") for o in same):
            label += f" (seed {config['seed']})"
    return label


def run_names(run_dirs: Sequence[PathLike]) -> list[str]:
    """Each run's directory name, or its last two path components joined by "-" where runs
    share the name (adabound/seed-1 and amsbound/seed-1)."""
    paths = [Path(d) for d in run_dirs]
    last = [p.name for p in paths]
    return [p.name if last.count(p.name) == 1 else f"{p.parent.name}-{p.name}" for p in paths]


def run_labels(configs: Sequence[dict[str, Any]], run_dirs: Sequence[PathLike]) -> list[str]:
    """:func:`run_label` of each run; runs that would still share a label (the same
    optimizer and settings, as in two runs of one command) get their run names added."""
    labels = [run_label(c, configs) for c in configs]
    names = run_names(run_dirs)
    return [
        f"{label} ({name})" if labels.count(label) > 1 else label
        for label, name in zip(labels, names, strict=True)
    ]


def _value(value: Any) -> str:
    """A hyperparameter in a legend: numbers compactly, names as they are, absent as
    "default" (a run that left it to the class)."""
    if value is None:
        return "default"
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def _load(run_dirs: Sequence[PathLike]) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    runs = [load_run(d) for d in run_dirs]
    if not runs:
        raise ValueError("no run directories given")
    return runs


# What the band around a mean curve spans, as the figure's title says it.
BANDS = {"minmax": "band: lowest to highest run", "std": "band: mean ± 1 sample std"}


def plot_runs(
    run_dirs: Sequence[PathLike],
    path: PathLike,
    title: str | None = None,
    band: str | None = "minmax",
) -> Path:
    """Train and test accuracy (or perplexity) against epochs, one line per run; runs that
    differ only by their seed are drawn as their mean with a shaded ``band`` ("minmax": the
    lowest to the highest run at each epoch, "std": mean ± one sample standard deviation;
    None: one line per run all the same)."""

    if band is not None and band not in BANDS:
        raise ValueError(f"band must be one of {', '.join(BANDS)}, got {band!r}")
    runs = _load(run_dirs)
    tasks = {c["task"] for c, _ in runs}
    if len(tasks) > 1:
        raise ValueError(f"runs of different tasks cannot share a figure: {sorted(tasks)}")
    if tasks == {"convex"}:
        return plot_convex(run_dirs, path, title=title)
    metric = "perplexity" if tasks == {"ptb"} else "accuracy"
    panels = _PANELS[metric]
    if band is not None:
        try:
            groups = group_runs([(c, m, Path(d)) for (c, m), d in zip(runs, run_dirs, strict=True)])
        except ValueError:  # repeats with one seed: not a sample of seeds, draw each
            groups = []
        if any(len(g) > 1 for g in groups):
            return _plot_bands(groups, path, title, band, metric)
    fig, axes = _figure(1, len(panels))
    configs = [c for c, _ in runs]
    labels = run_labels(configs, run_dirs)
    for index, ((_, metrics), style, label) in enumerate(
        zip(runs, _line_styles(configs), labels, strict=True)
    ):
        epochs = [m["epoch"] for m in metrics]
        style = _with_marks(style, len(epochs), index, len(runs))
        for ax, (key, _) in zip(axes[0], panels, strict=True):
            ax.plot(
                epochs,
                [m.get(key, math.nan) for m in metrics],
                label=label,
                linewidth=1.4,
                **style,
            )
    _label_epoch_axes(axes[0], panels, metric, {
        key: [[m.get(key) for m in ms] for _, ms in runs] for key, _ in panels
    })  # fmt: skip
    fig.suptitle(title or default_title(configs))
    return _save(fig, path)


def _label_epoch_axes(axes, panels, metric: str, series: dict[str, list]) -> None:
    """Labels, grid and scale of per-epoch panels; accuracy panels zoom onto ``series``
    (the values drawn in each panel), perplexity ones use a log scale."""
    from matplotlib.ticker import MaxNLocator

    for ax, (key, ylabel) in zip(axes, panels, strict=True):
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if metric == "perplexity":
            ax.set_yscale("log")
        else:
            _zoom_accuracy(ax, series[key])
    axes[-1].legend(fontsize=8)


def _band(group: SeedGroup, key: str, band: str) -> tuple[list[int], Any, Any, Any]:
    """(epochs, mean, low, high) of ``key`` over the group's runs, on the epochs that every
    run has reached (an unfinished run shortens the curve rather than bias its end)."""
    import numpy as np

    length = min(len(m) for m in group.metrics)
    epochs = [group.metrics[0][i]["epoch"] for i in range(length)]
    values = np.array(
        [[m[i].get(key, math.nan) for i in range(length)] for m in group.metrics], dtype=float
    )
    mean = values.mean(axis=0)
    if band == "minmax" or len(group) < 2:
        return epochs, mean, values.min(axis=0), values.max(axis=0)
    std = values.std(axis=0, ddof=1)
    return epochs, mean, mean - std, mean + std


def _plot_bands(
    groups: Sequence[SeedGroup], path: PathLike, title: str | None, band: str, metric: str
) -> Path:

    panels = _PANELS[metric]
    fig, axes = _figure(1, len(panels))
    firsts = [g.config for g in groups]
    edges: dict[str, list[Any]] = {key: [] for key, _ in panels}
    labels = run_labels(firsts, [_group_dir(g) for g in groups])
    for index, (group, style, label) in enumerate(
        zip(groups, _line_styles(firsts), labels, strict=True)
    ):
        if not all(group.metrics):
            continue  # a run without a finished epoch has nothing to draw
        if len(group) > 1:
            label += f" (n={len(group)})"
        for ax, (key, _) in zip(axes[0], panels, strict=True):
            epochs, mean, low, high = _band(group, key, band)
            marked = _with_marks(style, len(epochs), index, len(groups))
            ax.plot(epochs, mean, label=label, linewidth=1.4, **marked)
            if len(group) > 1:
                ax.fill_between(epochs, low, high, color=style["color"], alpha=0.2, linewidth=0)
            edges[key] += [list(low), list(high)]
    _label_epoch_axes(axes[0], panels, metric, edges)
    fig.suptitle(title or f"{default_title(firsts)}: mean over seeds, {BANDS[band]}")
    return _save(fig, path)


def _group_dir(group: SeedGroup) -> Path:
    """The directory that names a group of seeds: the parent of its seed-N runs."""
    first = Path(group.run_dirs[0])
    return first.parent if len(group) > 1 else first


# Optimizers whose curves often lie on another's (AMSGrad on Adam, AMSBound on AdaBound:
# the running maximum rarely binds): their lines start dashed, so that the line beneath
# shows through the gaps.
_DASHED_FIRST = {"amsgrad", "amsbound", "amsboundw"}
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "*")


def _line_styles(configs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The optimizer's colour, and a marker of its own for every line (hollow, so that
    markers drawn on one spot all show); runs sharing an optimizer get different dashes,
    and so do the AMS variants, which often coincide with their base optimizer."""
    dashes = ("-", "--", ":", "-.")
    seen: dict[str, int] = {}
    styles = []
    for index, c in enumerate(configs):
        optim = c["optim"]
        k = seen.get(optim, 0) + (optim in _DASHED_FIRST)
        seen[optim] = seen.get(optim, 0) + 1
        styles.append(
            {
                "color": COLOURS.get(optim),
                "linestyle": dashes[k % len(dashes)],
                "marker": _MARKERS[index % len(_MARKERS)],
                "fillstyle": "none",
            }
        )
    return styles


def _with_marks(style: dict[str, Any], points: int, index: int, lines: int) -> dict[str, Any]:
    """``style`` with its markers placed: on every point of a short curve, else on about
    ten points, shifted from line to line so that coinciding lines show all their marks."""
    if points <= 12:
        return {**style, "markersize": 5}
    step = max(1, points // 10)
    return {**style, "markersize": 5, "markevery": (index * step // max(1, lines), step)}


def _zoom_accuracy(ax: Any, curves: list[list[float]]) -> None:
    # Accuracy curves crowd near the top: show the range the runs reach once past their
    # first tenth of epochs (all of it for short runs).
    tail = [
        v
        for curve in curves
        for v in curve[len(curve) // 10 :]
        if v is not None and math.isfinite(v)
    ]
    if tail:
        low, high = min(tail), max(tail)
        pad = 0.08 * (high - low) + 0.2
        ax.set_ylim(max(0.0, low - pad), min(100.5, high + pad))


def default_title(configs: Sequence[dict[str, Any]]) -> str:
    c = configs[0]
    extra = ""
    if c["task"] == "cifar10":
        extra = f" {c['task_args'].get('model') or 'resnet34'}"
    elif c["task"] == "ptb":
        layers = {o["task_args"].get("layers") or 1 for o in configs}
        extra = f" {layers.pop()}-layer LSTM" if len(layers) == 1 else " LSTM"
    return f"{c['task']}{extra}"


def plot_convex(run_dirs: Sequence[PathLike], path: PathLike, title: str | None = None) -> Path:
    """x_t and the average regret R_t / t against t for convex-counterexample runs."""
    runs = _load(run_dirs)
    fig, axes = _figure(1, 2)
    configs = [c for c, _ in runs]
    labels = run_labels(configs, run_dirs)
    for index, ((_, metrics), style, label) in enumerate(
        zip(runs, _line_styles(configs), labels, strict=True)
    ):
        ts = [t for m in metrics for t in m["trace_t"]]
        xs = [x for m in metrics for x in m["trace_x"]]
        regret = [r for m in metrics for r in m["trace_avg_regret"]]
        style = {**_with_marks(style, len(ts), index, len(runs)), "label": label}
        axes[0][0].plot(ts, xs, linewidth=1.3, **style)
        axes[0][1].plot(ts, regret, linewidth=1.3, **style)
    args = configs[0]["task_args"]
    # section3's losses are -100 on all of x < 0: the optimum is a region, not x = -1.
    section3 = args.get("problem") == "section3"
    axes[0][0].axhline(0.0 if section3 else -1.0, color="black", linewidth=0.8, linestyle="--")
    axes[0][0].set_ylim(-1.1, 1.1)
    axes[0][0].set_ylabel("x_t  (optimum: any x < 0)" if section3 else "x_t  (optimum: x = -1)")
    axes[0][1].set_ylabel("average regret R_t / t")
    axes[0][1].set_yscale("log")
    for ax in axes[0]:
        ax.set_xlabel("step t")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title or f"online convex counterexample ({args.get('problem') or 'theorem'})")
    return _save(fig, path)


def plot_run_transition(run_dir: PathLike, path: PathLike) -> Path:
    """The bound-activity (transition) plot of one run against the optimizer step (log
    scale), from its records at steps 1, 2, 4, ... and at the end of every epoch."""
    from dynabound.diagnostics import plot_transition

    config, metrics = load_run(run_dir)
    by_step: dict[float, dict[str, float]] = {}
    for m in metrics:
        for record in [*m.get("bounds_by_step", []), *([m["bounds"]] if "bounds" in m else [])]:
            by_step[record["step"]] = record
    if not by_step:
        raise ValueError(f"{run_dir} has no bound activity (not a dynabound optimizer?)")
    records = [by_step[step] for step in sorted(by_step)]
    title = f"{default_title([config])}: {run_label(config)} bound activity"
    return plot_transition(records, path, x="step", log_x=True, title=title)


_SIGN_PANELS = (
    ("sign_cosine", "cosine(update, sign(gradient))"),
    ("grad_cosine", "cosine(update, gradient)"),
    ("near_lr", "fraction of steps within 2x of lr"),
)


def plot_sign_descent(run_dirs: Sequence[PathLike], path: PathLike, title: str | None = None):
    """How sign-like each run's update is, per epoch (the ``sign`` records: see
    :mod:`dynabound.diagnostics.sign`): sign descent sits at 1 in the first and last panel,
    SGD at 1 in the middle one. Runs that differ only by their seed are drawn as their
    mean."""
    runs = _load(run_dirs)
    triples = [(c, m, Path(d)) for (c, m), d in zip(runs, run_dirs, strict=True)]
    try:
        groups = group_runs(triples)
    except ValueError:  # repeats with one seed: draw each
        groups = [SeedGroup([c], [m], [d]) for c, m, d in triples]
    groups = [g for g in groups if any("sign" in m for ms in g.metrics for m in ms)]
    if not groups:
        raise ValueError("no run has sign-descent records (recorded since the sign measure)")
    fig, axes = _figure(1, len(_SIGN_PANELS), width=14.0)
    firsts = [g.config for g in groups]
    labels = run_labels(firsts, [_group_dir(g) for g in groups])
    for index, (group, style, label) in enumerate(
        zip(groups, _line_styles(firsts), labels, strict=True)
    ):
        epochs = sorted({m["epoch"] for ms in group.metrics for m in ms if "sign" in m})
        style = _with_marks(style, len(epochs), index, len(groups))
        for ax, (key, label) in zip(axes[0], _SIGN_PANELS, strict=True):
            per_epoch = [
                [m["sign"][key] for ms in group.metrics for m in ms
                 if m["epoch"] == e and "sign" in m]
                for e in epochs
            ]  # fmt: skip
            means = [math.fsum(v) / len(v) if v else math.nan for v in per_epoch]
            ax.plot(epochs, means, label=label, linewidth=1.4, **style)
            ax.set_xlabel("epoch")
            ax.set_ylabel(label)
    axes[0][0].set_ylim(0, 1.02)
    axes[0][1].set_ylim(0, 1.02)
    axes[0][2].set_ylim(-0.02, 1.02)
    # The middle of the last panel stays empty: every optimizer's steps are either all near
    # lr (sign descent) or few of them.
    axes[0][2].legend(fontsize=8, loc="center")
    fig.suptitle(title or f"{default_title(firsts)}: how sign-like the update is")
    return _save(fig, path)


def plot_sweep(
    results: Sequence[dict[str, Any]], path: PathLike, *, metric: str, title: str = ""
) -> Path:
    """Final test metric against final_lr, one line per gamma (the paper's appendix study).

    ``results`` rows hold ``final_lr``, ``gamma``, ``value`` and optionally ``curve``
    (the per-epoch test metric), drawn in a second panel. A row with ``auto`` true ran
    ``final_lr="auto"``: its ``final_lr`` is the estimate, drawn as a star off the line.
    """
    if not results:
        raise ValueError("no sweep results")
    curves = all("curve" in r for r in results)
    fig, axes = _figure(1, 2 if curves else 1)
    gammas = sorted({r["gamma"] for r in results})
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    ylabel = "test perplexity" if metric == "perplexity" else "test accuracy (%)"
    for i, gamma in enumerate(gammas):
        rows = sorted((r for r in results if r["gamma"] == gamma), key=lambda r: r["final_lr"])
        colour = cmap(i / max(1, len(gammas) - 1))
        grid = [r for r in rows if not r.get("auto")]
        axes[0][0].plot(
            [r["final_lr"] for r in grid],
            [r["value"] for r in grid],
            marker="o",
            color=colour,
            label=f"gamma={gamma:g}",
        )
        for r in rows:
            if r.get("auto"):
                axes[0][0].plot(
                    [r["final_lr"]], [r["value"]], marker="*", markersize=12, linestyle="",
                    color=colour, label=f"auto (estimate {r['final_lr']:.3g}), gamma={gamma:g}",
                )  # fmt: skip
        if curves:
            for j, r in enumerate(rows):
                axes[0][1].plot(
                    range(1, len(r["curve"]) + 1),
                    r["curve"],
                    color=colour,
                    alpha=0.4 + 0.6 * (j + 1) / len(rows),
                    linewidth=1.0,
                    label=f"final_lr={r['final_lr']:g}, gamma={gamma:g}",
                )
    axes[0][0].set_xscale("log")
    axes[0][0].set_xlabel("final_lr")
    axes[0][0].set_ylabel(f"final {ylabel}")
    axes[0][0].legend(fontsize=8)
    axes[0][0].grid(alpha=0.3)
    if curves:
        axes[0][1].set_xlabel("epoch")
        axes[0][1].set_ylabel(ylabel)
        axes[0][1].legend(fontsize=6)
        axes[0][1].grid(alpha=0.3)
        if metric == "perplexity":
            axes[0][1].set_yscale("log")
    fig.suptitle(title or "sensitivity to final_lr and gamma")
    return _save(fig, path)


def plot_sensitivity(
    run_dirs: Sequence[PathLike],
    path: PathLike,
    against: Mapping[str, str] | str,
    title: str = "",
) -> Path:
    """Final (and best) test metric against a hyperparameter, one curve per optimizer.

    ``against`` maps an optimizer to the hyperparameter its runs vary (``{"sgdm": "lr",
    "adabound": "final_lr"}``): the x axis is that value on a log scale (the paper's
    Appendix G: SGDM's lr against AdaBound's final_lr). ``against="effective-step"`` puts
    every method on the effective SGD step its value gives instead (``lr/(1-momentum)`` for
    SGDM, ``lr`` for dampened SGDM, ``final_lr`` for the bounded methods; see
    :func:`~.optimizers.effective_sgd_step`), the axis on which their steps are equal.
    Runs that differ only by their seed make one point, their mean, with a bar from the
    lowest to the highest run. Runs of optimizers without an axis are refused.
    """
    from .sensitivity import EFFECTIVE_STEP, sensitivity_points

    points = sensitivity_points(run_dirs, against)
    metric = points[0].metric
    fig, axes = _figure(1, 1, width=6.5)
    ax = axes[0][0]
    for optim in dict.fromkeys(p.optim for p in points):
        rows = [p for p in points if p.optim == optim]
        label = rows[0].label
        seeds = sorted({len(p.seeds) for p in rows})
        several = seeds[-1] > 1
        if several:  # mean over seeds, with a bar from the lowest to the highest run
            label += f", n={seeds[0]}" + (f"-{seeds[-1]}" if len(seeds) > 1 else "")
        colour = COLOURS.get(optim)
        xs = [p.x for p in rows]
        finals = [p.final["mean"] for p in rows]
        ax.plot(xs, finals, marker="o", color=colour, label=label)
        if several:  # max(0, ...): a mean of equal values can round past them
            below = [max(0.0, p.final["mean"] - p.final["min"]) for p in rows]
            above = [max(0.0, p.final["max"] - p.final["mean"]) for p in rows]
            ax.errorbar(xs, finals, yerr=[below, above], fmt="none", ecolor=colour,
                        capsize=3, linewidth=1)  # fmt: skip
        ax.plot(xs, [p.best["mean"] for p in rows], linestyle=":", marker=".",
                color=colour, label=f"{label}, best epoch")  # fmt: skip
    ax.set_xscale("log")
    effective = against == EFFECTIVE_STEP
    ax.set_xlabel("effective SGD step" if effective else "hyperparameter value")
    ax.set_ylabel("test perplexity" if metric == "perplexity" else "test accuracy (%)")
    if metric == "perplexity":
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    default = (
        "sensitivity: final test metric against the effective SGD step"
        if effective
        else "sensitivity: final test metric against each method's hyperparameter"
    )
    fig.suptitle(title or default)
    return _save(fig, path)
