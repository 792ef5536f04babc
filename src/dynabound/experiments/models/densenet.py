"""DenseNet-BC for 32x32 images (CIFAR variant): a 3x3 stem convolution with 2*growth
channels and no max-pooling, bottleneck layers and transitions that halve the channels."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["DenseNet", "densenet121"]


class _DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 to 4*growth channels, BN-ReLU-Conv3x3 to growth channels, then the
    new features are concatenated to the input."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(torch.relu(self.bn1(x)))
        out = self.conv2(torch.relu(self.bn2(out)))
        return torch.cat([x, out], dim=1)


class _Transition(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.BatchNorm2d(cin),
            nn.ReLU(inplace=True),
            nn.Conv2d(cin, cout, kernel_size=1, bias=False),
            nn.AvgPool2d(2),
        )


class DenseNet(nn.Module):
    def __init__(
        self,
        layers_per_block: list[int],
        growth: int = 32,
        compression: float = 0.5,
        num_classes: int = 10,
        in_channels: int = 3,
    ):
        super().__init__()
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        if growth < 1 or num_classes < 1:
            raise ValueError("growth and num_classes must be positive")
        channels = 2 * growth
        parts: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, kernel_size=3, padding=1, bias=False)
        ]
        for i, n in enumerate(layers_per_block):
            parts += [_DenseLayer(channels + j * growth, growth) for j in range(n)]
            channels += n * growth
            if i < len(layers_per_block) - 1:
                out = math.floor(channels * compression)
                parts.append(_Transition(channels, out))
                channels = out
        parts += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1)]
        self.features = nn.Sequential(*parts)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


def densenet121(num_classes: int = 10) -> DenseNet:
    """The paper's DenseNet-121: growth 32, dense blocks [6, 12, 24, 16], compression 0.5;
    6,956,298 parameters for 10 classes."""
    return DenseNet([6, 12, 24, 16], growth=32, compression=0.5, num_classes=num_classes)
