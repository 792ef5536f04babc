"""final_lr="auto" against the grid: the table of final-lr-auto-results.md and its figure,
from the run directories that final_lr_auto_runs.sh writes (OUT/<task>/final_lr=<v>/seed-<s>).

    python docs/figures/final_lr_auto.py OUT [--figure final-lr-auto.png] [--json runs.json]
        [--grid-from final-lr-auto-runs.json]

With --grid-from, a grid value that OUT does not hold is read from the per-run data that an
earlier --json wrote (the grid takes days of CPU; the auto runs take hours), so new auto runs
can be set against a published grid. Auto runs come from OUT only.

Per task: each grid value's final test metric over its seeds (mean, sample standard
deviation), the best and the median grid value, and the auto runs' estimates and final
metric. "Within the spread" means that the auto runs' mean lies within one standard
deviation (of the best grid value's seeds) of the best grid value's mean ("better": ahead
of it by more than that); with one run per value (the deterministic convex problems) there
is no spread and the table says so.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from dynabound.experiments.rundir import load_run

# The metric each task reports at its end, and whether lower is better.
METRICS = {
    "digits": ("test_acc", False),
    "mnist": ("test_acc", False),
    "ptb": ("test_ppl", True),
}
CONVEX = ("avg_regret", True)


def _metric(task: str) -> tuple[str, bool]:
    return CONVEX if task.startswith("convex") else METRICS[task]


def collect(out: Path) -> dict[str, dict[str, list[dict]]]:
    """{task: {value: [{seed, metric, estimate, epoch}, ...]}} for finished epochs."""
    tasks: dict[str, dict[str, list[dict]]] = {}
    for run in sorted(out.glob("*/final_lr=*/seed-*")):
        if not run.is_dir():
            continue
        task, value = run.parent.parent.name, run.parent.name.split("=", 1)[1]
        config, records = load_run(run)
        record = records[-1] if records else None
        if record is None or record["epoch"] < config["epochs"]:
            continue  # not finished
        key, _ = _metric(task)
        bounds = record.get("bounds") or {}
        tasks.setdefault(task, {}).setdefault(value, []).append(
            {
                "seed": int(run.name.split("-", 1)[1]),
                "metric": record[key],
                "estimate": bounds.get("final_lr"),
                "epoch": record["epoch"],
            }
        )
    return tasks


def add_grid(tasks: dict[str, dict[str, list[dict]]], earlier: dict) -> None:
    """Fill in, from an earlier --json's "tasks", each grid value that `tasks` lacks."""
    for task, by_value in earlier["tasks"].items():
        if task not in tasks:
            continue  # a task with no auto runs here has nothing to be set against
        for value, rows in by_value.items():
            if value != "auto":
                tasks[task].setdefault(value, rows)


def _summary(rows: list[dict]) -> tuple[float, float]:
    values = [r["metric"] for r in rows]
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan


def analyse(tasks: dict[str, dict[str, list[dict]]]) -> list[dict]:
    out = []
    for task, by_value in tasks.items():
        _, lower_better = _metric(task)
        grid = {float(v): rows for v, rows in by_value.items() if v != "auto"}
        auto = by_value.get("auto", [])
        if not grid:
            continue
        summaries = {v: _summary(rows) for v, rows in grid.items()}
        sign = 1 if lower_better else -1
        best = min(summaries, key=lambda v: sign * summaries[v][0])
        ranked = sorted(summaries.values(), key=lambda s: sign * s[0])
        median = statistics.median(s[0] for s in ranked)
        row = {
            "task": task,
            "grid": {
                v: {"mean": m, "std": s, "n": len(grid[v])} for v, (m, s) in summaries.items()
            },
            "best": best,
            "median": median,
            "auto": None,
        }
        if auto:
            mean, std = _summary(auto)
            best_mean, best_std = summaries[best]
            estimates = [r["estimate"] for r in auto]
            row["auto"] = {
                "mean": mean,
                "std": std,
                "n": len(auto),
                "estimates": estimates,
                "seeds": [r["seed"] for r in auto],
                "difference": mean - best_mean,
                # True, False, or "better": ahead of the best grid value beyond its spread.
                "within_spread": None
                if math.isnan(best_std)
                else abs(mean - best_mean) <= best_std
                or ("better" if sign * (mean - best_mean) < 0 else False),
                "not_worse_than_median": sign * (mean - median) <= 0,
            }
        out.append(row)
    return out


