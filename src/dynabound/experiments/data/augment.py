"""Batched image augmentation and normalisation on tensors (no per-image Python loop)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["normalize", "random_crop_flip"]


def random_crop_flip(
    images: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The standard CIFAR augmentation on an NCHW batch: zero-pad by ``padding``, take a
    random crop of the original size, and mirror horizontally with probability 1/2.

    Each image draws its own offsets and flip from ``generator``, so the result is
    deterministic for a seeded generator. Works on uint8 or float images; apply it before
    ``normalize`` so that the padding is black, as in the usual pipeline.
    """
    if images.dim() != 4:
        raise ValueError(f"expected an NCHW batch, got shape {list(images.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be non-negative, got {padding}")
    n, c, h, w = images.shape
    gen_device = generator.device if generator is not None else torch.device("cpu")
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gen_device)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gen_device)
    flip = torch.randint(0, 2, (n,), generator=generator, device=gen_device).bool()
    oy, ox, flip = oy.to(images.device), ox.to(images.device), flip.to(images.device)

    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    ar_h = torch.arange(h, device=images.device)
    ar_w = torch.arange(w, device=images.device)
    rows = oy[:, None] + ar_h  # [N, H]
    cols = ox[:, None] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)  # [N, W]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    chan = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def normalize(
    images: torch.Tensor,
    mean: float | Sequence[float],
    std: float | Sequence[float],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(x - mean) / std`` per channel (dimension 1 of an NCHW batch).

    uint8 images are first scaled to [0, 1]. Scalar statistics apply to every channel and
    also suit single-channel [N, H, W] batches.
    """
    x = images.to(dtype)
    if images.dtype == torch.uint8:
        x = x / 255.0
    m = torch.as_tensor(mean, dtype=dtype, device=x.device)
    s = torch.as_tensor(std, dtype=dtype, device=x.device)
    if m.dim() or s.dim():
        if x.dim() != 4 or x.shape[1] != m.numel() or x.shape[1] != s.numel():
            raise ValueError(
                f"per-channel statistics ({m.numel()} means, {s.numel()} stds) need an NCHW "
                f"batch with that many channels, got shape {list(x.shape)}"
            )
        m, s = m.reshape(1, -1, 1, 1), s.reshape(1, -1, 1, 1)
    if bool((s <= 0).any()):
        raise ValueError("std must be positive")
    return (x - m) / s
