"""Models of the paper's experiments, written for 32x32 CIFAR images and PTB-sized vocabularies."""

from torch import nn

from .densenet import DenseNet, densenet121
from .lstm import LSTMLanguageModel, detach_hidden
from .mlp import MLP
from .resnet import ResNet, resnet18, resnet34

__all__ = [
    "MLP",
    "DenseNet",
    "LSTMLanguageModel",
    "ResNet",
    "count_parameters",
    "densenet121",
    "detach_hidden",
    "resnet18",
    "resnet34",
]


def count_parameters(model: nn.Module) -> int:
    """Number of distinct trainable scalars (tied weights count once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