def _fmt(mean: float, std: float, digits: int) -> str:
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def table(results: list[dict]) -> str:
    lines = [
        "| task | metric | best grid final_lr: mean ± std (n) | grid median | auto: estimate(s) "
        "| auto: mean ± std (n) | auto − best | within spread | not worse than median |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        key, lower = _metric(r["task"])
        digits = 4 if key == "avg_regret" else 2
        b = r["grid"][r["best"]]
        a = r["auto"]
        if a is None:
            auto_cells = "— | — | — | — | —"
        else:
            estimates = ", ".join(f"{e:.3g}" for e in a["estimates"] if e is not None)
            labels = {None: "n/a (one seed)", True: "yes", False: "no", "better": "better"}
            within = labels[a["within_spread"]]
            auto_cells = (
                f"{estimates} | {_fmt(a['mean'], a['std'], digits)} ({a['n']}) | "
                f"{a['difference']:+.{digits}f} | {within} | "
                f"{'yes' if a['not_worse_than_median'] else 'no'}"
            )
        lines.append(
            f"| {r['task']} | {key} ({'lower' if lower else 'higher'} is better) | "
            f"{r['best']:g}: {_fmt(b['mean'], b['std'], digits)} ({b['n']}) | "
            f"{r['median']:.{digits}f} | {auto_cells} |"
        )
    return "\n".join(lines)


def grid_table(results: list[dict]) -> str:
    values = sorted({v for r in results for v in r["grid"]})
    lines = [
        "| task | " + " | ".join(f"{v:g}" for v in values) + " |",
        "|---|" + "---|" * len(values),
    ]
    for r in results:
        key, _ = _metric(r["task"])
        digits = 4 if key == "avg_regret" else 2
        cells = []
        for v in values:
            g = r["grid"].get(v)
            cells.append("—" if g is None else _fmt(g["mean"], g["std"], digits))
        lines.append(f"| {r['task']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(results))
    rows = -(-len(results) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(results) :]:
        ax.set_visible(False)
    for ax, r in zip(axes.flat, results, strict=False):
        key, lower = _metric(r["task"])
        values = sorted(r["grid"])
        means = [r["grid"][v]["mean"] for v in values]
        stds = [r["grid"][v]["std"] for v in values]
        ax.errorbar(values, means, yerr=[0 if math.isnan(s) else s for s in stds], marker="o",
                    capsize=3, label="grid (mean ± std over seeds)")  # fmt: skip
        a = r["auto"]
        if a is not None:
            xs = [e for e in a["estimates"] if e is not None]
            ys = [r_["metric"] for r_ in _auto_rows(r)]
            ax.plot(xs, ys[: len(xs)], "r*", markersize=11, linestyle="", label="auto, per seed")
        ax.set_xscale("log")
        if key == "test_acc":  # diverged grid values would flatten the rest: off the axis
            top = r["grid"][r["best"]]["mean"]
            ax.set_ylim(top - 2.5, top + 0.7)
        if lower and key != "avg_regret":
            ax.set_yscale("log")
        ax.set_xlabel("final_lr")
        ax.set_ylabel(key)
        ax.set_title(r["task"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle('AdaBound: final_lr="auto" (stars, at the estimated value) against the grid')
    fig.tight_layout()
    fig.savefig(path, dpi=110)


_ROWS: dict[str, list[dict]] = {}


def _auto_rows(result: dict) -> list[dict]:
    return _ROWS.get(result["task"], [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the runs' directory (final_lr_auto_runs.sh OUT)")
    parser.add_argument("--figure", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--grid-from", type=Path, default=None,
        help="an earlier --json: its grid runs stand in for the grid values OUT lacks",
    )  # fmt: skip
    ns = parser.parse_args()
    tasks = collect(ns.out)
    if ns.grid_from:
        add_grid(tasks, json.loads(ns.grid_from.read_text()))
    for task, by_value in tasks.items():
        _ROWS[task] = by_value.get("auto", [])
    results = analyse(tasks)
    print(table(results))
    print()
    print(grid_table(results))
    if ns.json:
        ns.json.write_text(json.dumps({"tasks": tasks, "results": results}, indent=1) + "\n")
    if ns.figure:
        figure(results, ns.figure)


if __name__ == "__main__":
    main()
