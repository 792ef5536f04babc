"""Figures: the paper's Figure 1 heatmap of per-element rates, and the transition plot.

matplotlib is imported inside the functions and only its object-oriented API is used
(``matplotlib.figure.Figure``, rendered by Agg on save), so importing the library never
needs matplotlib and the user's pyplot backend is left alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .monitor import read_records

if TYPE_CHECKING:
    import numpy as np

__all__ = ["plot_rate_heatmap", "plot_transition", "select_figure1_params"]

PathLike = str | os.PathLike[str]


def _named(model_or_named_parameters: Any) -> list[tuple[str, Tensor]]:
    if isinstance(model_or_named_parameters, nn.Module):
        return list(model_or_named_parameters.named_parameters())
    if isinstance(model_or_named_parameters, Mapping):
        return list(model_or_named_parameters.items())
    return list(model_or_named_parameters)


def _evenly_spread(items: list[Any], n: int) -> list[Any]:
    if len(items) <= n:
        return items
    if n == 1:
        return items[:1]
    return [items[round(k * (len(items) - 1) / (n - 1))] for k in range(n)]


def select_figure1_params(
    model_or_named_parameters: nn.Module | Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
    rates: Mapping[Tensor, Tensor],
    *,
    n_kernels: int = 9,
    kernel: str = "sample",
    seed: int = 0,
) -> list[tuple[str, Tensor]]:
    """Pick the blocks of the paper's Figure 1 from per-parameter ``rates``.

    Returns ``(label, block)`` pairs: ``n_kernels`` 3x3 blocks from conv weights with 3x3
    kernels, evenly spread over depth (first and last included), then the per-element
    rates of the last bias vector (the final layer's biases). ``kernel="sample"`` takes one
    ``(out, in)`` kernel per layer chosen with a ``seed``-ed generator, as the paper
    samples kernels; ``kernel="mean"`` averages the rates over all in/out channels (NaN
    rates, elements left out, are not averaged).
    Models with fewer conv layers (an MLP) fill the remaining slots with randomly placed
    3x3 blocks of weight matrices, spread evenly over the layers.
    """
    if kernel not in ("sample", "mean"):
        raise ValueError(f"kernel must be 'sample' or 'mean', got {kernel!r}")
    if n_kernels < 0:
        raise ValueError(f"n_kernels must be >= 0, got {n_kernels}")
    named = [
        (name, rates[p].detach().float().cpu())
        for name, p in _named(model_or_named_parameters)
        if p in rates
    ]
    generator = torch.Generator().manual_seed(seed)

    def draw(high: int) -> int:
        return int(torch.randint(0, high, (1,), generator=generator))

    blocks: list[tuple[str, Tensor]] = []
    convs = [(n, r) for n, r in named if r.dim() == 4 and tuple(r.shape[-2:]) == (3, 3)]
    for name, r in _evenly_spread(convs, n_kernels):
        if kernel == "mean":
            blocks.append((f"{name} (mean)", r.nanmean(dim=(0, 1))))
        else:
            out, inp = draw(r.shape[0]), draw(r.shape[1])
            blocks.append((f"{name}[{out},{inp}]", r[out, inp]))
    matrices = [(n, r) for n, r in named if r.dim() == 2 and min(r.shape) >= 3]
    remaining = n_kernels - len(blocks)
    for j in range(remaining if matrices else 0):
        name, r = matrices[j * len(matrices) // remaining]
        row, col = draw(r.shape[0] - 2), draw(r.shape[1] - 2)
        blocks.append((f"{name}[{row}:{row + 3},{col}:{col + 3}]", r[row : row + 3, col : col + 3]))
    vectors = [(n, r) for n, r in named if r.dim() == 1]
    biases = [(n, r) for n, r in vectors if n.endswith("bias")] or vectors
    if biases:
        blocks.append(biases[-1])
    if not blocks:
        raise ValueError(
            "no parameter with rates has 3x3 kernels, a weight matrix or a bias vector "
            "(are the rates keyed by this model's parameters?)"
        )
    return blocks


def _to_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    import numpy as np

    if isinstance(x, Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _log_range(arrays: Iterable[np.ndarray], extra: Sequence[float]) -> tuple[float, float]:
    import numpy as np

    values = np.concatenate([a.ravel() for a in arrays] + [np.asarray(extra, dtype=float)])
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size == 0:
        return 1e-3, 1.0
    low, high = float(positive.min()), float(positive.max())
    if high / low < 1.5:  # a flat map (SGD) still gets a readable colour scale
        low, high = low / 2, high * 2
    return low, high


def plot_rate_heatmap(
    named_rates: Mapping[str, Tensor] | Sequence[tuple[str, Tensor]],
    path: PathLike,
    *,
    title: str | None = None,
    bounds: tuple[float, float] | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    annotate: bool = True,
    cmap: str = "viridis",
    max_bias: int = 16,
    dpi: int = 150,
    excluded: tuple[int, int] | None = None,
) -> Path:
    """Figure 1 of the paper: per-element rates of small blocks on one log colour scale.

    ``named_rates`` holds ``(label, rates)``: 2-D blocks (e.g. 3x3 kernels) are drawn in a
    grid, 1-D vectors (biases; the first ``max_bias`` elements) as full-width rows below.
    :func:`select_figure1_params` chooses them as the paper does. Every cell is annotated
    with its value; zero, negative and NaN rates are grey (NaN: an element
    ``effective_lr(..., exclude_zero_second_moment=True)`` left out, marked "-").
    ``excluded=(count, total)``, that call's ``rates.excluded`` and ``rates.numel``, adds
    a line under the title saying how many elements of the model were left out, so that the
    figure states it. ``bounds=(lower, upper)`` marks the bounds on the colour bar. Writes a
    PNG (or any format matplotlib infers from ``path``), creating parent directories, and
    returns ``path``.
    """
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    items = list(named_rates.items()) if isinstance(named_rates, Mapping) else list(named_rates)
    grids: list[tuple[str, np.ndarray]] = []
    rows: list[tuple[str, np.ndarray]] = []
    for label, rate in items:
        a = _to_numpy(rate)
        if a.ndim == 2:
            grids.append((label, a))
        elif a.ndim == 1:
            shown = a[:max_bias]
            rows.append((label if a.size <= max_bias else f"{label} (first {max_bias})", shown))
        else:
            raise ValueError(
                f"{label}: expected a 2-D block or a 1-D vector of rates, got shape {a.shape}; "
                "select_figure1_params picks 3x3 kernels from conv weights"
            )
    if not grids and not rows:
        raise ValueError("named_rates is empty")
    low, high = _log_range([a for _, a in grids + rows], bounds or ())
    if bounds is not None:  # keep the bound lines off the ends of the colour bar
        low, high = low / 1.15, high * 1.15
    norm = LogNorm(vmin=vmin or low, vmax=vmax or high)
    colormap = _colormap(cmap)

    ncols = max(1, math.ceil(math.sqrt(len(grids))))
    nrows = math.ceil(len(grids) / ncols)
    heights = [1.0] * nrows + [0.45] * len(rows)
    width, height = 2.3 * ncols + 1.8, 2.2 * nrows + 1.0 * len(rows) + 0.6
    # A fixed layout: constrained layout measures every annotation and takes seconds.
    if excluded is not None:
        count, total = excluded
        note = (
            f"left out (grey, -): {count:,} of {total:,} elements whose second moment is "
            "still zero (no gradient yet; their rate comes from eps or the bound)"
        )
        title = f"{title}\n{note}" if title else note
    fig = Figure(figsize=(width, height))
    lines = title.count("\n") + 1 if title else 0
    top = 1 - (0.35 + 0.4 * lines) / height
    spec = fig.add_gridspec(
        len(heights), ncols, height_ratios=heights, left=0.02, right=1 - 1.9 / width,
        bottom=0.1 / height, top=top, hspace=0.25, wspace=0.06,
    )  # fmt: skip
    axes = []
    for k, (label, a) in enumerate(grids):
        ax = fig.add_subplot(spec[k // ncols, k % ncols])
        _draw_block(ax, a, norm, colormap, annotate, fontsize=8)
        ax.set_title(label, fontsize=7)
        axes.append(ax)
    for k, (label, a) in enumerate(rows):
        ax = fig.add_subplot(spec[nrows + k, :])
        _draw_block(ax, a[None, :], norm, colormap, annotate, fontsize=7)
        ax.set_title(label, fontsize=7)
        axes.append(ax)
    image = axes[0].images[0]
    bar = fig.colorbar(image, cax=fig.add_axes((1 - 1.5 / width, 0.12, 0.22 / width, 0.76)))
    label = "effective learning rate (log scale)"
    if bounds is not None:
        for value in bounds:
            bar.ax.axhline(value, color="red", linestyle="--", linewidth=2)
        label += f"\nred: bounds {bounds[0]:.3g} and {bounds[1]:.3g}"
    bar.set_label(label)
    if title:
        fig.suptitle(title, fontsize=12 if lines == 1 else 9)
    return _save(fig, path, dpi)


def _colormap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="lightgrey")


def _draw_block(ax: Any, a: np.ndarray, norm: Any, colormap: Any, annotate: bool, fontsize: int):
    import numpy as np

    shown = np.ma.masked_where(~(np.isfinite(a) & (a > 0)), a)
    ax.imshow(shown, norm=norm, cmap=colormap, aspect="auto", interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if not annotate:
        return
    for (i, j), value in np.ndenumerate(a):
        dark = np.isfinite(value) and value > 0 and norm(value) < 0.55
        ax.text(
            j,
            i,
            "-" if np.isnan(value) else f"{value:.2g}",
            ha="center",
            va="center",
            fontsize=fontsize,
            color="white" if dark else "black",
        )


def _save(fig: Any, path: PathLike, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def plot_transition(
    records: Sequence[Mapping[str, float]] | PathLike,
    path: PathLike,
    *,
    per_layer: bool = False,
    x: str = "step",
    prefix: str = "",
    title: str | None = None,
    log_x: bool = False,
    dpi: int = 150,
) -> Path:
    """Fractions of elements at the lower bound, at the upper bound and free over time.

    ``records`` are :class:`BoundMonitor` rows (or the path of its CSV), or any rows with
    the keys of :meth:`BoundActivity.summary` under ``prefix`` plus the ``x`` key (e.g.
    ``epoch``). Overall: stacked fractions, and below them the effective-rate quantiles
    with the bounds on a log scale (when recorded). ``per_layer=True`` draws one line per
    parameter in three panels (lower, upper, free) from the ``{name}/lower`` columns that
    ``BoundMonitor(per_param=True)`` records. ``log_x`` suits records taken at log-spaced
    steps (the transition is fastest at the start).
    """
    import numpy as np
    from matplotlib.figure import Figure

    if isinstance(records, str | os.PathLike):
        records = read_records(records)
    records = list(records)
    if not records:
        raise ValueError("no records to plot")
    if any(x not in r for r in records):
        raise ValueError(f"every record needs the x key {x!r}")
    xs = np.array([r[x] for r in records], dtype=float)

    def column(key: str) -> np.ndarray:
        return np.array([r.get(key, math.nan) for r in records], dtype=float)

    if per_layer:
        suffix = "/free"
        rests = [k[len(prefix) :] for k in records[-1] if k.startswith(prefix)]
        layers = [r[: -len(suffix)] for r in rests if r.endswith(suffix) and len(r) > len(suffix)]
        if not layers:
            raise ValueError(
                "records have no per-layer columns ('{name}/free'): record them with "
                "BoundMonitor(per_param=True)"
            )
        fig = Figure(figsize=(11, 8), layout="constrained")
        axes = fig.subplots(3, 1, sharex=True)
        if log_x:
            axes[0].set_xscale("log")
        few = len(layers) <= 10
        colours = _colormap("tab10" if few else "viridis")
        for kind, ax in zip(("lower", "upper", "free"), axes, strict=True):
            for i, layer in enumerate(layers):
                shade = colours(i) if few else colours(i / max(1, len(layers) - 1))
                ax.plot(
                    xs, column(f"{prefix}{layer}/{kind}"), color=shade, linewidth=1, label=layer
                )
            ax.set_ylim(-0.02, 1.02)
            ax.set_ylabel(f"fraction {kind}")
        if few:
            axes[0].legend(fontsize=7, loc="best")
        else:
            from matplotlib.cm import ScalarMappable
            from matplotlib.colors import Normalize

            mappable = ScalarMappable(Normalize(0, len(layers) - 1), cmap=colours)
            fig.colorbar(mappable, ax=list(axes), label="parameter index (depth)")
        axes[-1].set_xlabel(x)
        if title:
            fig.suptitle(title)
        return _save(fig, path, dpi)

    keys = [f"{prefix}{k}" for k in ("lower", "free", "upper")]
    has_fractions = all(k in records[-1] for k in keys)
    rate_keys = sorted(
        (k for k in records[-1] if k.startswith(f"{prefix}rate_q")),
        key=lambda k: float(k[len(prefix) + 6 :]),
    )
    rate_keys = [f"{prefix}rate_min", *rate_keys, f"{prefix}rate_max"]
    has_rates = all(k in records[-1] for k in (rate_keys[0], rate_keys[-1]))
    if not has_fractions and not has_rates:
        raise ValueError(
            f"records have neither bound fractions {keys} nor rate statistics "
            f"({prefix}rate_min, ...)"
        )
    panels = int(has_fractions) + int(has_rates)
    fig = Figure(figsize=(10, 3.6 * panels + 0.4), layout="constrained")
    axes = list(np.atleast_1d(fig.subplots(panels, 1, sharex=True)))
    if log_x:
        axes[0].set_xscale("log")
    if has_fractions:
        ax = axes.pop(0)
        ax.stackplot(
            xs,
            *(column(k) for k in keys),
            colors=("#4c72b0", "#dddddd", "#c44e52"),
            labels=("at lower bound", "free (Adam-like)", "at upper bound"),
        )
        ax.set_ylim(0, 1)
        ax.set_ylabel("fraction of elements")
        ax.legend(loc="center right", fontsize=8)
        ax.set_xlabel("" if has_rates else x)
    if has_rates:
        ax = axes.pop(0)
        colours = _colormap("plasma")
        for i, key in enumerate(rate_keys):
            values = column(key)
            values[~(values > 0)] = math.nan
            label = key[len(prefix) + 5 :].replace("q", "quantile ", 1)
            extreme = i in (0, len(rate_keys) - 1)
            ax.plot(
                xs,
                values,
                color=colours(0.85 * i / max(1, len(rate_keys) - 1)),
                label=label,
                linestyle="-." if extreme else "-",
                linewidth=1.2 if extreme else 2,
            )
        for key, style in (("lower_bound", "--"), ("upper_bound", ":")):
            if f"{prefix}{key}" in records[-1]:
                ax.plot(xs, column(f"{prefix}{key}"), "k" + style, label=key.replace("_", " "))
        ax.set_yscale("log")
        ax.set_ylabel("effective learning rate")
        ax.legend(fontsize=8, loc="best")
        ax.set_xlabel(x)
    if title:
        fig.suptitle(title)
    return _save(fig, path, dpi)
