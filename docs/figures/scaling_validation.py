"""Draw scaling-validation.png and print the gap table of scaling-results.md from the runs
in RUNS (default runs/scaling-validation): each batch-32 and batch-512 run against the
batch-128 run of the same optimizer, per sample seen (an epoch is 60,000 samples at any
batch size)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from matplotlib.figure import Figure

from dynabound.experiments.rundir import load_run

RUNS = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/scaling-validation")
OUT = Path(__file__).with_name("scaling-validation.png")
SAMPLES_PER_EPOCH = 60_000
VARIANTS = {
    "same": ("unchanged", ":"),
    "rule": ("scale_batch_size", "-"),
    "lronly": ("lr x sqrt(k) only", "--"),
}
BATCH_COLOURS = {32: "#1f77b4", 512: "#ff7f0e"}


def curves(name: str) -> tuple[list[float], list[float], list[float]]:
    _, metrics = load_run(RUNS / name)
    samples = [m["epoch"] * SAMPLES_PER_EPOCH for m in metrics]
    return samples, [m["test_acc"] for m in metrics], [m["train_loss"] for m in metrics]


def gaps(name: str, reference: str) -> tuple[float, float]:
    """Mean absolute difference over epochs of test accuracy (points) and of log train
    loss, against the reference run."""
    _, acc, loss = curves(name)
    _, ref_acc, ref_loss = curves(reference)
    n = min(len(acc), len(ref_acc))
    acc_gap = sum(abs(a - b) for a, b in zip(acc[:n], ref_acc[:n], strict=True)) / n
    loss_gap = (
        sum(abs(math.log(a) - math.log(b)) for a, b in zip(loss[:n], ref_loss[:n], strict=True)) / n
    )
    return acc_gap, loss_gap


def main() -> None:
    fig = Figure(figsize=(13, 8), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    print("| optimizer | batch | hyperparameters | mean abs. gap, test accuracy (points) "
          "| mean abs. gap, log train loss | final test accuracy (%) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for col, optim in enumerate(("adam", "adabound")):
        reference = f"{optim}-b128"
        samples, acc, loss = curves(reference)
        axes[0][col].plot(samples, acc, color="black", linewidth=2, label="batch 128")
        axes[1][col].plot(samples, loss, color="black", linewidth=2, label="batch 128")
        print(f"| {optim} | 128 | presets (reference) | 0 | 0 | {acc[-1]:.2f} |")
        for batch in (32, 512):
            for variant, (label, style) in VARIANTS.items():
                name = f"{optim}-b{batch}-{variant}"
                if not (RUNS / name / "metrics.jsonl").is_file():
                    continue
                samples, acc, loss = curves(name)
                kwargs = dict(color=BATCH_COLOURS[batch], linestyle=style, linewidth=1.4)
                axes[0][col].plot(samples, acc, label=f"batch {batch}, {label}", **kwargs)
                axes[1][col].plot(samples, loss, **kwargs)
                acc_gap, loss_gap = gaps(name, reference)
                print(f"| {optim} | {batch} | {label} | {acc_gap:.3f} | {loss_gap:.3f} | "
                      f"{acc[-1]:.2f} |")  # fmt: skip
        axes[0][col].set_title({"adam": "Adam", "adabound": "AdaBound"}[optim])
        axes[0][col].set_ylabel("test accuracy (%)")
        axes[0][col].set_ylim(96, 98.8)
        axes[1][col].set_ylabel("train loss")
        axes[1][col].set_yscale("log")
        axes[1][col].set_xlabel("samples seen")
        axes[0][col].legend(fontsize=8, loc="lower right")
    fig.suptitle("MNIST MLP, 15 epochs: hyperparameters tuned at batch 128, run at 32 and 512")
    fig.savefig(OUT, dpi=130)
    print(f"\nfigure: {OUT}")


if __name__ == "__main__":
    main()
