"""The handwritten-digits data set that ships with scikit-learn (1797 8x8 images, offline)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

__all__ = ["Digits", "load_digits_split"]


class Digits(NamedTuple):
    train_x: torch.Tensor  # float32 [N, 64], pixel values scaled to [0, 1]
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor
    test_y: torch.Tensor


@functools.cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            "the digits data set needs scikit-learn, which the [experiments] extra installs: "
            'in a dynabound checkout, python -m pip install ".[experiments]"'
        ) from exc
    bunch = load_digits()
    # Pixels are counts of set bits in 4x4 blocks, 0..16.
    x = torch.as_tensor(bunch.data, dtype=torch.float32) / 16.0
    return x, torch.as_tensor(bunch.target, dtype=torch.int64)


def load_digits_split(test_fraction: float = 0.25, seed: int = 0) -> Digits:
    """Stratified train/test split of scikit-learn's digits, the same for the same seed.

    Each class contributes ``round(test_fraction * class_size)`` test images, chosen by a
    seeded torch permutation (so the split does not depend on scikit-learn's version).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x, y = _digits()
    gen = torch.Generator().manual_seed(seed)
    test_idx = []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        n_test = round(test_fraction * idx.numel())
        test_idx.append(idx[torch.randperm(idx.numel(), generator=gen)[:n_test]])
    is_test = torch.zeros(y.numel(), dtype=torch.bool)
    is_test[torch.cat(test_idx)] = True
    return Digits(x[~is_test], y[~is_test], x[is_test], y[is_test])
