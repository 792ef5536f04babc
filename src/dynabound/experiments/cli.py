"""The ``dynabound`` command: demo, run, compare, sweep, plot, probe, convert-checkpoint."""

from __future__ import annotations

import argparse
import importlib.util
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .arguments import (
    HPARAMS,
    SIGN_DESCENT,
    TRANSITION_EACH,
    TRANSITION_ONE,
    build_parser,
    check_arguments,
)
from .devices import shutdown_distributed
from .tasks import get_task

if TYPE_CHECKING:
    from .tasks.base import Task

__all__ = ["build_parser", "main"]


# --- run / compare / sweep ----------------------------------------------------------------------


def _hparam_overrides(ns: argparse.Namespace) -> dict[str, Any]:
    keys = [k for k, _, _ in HPARAMS] + ["bounds", "state_dtype"]
    return {k: getattr(ns, k) for k in keys if getattr(ns, k, None) is not None}


def _config_kwargs(ns: argparse.Namespace, task: type[Task]) -> dict[str, Any]:
    return {
        "task_args": task.task_args(ns),
        "epochs": ns.epochs,
        "batch_size": ns.batch_size,
        "seed": 0 if ns.seed is None else ns.seed,
        "milestones": ns.milestones,
        "lr_decay": ns.lr_decay,
        "data_dir": ns.data_dir,
        "download": ns.download,
        "device": ns.device or "auto",
        "amp": ns.amp,
        "record_bounds": not ns.no_bounds_record,
        "scale_from_batch": getattr(ns, "scale_from_batch", None),
    }


def _default_out(task: type[Task], config: dict[str, Any], suffix: str | None = None) -> Path:
    name = task.run_name(config)
    if suffix:
        name = name.rsplit("-", 1)[0] + f"-{suffix}"
    return Path("runs") / name


def _resume_given(
    ns: argparse.Namespace, task: type[Task], saved: dict[str, Any]
) -> dict[str, Any]:
    """The options given on the command line, as config entries, for a resume check."""
    given: dict[str, Any] = {"task": task.name, "device": ns.device or saved.get("device", "auto")}
    for key, value in (
        ("epochs", ns.epochs),
        ("batch_size", ns.batch_size),
        ("seed", ns.seed),
        ("milestones", ns.milestones),
        ("lr_decay", ns.lr_decay),
        ("amp", ns.amp),
        ("optim", ns.optim),
    ):
        if value is not None:
            given[key] = value
    scale_from = getattr(ns, "scale_from_batch", None)
    if scale_from is not None:
        given["scale_from_batch"] = scale_from
    overrides = _hparam_overrides(ns)
    if overrides and saved.get("scale_from_batch") is not None:
        from .config import scaled_hparams

        # Values given are for the batch size the run was scaled from, as when it started.
        tuned = {**saved["tuned_hparams"], **overrides}
        given["hparams"] = scaled_hparams(
            saved["optim"], tuned, saved["scale_from_batch"], saved["batch_size"]
        )
    elif overrides:
        given["hparams"] = {**saved["hparams"], **overrides}
    args = {k: v for k, v in task.task_args(ns).items() if v is not None}
    if args:
        given["task_args"] = {**saved["task_args"], **args}
    if ns.data_dir is not None:
        given["data_dir"] = ns.data_dir
    return given


def _train_one(config: dict[str, Any], out: Path, resume: bool, ns: argparse.Namespace):
    from .runner import train

    return train(
        config,
        out,
        resume=resume,
        quiet=ns.quiet,
        checkpoint_every=ns.checkpoint_every,
        checkpoint_steps=ns.checkpoint_steps,
        progress_every=ns.progress_every,
    )


def _cmd_run(ns: argparse.Namespace) -> int:
    from .runner import build_config

    task = get_task(ns.task)
    if ns.resume and ns.out:
        out = Path(ns.out)
        result = _train_one(_resume_given(ns, task, _saved_config(out)), out, True, ns)
        return 130 if result.interrupted else 0
    if ns.optim is None:
        raise ValueError("--optim is required (or --resume with the --out of a saved run)")
    config = build_config(
        ns.task, ns.optim, hparams=_hparam_overrides(ns), **_config_kwargs(ns, task)
    )
    out = Path(ns.out) if ns.out else _default_out(task, config)
    if ns.resume:
        config = _resume_given(ns, task, _saved_config(out))
    result = _train_one(config, out, ns.resume, ns)
    return 130 if result.interrupted else 0


