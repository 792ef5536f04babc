"""Runs that differ only by their seed: grouping them, and the mean, standard deviation and
count of their final and best test metric.

One seed cannot tell a difference between optimizers from seed-to-seed noise; these numbers,
over several seeds of the same configuration, can. Nothing here draws or trains: ``plots``
draws the groups, ``cli`` writes the tables.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .rundir import load_run

__all__ = [
    "METRIC_KEYS",
    "SeedGroup",
    "aggregate",
    "aggregate_table",
    "final_and_best",
    "group_runs",
    "load_groups",
    "summarize",
]

# The per-epoch record each task metric is read from; lower is better but for accuracy.
METRIC_KEYS = {"accuracy": "test_acc", "perplexity": "test_ppl", "regret": "avg_regret"}
_HEADINGS = {
    "accuracy": "test accuracy (%)",
    "perplexity": "test perplexity",
    "regret": "average regret",
}

# Configuration entries that say where or how a run was executed, not what it trains:
# two runs that differ only in these (and the seed) are repeats of one experiment.
_NOT_THE_EXPERIMENT = ("seed", "data_dir", "download", "device", "record_bounds")


def final_and_best(metrics: Sequence[dict[str, Any]], metric: str) -> tuple[float, float]:
    """(final, best) test metric of one run's epoch records."""
    values = [m[METRIC_KEYS[metric]] for m in metrics]
    best = max(values) if metric == "accuracy" else min(values)
    return values[-1], best


@dataclass
class SeedGroup:
    """Runs of one configuration, in the order they were given; ``seeds[i]`` is the seed of
    ``run_dirs[i]``."""

    configs: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[list[dict[str, Any]]] = field(default_factory=list)
    run_dirs: list[Path] = field(default_factory=list)

    @property
    def config(self) -> dict[str, Any]:
        return self.configs[0]

    @property
    def seeds(self) -> list[int]:
        return [int(c["seed"]) for c in self.configs]

    def __len__(self) -> int:
        return len(self.configs)


def _experiment(config: dict[str, Any]) -> str:
    kept = {k: v for k, v in config.items() if k not in _NOT_THE_EXPERIMENT}
    return json.dumps(kept, sort_keys=True)


def group_runs(
    runs: Sequence[tuple[dict[str, Any], list[dict[str, Any]], Path]],
) -> list[SeedGroup]:
    """(config, metrics, run_dir) triples grouped by configuration but for the seed, groups
    in order of their first run. Two runs of one group with the same seed are refused: they
    would count one sample twice."""
    groups: dict[str, SeedGroup] = {}
    for config, metrics, run_dir in runs:
        group = groups.setdefault(_experiment(config), SeedGroup())
        if int(config["seed"]) in group.seeds:
            other = group.run_dirs[group.seeds.index(int(config["seed"]))]
            raise ValueError(f"{run_dir} and {other} are the same run (seed {config['seed']})")
        group.configs.append(config)
        group.metrics.append(metrics)
        group.run_dirs.append(Path(run_dir))
    return list(groups.values())


def load_groups(run_dirs: Sequence[str | os.PathLike[str]]) -> list[SeedGroup]:
    return group_runs([(*load_run(d), Path(d)) for d in run_dirs])


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (n - 1 in the denominator: the seeds are a sample of
    the seeds one could have drawn), count, extremes and the values themselves. With one
    value the standard deviation is undefined and given as None."""
    n = len(values)
    if n == 0:
        raise ValueError("nothing to summarize")
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {
        "mean": mean,
        "std": std,
        "n": n,
        "min": min(values),
        "max": max(values),
        "values": list(values),
    }


def aggregate(
    groups: Sequence[SeedGroup],
    metric: str,
    label: Callable[[dict[str, Any], list[dict[str, Any]]], str] | None = None,
) -> list[dict[str, Any]]:
    """Per group, the summary of its runs' final and best test ``metric``. Runs that have
    not finished an epoch yet are left out (and counted in ``n`` only once they have).
    ``label(config, all_configs)`` names a group (default: its optimizer)."""
    firsts = [g.config for g in groups]
    rows = []
    for group in groups:
        done = [
            (c, m, d)
            for c, m, d in zip(group.configs, group.metrics, group.run_dirs, strict=True)
            if m
        ]
        if not done:
            continue
        finals, bests = zip(*(final_and_best(m, metric) for _, m, _ in done), strict=True)
        config = group.config
        rows.append(
            {
                "optimizer": label(config, firsts) if label else config["optim"],
                "optim": config["optim"],
                "metric": metric,
                "n": len(done),
                "seeds": [int(c["seed"]) for c, _, _ in done],
                "epochs": [m[-1]["epoch"] for _, m, _ in done],
                "final": summarize(finals),
                "best": summarize(bests),
                "hparams": config["hparams"],
                "runs": [str(d) for _, _, d in done],
            }
        )
    return rows


def _fmt(value: float, metric: str) -> str:
    return f"{value:.4g}" if metric == "regret" else f"{value:.2f}"


def _mean_std(summary: dict[str, Any], metric: str) -> str:
    if summary["std"] is None:
        return _fmt(summary["mean"], metric)
    return f"{_fmt(summary['mean'], metric)} ± {_fmt(summary['std'], metric)}"


def aggregate_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of :func:`aggregate` as a markdown table: mean ± standard deviation over
    the seeds, their count, and the final value of each seed."""
    if not rows:
        return "no finished runs\n"
    metric = rows[0]["metric"]
    name = _HEADINGS[metric]
    lines = [
        f"| optimizer | n | final {name}, mean ± std | best {name}, mean ± std | "
        "final, seed: value | epochs |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_seed = ", ".join(
            f"{s}: {_fmt(v, metric)}" for s, v in zip(r["seeds"], r["final"]["values"], strict=True)
        )
        epochs = sorted(set(r["epochs"]))
        span = str(epochs[0]) if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}"
        lines.append(
            f"| {r['optimizer']} | {r['n']} | {_mean_std(r['final'], metric)} | "
            f"{_mean_std(r['best'], metric)} | {per_seed} | {span} |"
        )
    return "\n".join(lines) + "\n"
