"""scikit-learn's handwritten digits (1797 8x8 images, shipped offline) with a small MLP."""

from __future__ import annotations

import argparse
from typing import Any

from torch import nn

from ..data import load_digits_split
from ..models import MLP
from ..optimizers import COMPARED
from .base import ClassificationTask, check_positive

__all__ = ["DigitsTask"]


class DigitsTask(ClassificationTask):
    name = "digits"
    description = (
        "scikit-learn's handwritten digits (real data that ships with scikit-learn, 1347 "
        "train / 450 test 8x8 images) with a 64-H-10 MLP; runs offline in seconds"
    )
    defaults = {"epochs": 30, "batch_size": 32, "milestones": [], "lr_decay": 0.1}
    optimizers = COMPARED

    @classmethod
    def add_arguments(cls, parser: argparse._ArgumentGroup) -> None:
        parser.add_argument("--hidden", type=int, default=None, help="hidden units (default 128)")

    @classmethod
    def task_args(cls, ns: argparse.Namespace) -> dict[str, Any]:
        return {"hidden": ns.hidden}

    @classmethod
    def check_args(cls, args: dict[str, Any]) -> None:
        check_positive(args, "hidden")

    def load_data(self) -> None:
        split = load_digits_split(test_fraction=0.25, seed=0)
        self.train_x, self.train_y = split.train_x.to(self.device), split.train_y.to(self.device)
        self.test_x, self.test_y = split.test_x.to(self.device), split.test_y.to(self.device)
        self.model_spec = {"in_features": 64, "hidden": int(self.args.get("hidden") or 128)}

    def build_model(self, spec: dict[str, Any]) -> nn.Module:
        return MLP(spec["in_features"], spec["hidden"], 10)