def _saved_config(out: Path) -> dict[str, Any]:
    """The configuration of the run to resume in ``out``, or why there is none."""
    from .rundir import CONFIG, read_config

    if not out.exists():
        raise ValueError(f"nothing to resume: {out} does not exist")
    if not (out / CONFIG).is_file():
        raise ValueError(f"nothing to resume: {out} is not a run directory (no {CONFIG})")
    return read_config(out)


def _accepts(optim: str, key: str) -> bool:
    from .optimizers import ALLOWED

    return key in ALLOWED[optim]


Job = tuple[str, dict[str, Any], int | None, Path]  # optim, overrides, seed (None: --seed), dir


def _run_collection(
    ns: argparse.Namespace, task: type[Task], jobs: list[Job]
) -> tuple[list[Path], bool]:
    """Train each (optim, overrides, seed, run_dir) in turn, resuming runs already started
    there; a finished run is only read back, so rerunning a collection costs no training."""
    from .runner import CHECKPOINT, build_config

    # Every configuration is built (and so checked) before the first run starts.
    configs = []
    for optim, overrides, seed, _ in jobs:
        kwargs = _config_kwargs(ns, task)
        if seed is not None:
            kwargs["seed"] = seed
        configs.append(build_config(task.name, optim, hparams=overrides, **kwargs))
    done = []
    for config, (_, _, _, run_dir) in zip(configs, jobs, strict=True):
        resume = (run_dir / CHECKPOINT).is_file()
        if resume and _finished(config, run_dir):
            done.append(run_dir)
            continue
        result = _train_one(config, run_dir, resume, ns)
        if result.interrupted:
            return done, True
        done.append(run_dir)
    return done, False


def _finished(config: dict[str, Any], run_dir: Path) -> bool:
    """Whether ``run_dir``'s checkpoint holds all of ``config``'s epochs, with the same
    configuration (a different one is refused, as a resume would refuse it). A finished run
    is neither loaded nor written again: rerunning a long collection costs no data loading."""
    from .config import check_resume_config
    from .rundir import CHECKPOINT, load_checkpoint

    ckpt = load_checkpoint(run_dir / CHECKPOINT)
    check_resume_config(ckpt["config"], config)
    epochs = int(config["epochs"])
    return ckpt["config"]["epochs"] == epochs and ckpt["epoch"] >= epochs


def _results_table(task: type[Task], run_dirs: list[Path]) -> tuple[str, list[dict[str, Any]]]:
    from .plots import run_labels
    from .runner import load_run
    from .seeds import final_and_best

    runs = [load_run(d) for d in run_dirs]
    configs = [c for c, _ in runs]
    metric = task.metric
    name = {
        "accuracy": "test accuracy (%)",
        "perplexity": "test perplexity",
        "regret": "average regret",
    }[metric]
    lines = [
        f"| optimizer | final {name} | best {name} | epochs | time (s) |",
        "|---|---|---|---|---|",
    ]
    rows = []
    labels = run_labels(configs, run_dirs)
    for (config, metrics), d, label in zip(runs, run_dirs, labels, strict=True):
        if not metrics:
            continue
        final, best = final_and_best(metrics, metric)
        rows.append(
            {
                "optimizer": label,
                "seed": config["seed"],
                "run": str(d),
                "final": final,
                "best": best,
                "epochs": metrics[-1]["epoch"],
                "time": metrics[-1]["time"],
                "hparams": config["hparams"],
            }
        )
        lines.append(
            f"| {label} | {final:.4g} | {best:.4g} | {metrics[-1]['epoch']} | "
            f"{metrics[-1]['time']:.0f} |"
        )
    return "\n".join(lines) + "\n", rows


