"""Low-precision optimizer state of DTensor parameters (FSDP2, tensor parallel).

Each rank encodes its own shard: a moment in bfloat16 is a DTensor placed like its
parameter, and an 8-bit moment is a DTensor of codes placed like its parameter plus a plain
tensor of this rank's block scales. **The blocks are those of the local shard**, in its
memory order: the step stays element-wise and free of communication (a block that
straddled two ranks would need its maximum agreed on every step), and a rank's state is
complete on its own. A shard adds at most one partial block per moment.

The random bits of a shard are seeded by the parameter's seed and the shard's offset in the
global tensor, so ranks draw independent bits, and replicas of one shard (the replicate
dimension of HSDP) draw the same ones and stay equal. The shard at offset 0 keeps the
parameter's own seed and so the bits of an unsharded run.

Block scales belong to one layout of the shards; a checkpoint must not. So
``state_dict`` presents an 8-bit moment of a DTensor parameter as a float32 DTensor of its
decoded values, which ``torch.distributed.checkpoint`` can reshard onto any world size, and
loading encodes it again, rounding to nearest, into the receiving optimizer's blocks and
format. On an unchanged layout this round trip gives back the same codes and scales (the
encoding stores every block's largest magnitude as exactly its scale).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor

from . import state_formats as formats
from .kernels import compat

__all__ = [
    "convert",
    "is_sharded",
    "new_moment",
    "portable_state",
    "seed_at_offset",
    "shard_seed",
]


def is_sharded(t: Any) -> bool:
    dtensor = compat.dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def _global_offset(p: Tensor) -> int:
    """Where ``p``'s local shard starts in the global tensor, as a row-major element index."""
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # torch 2.4
        from torch.distributed._tensor._utils import (  # type: ignore[no-redef,import-not-found]
            compute_local_shape_and_global_offset,
        )

    dtensor: Any = p
    _, offsets = compute_local_shape_and_global_offset(
        p.shape, dtensor.device_mesh, dtensor.placements
    )
    flat, stride = 0, 1
    for size, offset in zip(reversed(p.shape), reversed(offsets), strict=True):
        flat += offset * stride
        stride *= size
    return flat


def shard_seed(seed: int, p: Tensor) -> int:
    """The seed of ``p``'s random bits on this rank: ``seed`` for a plain tensor and for the
    shard at offset 0, else a hash of ``seed`` and the shard's offset (a 32-bit value, as
    every backend reads a seed modulo 2^32)."""
    return seed_at_offset(seed, _global_offset(p)) if is_sharded(p) else seed


def seed_at_offset(seed: int, offset: int) -> int:
    """The seed of a shard that starts at element ``offset`` (row-major) of its tensor."""
    if offset == 0:
        return seed
    where = formats.mix32(offset) ^ formats.mix32((offset >> 32) + formats.GOLDEN)
    return formats.mix32(seed ^ where)


def _wrap(local: Tensor, p: Tensor) -> Tensor:
    """A local moment as a DTensor placed like ``p`` (like its real view: an encoded moment
    of a complex parameter holds real and imaginary parts apart)."""
    if p.is_complex() and not local.is_complex():
        p = torch.view_as_real(p)
    dtensor: Any = p
    return type(dtensor).from_local(
        local, dtensor.device_mesh, dtensor.placements, run_check=False, shape=p.shape,
        stride=p.stride(),
    )  # fmt: skip


def _rewrap(local_state: dict, p: Tensor) -> dict:
    """Moments (codes included) of a local shard as DTensors placed like ``p``; the block
    scales stay this rank's plain tensors."""
    return {
        key: _wrap(value, p) if key in formats.MOMENTS else value
        for key, value in local_state.items()
    }


def _local_state(state: dict) -> dict:
    return {key: cast(Any, v).to_local() if is_sharded(v) else v for key, v in state.items()}


def new_moment(p: Tensor, moment: str, state_dtype) -> dict[str, Tensor]:
    """``state_formats.new_moment`` for a plain or a DTensor parameter."""
    if not is_sharded(p) or state_dtype is None:
        return formats.new_moment(p, moment, state_dtype)  # zeros_like keeps the placements
    return _rewrap(formats.new_moment(cast(Any, p).to_local(), moment, state_dtype), p)


def convert(state: dict, p: Tensor, state_dtype) -> None:
    """``state_formats.convert`` for a plain or a DTensor parameter: a shard's
    moments are re-stored in its own blocks."""
    if not is_sharded(p):
        formats.convert(state, p, state_dtype)
        return
    local = _local_state(state)
    formats.convert(local, cast(Any, p).to_local(), state_dtype)
    state.clear()
    state.update(_rewrap(local, p))


def portable_state(state: dict, p: Tensor) -> dict:
    """The state of one parameter as ``state_dict`` presents it: a DTensor parameter's
    8-bit moments decoded into float32 DTensors (no block scales), everything else as it
    is. A new dict: the optimizer's own state is not touched."""
    if not is_sharded(p) or formats.scale_key("exp_avg") not in state:
        return state
    presented = {k: v for k, v in state.items() if k not in map(formats.scale_key, formats.MOMENTS)}
    for moment in formats.MOMENTS:
        if moment in state:
            scale = formats.scale_key(moment)
            local = {moment: state[moment].to_local(), scale: state[scale]}
            presented[moment] = _wrap(formats.moment_float32(local, moment), p)
    return presented
