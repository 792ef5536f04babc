"""CIFAR-10 with ResNet-34 or DenseNet-121: the paper's protocol (design.md section 5)."""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from ..data import CIFAR10_MEAN, CIFAR10_STD, load_cifar10, normalize, random_crop_flip
from ..models import densenet121, resnet18, resnet34
from ..optimizers import COMPARED
from .base import ClassificationTask, EpochContext, check_positive

__all__ = ["CIFAR10Task"]

# ResNet-34 and DenseNet-121 are the paper's; ResNet-18 is a cheaper stand-in for trials.
MODELS = {"resnet34": resnet34, "densenet121": densenet121, "resnet18": resnet18}


class CIFAR10Task(ClassificationTask):
    name = "cifar10"
    description = (
        "CIFAR-10 (python pickle batches) with ResNet-34 or DenseNet-121, 200 epochs, "
        "batch 128, weight decay 5e-4, lr x0.1 after epoch 150, random crop + flip"
    )
    defaults = {"epochs": 200, "batch_size": 128, "milestones": [150], "lr_decay": 0.1}
    optimizers = COMPARED
    eval_batch_size = 500

    @classmethod
    def add_arguments(cls, parser: argparse._ArgumentGroup) -> None:
        parser.add_argument(
            "--model", choices=sorted(MODELS), default=None, help="network (default resnet34)"
        )
        parser.add_argument(
            "--synthetic",
            type=int,
            default=None,
            metavar="N",
            help="train on N random images in CIFAR-10's format instead of the data set "
            "(N/5 test images): for speed measurements without the files",
        )

    @classmethod
    def task_args(cls, ns: argparse.Namespace) -> dict[str, Any]:
        return {"model": ns.model, "synthetic": ns.synthetic}

    @classmethod
    def check_args(cls, args: dict[str, Any]) -> None:
        check_positive(args, "synthetic")

    @classmethod
    def preset_model(cls, task_args: dict[str, Any]) -> str | None:
        return task_args.get("model") or "resnet34"

    @classmethod
    def run_name(cls, config: dict[str, Any]) -> str:
        model = config["task_args"].get("model") or "resnet34"
        return f"cifar10-{model}-{config['optim']}"

    def load_data(self) -> None:
        n = self.args.get("synthetic")
        if n:
            g = torch.Generator().manual_seed(self.config["seed"])
            train = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
            test = torch.randint(
                0, 256, (max(1, n // 5), 3, 32, 32), generator=g, dtype=torch.uint8
            )
            train_y = torch.randint(0, 10, (n,), generator=g)
            test_y = torch.randint(0, 10, (test.shape[0],), generator=g)
        else:
            data = load_cifar10(
                self.config["data_dir"], download=self.config.get("download", False)
            )
            # Stored NHWC; kept as uint8 NCHW (150 MB) and converted per batch.
            train = data.train_images.permute(0, 3, 1, 2).contiguous()
            test = data.test_images.permute(0, 3, 1, 2).contiguous()
            train_y, test_y = data.train_labels, data.test_labels
        self.train_x, self.test_x = train.to(self.device), test.to(self.device)
        self.train_y, self.test_y = train_y.to(self.device), test_y.to(self.device)
        self.model_spec = {"model": self.args.get("model") or "resnet34"}

    def build_model(self, spec: dict[str, Any]) -> nn.Module:
        return MODELS[spec["model"]](num_classes=10)

    def prepare(self, x: torch.Tensor, train: bool, generator: torch.Generator) -> torch.Tensor:
        if train:
            x = random_crop_flip(x, padding=4, generator=generator)
        return normalize(x, CIFAR10_MEAN, CIFAR10_STD)

    def channels_last(self, ctx: EpochContext) -> bool:
        return ctx.device.type == "cuda"
