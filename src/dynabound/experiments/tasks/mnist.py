"""MNIST with the one-hidden-layer perceptron of the paper's Figure 2."""

from __future__ import annotations

import argparse
from typing import Any

from torch import nn

from ..data import MNIST_MEAN, MNIST_STD, load_mnist, normalize
from ..models import MLP
from ..optimizers import COMPARED
from .base import ClassificationTask, check_positive

__all__ = ["MNISTTask"]


class MNISTTask(ClassificationTask):
    name = "mnist"
    description = (
        "MNIST (60000/10000 28x28 digits, IDX files) with a one-hidden-layer perceptron, "
        "100 epochs, batch 128, no augmentation (the paper's Figure 2)"
    )
    defaults = {"epochs": 100, "batch_size": 128, "milestones": [], "lr_decay": 0.1}
    optimizers = COMPARED

    @classmethod
    def add_arguments(cls, parser: argparse._ArgumentGroup) -> None:
        parser.add_argument(
            "--hidden", type=int, default=None, help="hidden units of the perceptron (default 256)"
        )

    @classmethod
    def task_args(cls, ns: argparse.Namespace) -> dict[str, Any]:
        return {"hidden": ns.hidden}

    @classmethod
    def check_args(cls, args: dict[str, Any]) -> None:
        check_positive(args, "hidden")

    def load_data(self) -> None:
        data = load_mnist(self.config["data_dir"], download=self.config.get("download", False))
        # Normalised once up front: 60000 x 784 floats is 188 MB, cheaper than per batch.
        self.train_x = normalize(data.train_images, MNIST_MEAN, MNIST_STD).flatten(1)
        self.test_x = normalize(data.test_images, MNIST_MEAN, MNIST_STD).flatten(1)
        self.train_x, self.test_x = self.train_x.to(self.device), self.test_x.to(self.device)
        self.train_y, self.test_y = (
            data.train_labels.to(self.device),
            data.test_labels.to(self.device),
        )
        self.model_spec = {"hidden": int(self.args.get("hidden") or 256)}

    def build_model(self, spec: dict[str, Any]) -> nn.Module:
        return MLP(784, spec["hidden"], 10)
