"""The per-run file of sensitivity-effective-step-results.md: each finished run's
configuration, per-epoch test accuracy and training loss, final and best test accuracy,
and the environments it ran in, as one JSON list.

    python docs/figures/sensitivity_runs.py ROOT ROOT/sens/*/seed-* > runs.json

A run is named by its path relative to ROOT. Runs that have not reached their last epoch
are left out and listed on stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dynabound.experiments.rundir import CONFIG, ENVIRONMENT, load_run, read_metrics


def run_entry(root: Path, run: Path) -> dict | None:
    """The entry of one run directory, or None while it is unfinished."""
    config, records = load_run(run)
    epochs = [r for r in records if "epoch" in r]
    if not epochs or epochs[-1]["epoch"] < config["epochs"]:
        return None
    test_acc = [r["test_acc"] for r in epochs]
    return {
        "run": str(run.relative_to(root)),
        "optim": config["optim"],
        "hparams": config["hparams"],
        "seed": config["seed"],
        "epochs": config["epochs"],
        "test_acc": test_acc,
        "train_loss": [r["train_loss"] for r in epochs],
        "final": test_acc[-1],
        "best": max(test_acc),
        "environment": read_metrics(run / ENVIRONMENT),
    }


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    root = Path(argv[0]).resolve()
    entries = []
    for name in sorted(argv[1:]):
        run = Path(name).resolve()
        if not (run / CONFIG).is_file():
            continue  # a log file or claim beside the run directories
        entry = run_entry(root, run)
        if entry is None:
            print(f"unfinished, left out: {name}", file=sys.stderr)
        else:
            entries.append(entry)
    json.dump(entries, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1:])
