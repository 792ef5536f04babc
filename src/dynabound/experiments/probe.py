"""``dynabound probe``: the paper's Figure 1 from a run's checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

from .optimizers import is_dynabound
from .plots import default_title, run_label
from .runner import restore

__all__ = ["probe_run"]


def probe_run(
    run_dir: str | os.PathLike[str],
    path: str | os.PathLike[str] | None = None,
    *,
    kernel: str = "sample",
    device: str = "cpu",
    all_elements: bool = False,
) -> Path:
    """The paper's Figure 1 for a run: per-element effective learning rates of its latest
    checkpoint (nine 3x3 kernels or weight blocks and the last biases, log colour scale).

    Elements whose second moment is still zero (never a nonzero gradient: their Adam rate is
    lr/eps) are left out, drawn grey, and counted in the title; ``all_elements`` keeps them."""
    from dynabound.diagnostics import (
        bound_activity,
        effective_lr,
        plot_rate_heatmap,
        select_figure1_params,
    )

    task, model, optimizer, ckpt = restore(run_dir, device=device)
    rates = effective_lr(optimizer, exclude_zero_second_moment=not all_elements)
    if not rates:
        raise ValueError(f"{run_dir}: the checkpoint's optimizer has not taken a step yet")
    blocks = select_figure1_params(model, rates, kernel=kernel)
    bounds = None
    if is_dynabound(optimizer):
        activity = bound_activity(optimizer)
        bounds = (activity.lower_bound, activity.upper_bound)
    config = ckpt["config"]
    inside = ckpt.get("inside")
    when = (
        f"{inside['batch']} steps into epoch {inside['epoch']}"
        if inside
        else f"after epoch {ckpt['epoch']}"
    )
    title = (
        f"{default_title([config])}: {run_label(config)} per-element learning rates "
        f"{when} (step {ckpt['global_step']})"
    )
    out = Path(path) if path is not None else Path(run_dir) / "figure1.png"
    excluded = None if all_elements else (rates.excluded, rates.numel)
    return plot_rate_heatmap(blocks, out, title=title, bounds=bounds, excluded=excluded)