def _cmd_compare(ns: argparse.Namespace) -> int:
    from .plots import plot_runs
    from .runner import build_config

    task = get_task(ns.task)
    optims = ns.optims or list(task.optimizers)
    overrides = _hparam_overrides(ns)
    probe_config = build_config(task.name, optims[0], **_config_kwargs(ns, task))
    out = Path(ns.out) if ns.out else _default_out(task, probe_config, "compare")
    accepted = {o: {k: v for k, v in overrides.items() if _accepts(o, k)} for o in optims}
    if ns.seeds is None:
        jobs: list[Job] = [(o, accepted[o], None, out / o) for o in optims]
    else:
        # Seed by seed: a collection stopped early holds whole seeds of every optimizer.
        jobs = [
            (o, accepted[o], seed, out / o / f"seed-{seed}") for seed in ns.seeds for o in optims
        ]
    done, interrupted = _run_collection(ns, task, jobs)
    if interrupted:
        return 130
    if _is_main():
        figure = plot_runs(done, out / "compare.png")
        table, rows = _results_table(task, done)
        (out / "results.md").write_text(table)
        (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
        print(table + f"\nfigure: {figure}\ntable: {out / 'results.md'}")
        if ns.seeds is not None:
            _write_aggregate(task, done, out)
    return 0


def _write_aggregate(task: type[Task], run_dirs: list[Path], out: Path) -> None:
    """OUT/aggregate.json and OUT/aggregate.md: per optimizer, mean ± std and count of the
    final and best test metric over the seeds."""
    from .plots import run_label
    from .seeds import aggregate, aggregate_table, load_groups

    rows = aggregate(load_groups(run_dirs), task.metric, label=run_label)
    table = aggregate_table(rows)
    (out / "aggregate.md").write_text(table)
    (out / "aggregate.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nover seeds (std: sample standard deviation, n - 1):\n{table}")
    print(f"aggregate: {out / 'aggregate.md'}, {out / 'aggregate.json'}")


def _cmd_sweep(ns: argparse.Namespace) -> int:
    from .plots import plot_sweep
    from .rundir import estimated_final_lr
    from .runner import build_config, load_run

    task = get_task(ns.task)
    overrides = _hparam_overrides(ns)
    probe_config = build_config(task.name, ns.optim, **_config_kwargs(ns, task))
    out = Path(ns.out) if ns.out else _default_out(task, probe_config, f"sweep-{ns.optim}")
    jobs: list[Job] = []
    for gamma in ns.gamma:
        for final_lr in ns.final_lr:
            values = {**overrides, "final_lr": final_lr, "gamma": gamma}
            name = final_lr if isinstance(final_lr, str) else f"{final_lr:g}"
            jobs.append((ns.optim, values, None, out / f"final_lr={name},gamma={gamma:g}"))
    done, interrupted = _run_collection(ns, task, jobs)
    if interrupted:
        return 130
    if not _is_main():
        return 0
    key = {"accuracy": "test_acc", "perplexity": "test_ppl", "regret": "avg_regret"}[task.metric]
    results = []
    for d in done:
        config, metrics = load_run(d)
        final_lr, auto = config["hparams"]["final_lr"], config["hparams"]["final_lr"] == "auto"
        if auto:
            final_lr = estimated_final_lr(metrics)
        results.append(
            {
                "final_lr": final_lr,
                "auto": auto,
                "gamma": config["hparams"]["gamma"],
                "value": metrics[-1][key],
                "curve": [m[key] for m in metrics],
            }
        )
    figure = plot_sweep(
        results,
        out / "sweep.png",
        metric=task.metric,
        title=f"{task.name}: {ns.optim} sensitivity to final_lr and gamma",
    )
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"| gamma | final_lr | final {key} |\n|---|---|---|")
    for r in results:
        final_lr = f"auto: {r['final_lr']:.4g}" if r["auto"] else f"{r['final_lr']:g}"
        print(f"| {r['gamma']:g} | {final_lr} | {r['value']:.4g} |")
    print(f"figure: {figure}")
    return 0


# --- plot / probe / demo ------------------------------------------------------------------------


def _cmd_plot(ns: argparse.Namespace) -> int:
    from .plots import plot_run_transition, plot_runs, plot_sign_descent
    from .rundir import find_runs
    from .runner import load_run

    runs = [run for r in ns.runs for run in find_runs(r)]
    if ns.against:
        return _plot_against(runs, ns)
    default = runs[0] / "curves.png" if len(runs) == 1 else Path("curves.png")
    out = Path(ns.out) if ns.out else default
    paths = [plot_runs(runs, out, title=ns.title, band=None if ns.each else ns.band)]
    if not ns.no_transition:
        names = _transition_names(runs)
        with_sign = []
        for r in runs:
            config, metrics = load_run(r)
            if any("bounds" in m for m in metrics):
                name = TRANSITION_ONE if len(runs) == 1 else TRANSITION_EACH.format(run=names[r])
                paths.append(plot_run_transition(r, out.parent / name))
            if any("sign" in m for m in metrics):
                with_sign.append(r)
        if with_sign:
            paths.append(plot_sign_descent(with_sign, out.parent / SIGN_DESCENT))
    for p in paths:
        print(p)
    return 0


