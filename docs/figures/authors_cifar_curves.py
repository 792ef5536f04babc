"""Print the CIFAR-10 table of reproduction.md from the authors' saved curves: per file,
the final test accuracy, the best (and its epoch), and the mean and range of the last ten
epochs. CURVES is a directory holding the files of `demos/cifar10/curve/pretrained/` of the
authors' repository (Luolc/AdaBound), each a torch-saved dict with a `test_acc` list."""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def main(curves: Path) -> None:
    print("| curve | final | best (epoch) | last ten, mean (range) |")
    print("|---|---:|---:|---:|")
    for path in sorted(p for p in curves.iterdir() if p.is_file()):
        test = [float(x) for x in torch.load(path, weights_only=True)["test_acc"]]
        best = max(test)
        last = test[-10:]
        print(
            f"| {path.name} | {test[-1]:.2f} | {best:.2f} ({test.index(best) + 1}) | "
            f"{sum(last) / len(last):.2f} ({min(last):.2f}-{max(last):.2f}) |"
        )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python docs/figures/authors_cifar_curves.py CURVES_DIRECTORY")
    main(Path(sys.argv[1]))
