"""The one-hidden-layer perceptron of the paper's MNIST experiment (Figure 2)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MLP"]


class MLP(nn.Module):
    """``in_features -> hidden -> ReLU -> out_features``; inputs are flattened first.

    The paper trains "a simple fully connected neural network with one hidden layer" on
    MNIST but states no width and released no code for it, so ``hidden=256`` is this
    project's choice (784-256-10: 203,530 parameters). The same class with 64 inputs serves
    the scikit-learn digits task.
    """

    def __init__(self, in_features: int = 784, hidden: int = 256, out_features: int = 10):
        super().__init__()
        for name, value in (
            ("in_features", in_features),
            ("hidden", hidden),
            ("out_features", out_features),
        ):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        self.in_features = in_features
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.in_features:
            raise ValueError(f"expected {self.in_features} features per sample, got {x.shape[1]}")
        return self.fc2(torch.relu(self.fc1(x)))