def _plot_against(runs: list[Path], ns: argparse.Namespace) -> int:
    """The sensitivity figure, and its points as a table on stdout."""
    from .plots import plot_sensitivity
    from .sensitivity import EFFECTIVE_STEP, sensitivity_points, sensitivity_table

    against: dict[str, str] | str
    if EFFECTIVE_STEP in ns.against:
        if len(ns.against) > 1:
            raise ValueError(f"--against {EFFECTIVE_STEP} takes no OPTIM=KEY pairs")
        against = EFFECTIVE_STEP
    else:
        pairs = [a.split("=", 1) for a in ns.against]
        if any(len(p) != 2 or not all(p) for p in pairs):
            raise ValueError(
                f"--against takes OPTIM=KEY pairs or {EFFECTIVE_STEP}, got {' '.join(ns.against)}"
            )
        against = dict(pairs)
    print(sensitivity_table(sensitivity_points(runs, against)))
    print(plot_sensitivity(runs, Path(ns.out or "sensitivity.png"), against, ns.title))
    return 0


def _transition_names(runs: list[Path]) -> dict[Path, str]:
    from .plots import run_names

    return dict(zip(runs, run_names(runs), strict=True))


def _cmd_probe(ns: argparse.Namespace) -> int:
    from .probe import probe_run

    path = probe_run(
        ns.run, ns.out, kernel=ns.kernel, device=ns.device, all_elements=ns.all_elements
    )
    print(path)
    return 0


def _cmd_demo(ns: argparse.Namespace) -> int:
    from .demo import run_demo

    report = run_demo(ns.out, quick=ns.quick, quiet=ns.quiet, device=ns.device)
    return 130 if report is None else 0


def _cmd_convert_checkpoint(ns: argparse.Namespace) -> int:
    from .rundir import CHECKPOINT, FORMAT, convert_checkpoint, find_runs

    for run_dir in [run for r in ns.runs for run in find_runs(r)]:
        converted = convert_checkpoint(run_dir, trust=ns.trust)
        print(f"{run_dir / CHECKPOINT}: {'converted to' if converted else 'already in'} {FORMAT}")
    return 0


# The [experiments] extra, by module: what every command imports (numpy, matplotlib for
# the figures, tqdm for the progress bars), and scikit-learn, whose digits data set the demo
# and the digits task train on. Installing the extra is the one fix for any of them.
EXTRA = {"numpy": "numpy", "matplotlib": "matplotlib", "tqdm": "tqdm", "sklearn": "scikit-learn"}
EXTRA_INSTALL = 'in a dynabound checkout, python -m pip install ".[experiments]"'


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails, or a blocked module
        return False


def _missing_extra(ns: argparse.Namespace) -> list[str]:
    """The packages of the [experiments] extra that this command needs and lacks."""
    needed = ["numpy", "matplotlib", "tqdm"]
    if ns.command == "demo" or getattr(ns, "task", None) == "digits":
        needed.append("sklearn")
    return [EXTRA[m] for m in needed if not _installed(m)]


def _needs_extra(command: str, missing: list[str]) -> str:
    names = missing[0] if len(missing) == 1 else f"{', '.join(missing[:-1])} and {missing[-1]}"
    verb = "is" if len(missing) == 1 else "are"
    return (
        f"dynabound {command}: error: {names} {verb} not installed: this command needs the "
        f"[experiments] extra; {EXTRA_INSTALL}"
    )


def _is_main() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def _interrupt_on_sigterm() -> None:
    # `kill` (SIGTERM) then leaves the same resumable state as Ctrl-C.
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    missing = _missing_extra(ns)
    if missing:
        print(_needs_extra(ns.command, missing), file=sys.stderr)
        return 2
    from .data import DataFormatError, DataUnavailableError, DownloadError

    commands = {
        "demo": _cmd_demo,
        "run": _cmd_run,
        "compare": _cmd_compare,
        "sweep": _cmd_sweep,
        "plot": _cmd_plot,
        "probe": _cmd_probe,
        "convert-checkpoint": _cmd_convert_checkpoint,
    }
    _interrupt_on_sigterm()
    try:
        check_arguments(ns)
        threads = getattr(ns, "threads", None)
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        code = commands[ns.command](ns)
        shutdown_distributed(wait_for_peers=True)
        return code
    except ModuleNotFoundError as exc:
        package = (exc.name or "").split(".")[0]
        if package not in EXTRA:
            raise
        print(_needs_extra(ns.command, [EXTRA[package]]), file=sys.stderr)
        return 2
    except (DataUnavailableError, DataFormatError, DownloadError, ValueError, OSError) as exc:
        print(f"dynabound {ns.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    sys.exit(main())
