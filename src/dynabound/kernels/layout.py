"""What every fused kernel asks of its tensors: devices, dtypes, memory layouts.

The bottom of :mod:`dynabound.kernels`: it imports nothing of dynabound, and every other
module of the package may import it.

Two density checks, which accept different layouts:

* :func:`dense_in_standard_order`: row-major, channels-last or channels-last-3d. The
  float kernels walk a parameter and its gradient and state as one flat array each, in
  these layouts (the layouts :func:`dynabound.kernels.can_fuse` accepts for the default
  step).
* :func:`dense_in_any_order`: no gaps, in any order of the dimensions (a transposed matrix
  too). Low-precision state needs this much: its blocks and random bits follow memory order
  (:func:`dynabound.state_formats.memory_flat`).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor

from ..spec import StepTensors
from . import compat

__all__ = [
    "DEVICE_TYPES",
    "as_real",
    "dense_in_any_order",
    "dense_in_standard_order",
    "local_shards",
]

DEVICE_TYPES = ("cpu", "cuda")  # the device types a fused kernel exists for


def dense_in_standard_order(t: Tensor) -> bool:
    """Whether ``t`` covers its memory densely in row-major or channels-last order, so an
    element-wise kernel may walk it as a flat array."""
    if t.is_contiguous():
        return True
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def dense_in_any_order(t: Tensor) -> bool:
    """Whether ``t``'s elements fill a gap-free stretch of memory, in some dimension order."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda s: s[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def as_real(t: Tensor) -> Tensor:
    """A complex tensor's real view (real and imaginary parts are separate coordinates)."""
    return torch.view_as_real(t) if t.is_complex() else t


def local_shards(tensors: StepTensors) -> StepTensors:
    """The step's tensors (a :class:`dynabound.spec.StepTensors`) with DTensors (FSDP2,
    tensor parallel), which own no storage, replaced by their local shards: the update is
    element-wise, so it runs on each rank's shard, as torch's fused Adam does."""
    dtensor = compat.dtensor_type()
    if dtensor is None or not any(isinstance(p, dtensor) for p in tensors[0]):
        return tensors

    def local(t):
        if isinstance(t, dtensor):
            return t.to_local()
        if isinstance(t, tuple):  # an 8-bit moment: DTensor codes, this rank's block scales
            return cast(Any, t)._make(map(local, t))
        return t

    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs = (
        [local(t) for t in ts] for ts in tensors[:5]
    )
    return tensors._replace(
        params=params,
        grads=grads,
        exp_avgs=exp_avgs,
        exp_avg_sqs=exp_avg_sqs,
        max_exp_avg_sqs=max_exp_avg_sqs,
    )
