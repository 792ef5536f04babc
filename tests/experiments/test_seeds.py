"""compare --seeds: one run per optimizer and seed, resumable; the aggregate over seeds;
mean curves with a band in plot."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from dynabound.experiments import plots
from dynabound.experiments.cli import main
from dynabound.experiments.rundir import find_runs
from dynabound.experiments.seeds import aggregate_table, summarize

from .runs import assert_same_run

OPTIMS = ("adam", "adabound")
SEEDS = (1, 2)
# Digits with a small MLP and batch 128: 12 steps an epoch, a few seconds for all four runs.
ARGV = [
    "compare",
    "digits",
    "--optims",
    *OPTIMS,
    "--seeds",
    *map(str, SEEDS),
    "--epochs",
    "2",
    "--hidden",
    "8",
    "--batch-size",
    "128",
    "--quiet",
]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seeds") / "cmp"
    assert main([*ARGV, "--out", str(out)]) == 0
    return out


def test_one_run_directory_per_optimizer_and_seed(compared):
    for optim in OPTIMS:
        for seed in SEEDS:
            config = json.loads((compared / optim / f"seed-{seed}" / "config.json").read_text())
            assert config["optim"] == optim and config["seed"] == seed
    rows = json.loads((compared / "results.json").read_text())
    # Seed by seed: every optimizer's first seed before any second one.
    assert [(r["optimizer"].split()[0], r["seed"]) for r in rows] == [
        ("Adam", 1),
        ("AdaBound", 1),
        ("Adam", 2),
        ("AdaBound", 2),
    ]


def test_aggregate_matches_numbers_computed_from_the_metrics_files(compared):
    rows = json.loads((compared / "aggregate.json").read_text())
    table = (compared / "aggregate.md").read_text()
    assert [r["optimizer"] for r in rows] == ["Adam", "AdaBound"]
    for row, optim in zip(rows, OPTIMS, strict=True):
        curves = [
            [m["test_acc"] for m in _read_jsonl(compared / optim / f"seed-{s}" / "metrics.jsonl")]
            for s in SEEDS
        ]
        finals = [c[-1] for c in curves]
        bests = [max(c) for c in curves]
        # The seeds must give different results, or the standard deviation tests nothing.
        assert finals[0] != finals[1]
        assert row["n"] == 2 and row["seeds"] == list(SEEDS) and row["epochs"] == [2, 2]
        assert row["final"]["values"] == finals and row["best"]["values"] == bests
        assert row["final"]["mean"] == pytest.approx(statistics.mean(finals), rel=1e-12)
        assert row["final"]["std"] == pytest.approx(statistics.stdev(finals), rel=1e-12)
        assert row["best"]["mean"] == pytest.approx(statistics.mean(bests), rel=1e-12)
        assert row["best"]["std"] == pytest.approx(statistics.stdev(bests), rel=1e-12)
        name = "Adam" if optim == "adam" else "AdaBound"
        final_cell = f"{statistics.mean(finals):.2f} ± {statistics.stdev(finals):.2f}"
        best_cell = f"{statistics.mean(bests):.2f} ± {statistics.stdev(bests):.2f}"
        per_seed = f"1: {finals[0]:.2f}, 2: {finals[1]:.2f}"
        assert f"| {name} | 2 | {final_cell} | {best_cell} | {per_seed} | 2 |" in table


def test_summary_of_one_value_has_no_standard_deviation():
    one = summarize([98.5])
    assert one["n"] == 1 and one["mean"] == 98.5 and one["std"] is None
    row = {
        "optimizer": "Adam",
        "metric": "perplexity",
        "n": 1,
        "seeds": [3],
        "epochs": [5],
        "final": one,
        "best": summarize([97.25]),
    }
    assert "| Adam | 1 | 98.50 | 97.25 | 3: 98.50 | 5 |" in aggregate_table([row])
    three = summarize([1.0, 2.0, 4.0])
    assert three["std"] == pytest.approx(statistics.stdev([1.0, 2.0, 4.0]), rel=1e-15)


def _mtimes(run_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}


def test_an_interrupted_multi_seed_compare_resumes_to_the_same_results(
    compared, tmp_path, monkeypatch
):
    from dynabound.experiments import runner

    real_train = runner.train
    calls = []

    def train_interrupting_the_third_run(config, run_dir, **kwargs):
        calls.append(Path(run_dir))

        def interrupt(epoch: int, batch: int) -> None:
            if len(calls) == 3 and epoch == 2 and batch == 4:
                raise KeyboardInterrupt

        return real_train(config, run_dir, **{**kwargs, "checkpoint_steps": 1}, on_batch=interrupt)

    out = tmp_path / "cmp"
    monkeypatch.setattr(runner, "train", train_interrupting_the_third_run)
    assert main([*ARGV, "--out", str(out)]) == 130
    assert calls == [out / "adam" / "seed-1", out / "adabound" / "seed-1", out / "adam" / "seed-2"]
    assert not (out / "adabound" / "seed-2").exists() and not (out / "aggregate.json").exists()
    finished = {d: _mtimes(d) for d in calls[:2]}

    calls.clear()
    monkeypatch.setattr(runner, "train", real_train)
    assert main([*ARGV, "--out", str(out)]) == 0
    # The finished runs were neither trained nor rewritten; the cut one went on from its step.
    assert {d: _mtimes(d) for d in finished} == finished
    for optim in OPTIMS:
        for seed in SEEDS:
            assert_same_run(out / optim / f"seed-{seed}", compared / optim / f"seed-{seed}")
    ours, theirs = (json.loads((d / "aggregate.json").read_text()) for d in (out, compared))
    for a, b in zip(ours, theirs, strict=True):
        assert a["final"] == b["final"] and a["best"] == b["best"]

    # A third run of the command trains nothing and changes no run directory.
    before = {d: _mtimes(d) for d in find_runs(out)}
    assert main([*ARGV, "--out", str(out)]) == 0
    assert {d: _mtimes(d) for d in find_runs(out)} == before


def test_a_changed_configuration_is_refused_not_skipped(compared, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = [*ARGV[:-1], "--epochs", "1", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    assert main([*argv, "--lr", "0.01"]) == 2
    assert "cannot resume with a different configuration" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seed", "3"], "either --seed or --seeds"),
        (["--seeds", "1", "1"], "must not repeat"),
    ],
)
def test_seed_options_are_checked_before_any_work(flags, message, tmp_path, capsys):
    argv = ["compare", "digits", "--epochs", "1", "--quiet", "--out", str(tmp_path / "o")]
    if "--seeds" not in flags:
        flags = [*flags, "--seeds", "1", "2"]
    assert main([*argv, *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_find_runs_lists_seeds_in_numeric_order(tmp_path):
    for optim in ("b", "a"):
        for seed in (10, 2, 1):
            d = tmp_path / optim / f"seed-{seed}"
            d.mkdir(parents=True)
            (d / "config.json").write_text("{}")
    names = [str(p.relative_to(tmp_path)) for p in find_runs(tmp_path)]
    assert names == [f"{o}/seed-{s}" for o in ("a", "b") for s in (1, 2, 10)]
    assert find_runs(tmp_path / "a" / "seed-2") == [tmp_path / "a" / "seed-2"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no run directories"):
        find_runs(tmp_path / "empty")


def _drawn_figure(monkeypatch) -> list:
    figures = []
    real_save = plots._save

    def keep(fig, path):
        figures.append(fig)
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return figures


@pytest.mark.parametrize("band", ["minmax", "std"])
def test_plot_draws_the_mean_of_the_seeds_with_a_band(compared, tmp_path, monkeypatch, band):
    figures = _drawn_figure(monkeypatch)
    out = tmp_path / "bands" / "curves.png"
    assert main(["plot", str(compared), "--band", band, "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
    # Run directories sharing a name get their optimizer's in their transition plot's name.
    assert sorted(p.name for p in out.parent.glob("transition*.png")) == [
        "transition-adabound-seed-1.png",
        "transition-adabound-seed-2.png",
    ]
    fig = figures[0]  # the curves; the sign-descent figure follows
    test_ax = fig.axes[1]
    assert "mean over seeds" in fig._suptitle.get_text()
    assert plots.BANDS[band] in fig._suptitle.get_text()
    for optim, line, poly in zip(OPTIMS, test_ax.lines, test_ax.collections, strict=True):
        curves = [
            [m["test_acc"] for m in _read_jsonl(compared / optim / f"seed-{s}" / "metrics.jsonl")]
            for s in SEEDS
        ]
        by_epoch = list(zip(*curves, strict=True))
        assert line.get_label().endswith("(n=2)")
        assert list(line.get_ydata()) == pytest.approx([statistics.mean(v) for v in by_epoch])
        if band == "minmax":
            low, high = [min(v) for v in by_epoch], [max(v) for v in by_epoch]
        else:
            low = [statistics.mean(v) - statistics.stdev(v) for v in by_epoch]
            high = [statistics.mean(v) + statistics.stdev(v) for v in by_epoch]
        ys = poly.get_paths()[0].vertices[:, 1]
        assert min(ys) == pytest.approx(min(low)) and max(ys) == pytest.approx(max(high))
    assert len(test_ax.lines) == len(test_ax.collections) == len(OPTIMS)


def test_plot_each_draws_one_line_per_run(compared, tmp_path, monkeypatch):
    figures = _drawn_figure(monkeypatch)
    out = tmp_path / "each.png"
    assert main(["plot", str(compared), "--each", "--no-transition", "--out", str(out)]) == 0
    (fig,) = figures
    assert len(fig.axes[1].lines) == len(OPTIMS) * len(SEEDS)
    assert not fig.axes[1].collections
