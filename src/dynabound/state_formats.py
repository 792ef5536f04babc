"""Low-precision optimizer state: bfloat16 moments and block-wise 8-bit moments.

An AdaBound step with float32 moments is memory-bound. Storing the moments in fewer bits
makes the state smaller, and the step faster where decoding and encoding cost less than the
bytes they save: on a 2-core CPU, bf16 moments take 0.72x the time of torch's fused Adam
and 8-bit moments 0.75x (docs/figures/state-dtype-results.md).

Every backend decodes the stored moments into float32, runs the float32 update, and
encodes them again; this module is the eager reference of the encodings.

``state_dtype`` names the format:

* ``None``: the parameter's dtype (no encoding).
* ``torch.bfloat16``: exp_avg, exp_avg_sq and max_exp_avg_sq in bfloat16, 2 bytes each.
* ``"8bit"``: each moment as one byte per element plus one float32 scale per block of
  :data:`BLOCK` elements (1.016 bytes per element). A byte is a small float relative to its
  block's largest magnitude, the scale: 3 mantissa bits and an exponent spanning 2^-15 of
  the scale for the first moment (plus a sign bit) and 2^-31 for the second moment, which
  is non-negative and spans many orders of magnitude. Values below the range are zero;
  a second moment of zero gives the upper rate bound, where AdaBound clips it anyway.

**Stochastic rounding, always.** With beta2 = 0.999 the second moment decays by 0.1% a
step, less than half a unit in the last place of bfloat16 (0.2-0.4%) and far less than an
8-bit step (6-12%): rounding to nearest would never let it decay. Every encoded value is
rounded up with probability equal to its distance from the value below, so the stored
moments are unbiased. The random bits are a hash of (seed, step, element), not a random
generator: a run is reproducible, a resumed run is bit-identical, and the CPU and CUDA
kernels draw the same bits. Each parameter has its own ``seed``, kept in its state.

Blocks and element numbers follow the parameter's memory order, the order in which the
fused kernels walk it, so a parameter must cover its memory densely (any layout without
gaps, such as contiguous or channels-last: :func:`dynabound.kernels.layout.dense_in_any_order`).
A DTensor parameter's blocks are those of each rank's shard (:mod:`dynabound.sharded_state`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "BLOCK",
    "EIGHT_BIT",
    "Quantized",
    "check_state_dtype",
    "decode",
    "encode",
    "memory_flat",
    "random_bits",
    "round_bfloat16",
    "step_key",
]

EIGHT_BIT = "8bit"
BLOCK = 256  # elements per scale: 1/64 byte of scale per element

# Binades below the block scale that a code can express; 3 mantissa bits each, code 0 is 0.
FIRST_MOMENT_BINADES = 15  # sign + 7 bits: codes 1..121
SECOND_MOMENT_BINADES = 31  # 8 bits: codes 1..249
MANTISSA_BITS = 3
# Where a float32's bits are cut for a code: its sign-less top 12 bits, (exponent, mantissa).
CUT = 23 - MANTISSA_BITS
# Random state: 16 bits per value, placed just below the cut.
NOISE_BITS = 16
NOISE_SHIFT = CUT - NOISE_BITS

STREAM_STATE = 0  # random bits of the moments: low 16 bits exp_avg, high 16 bits exp_avg_sq
STREAM_PARAM = 1  # random bits of a bfloat16 parameter's rounding

_MASK32 = 0xFFFFFFFF
MIX1, MIX2 = 0x7FEB352D, 0x846CA68B  # lowbias32's multipliers (C. Wellons' hash prospector)
GOLDEN = 0x9E3779B9  # spreads a seed over 32 bits in step_key


class Quantized(NamedTuple):
    """One moment of one parameter in 8 bits: codes in the parameter's shape and layout
    (int8 for the signed first moment, uint8 for the second) and one float32 scale per
    block of :data:`BLOCK` elements in memory order."""

    codes: Tensor
    scales: Tensor


# A stored moment as a step receives it: a tensor (float32, bfloat16, ...) or 8-bit codes.
Moment = Tensor | Quantized


def needs_encoding(state_dtype, stochastic_rounding: bool, params: list[Tensor]) -> bool:
    """Whether a step over ``params`` encodes what it stores: moments in a low-precision
    format, or bfloat16 parameters rounded stochastically. Every backend asks this to pick
    its encoded kernel (or the reference's encoded path)."""
    return state_dtype is not None or (
        stochastic_rounding and any(p.dtype is torch.bfloat16 for p in params)
    )


def check_state_dtype(state_dtype) -> None:
    """Raise ValueError unless ``state_dtype`` names a supported format."""
    if state_dtype is None or state_dtype is torch.bfloat16 or state_dtype == EIGHT_BIT:
        return
    raise ValueError(
        f"Invalid state_dtype: {state_dtype!r} (use None for the parameter's dtype, "
        f"torch.bfloat16, or {EIGHT_BIT!r} for block-wise 8-bit moments)"
    )


# --- the random bits ------------------------------------------------------------------


def mix32(x: int) -> int:
    """lowbias32 of a Python integer: the hash every backend applies to 32-bit words."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * MIX1) & _MASK32
    x ^= x >> 15
    x = (x * MIX2) & _MASK32
    return x ^ (x >> 16)


def step_key(seed: int, step: int, stream: int) -> int:
    """The 32-bit key of one tensor's random bits at one step (computed on the host)."""
    return mix32(mix32(seed * GOLDEN + stream) + step)


def _mul32(x: Tensor, constant: int) -> Tensor:
    # x * constant mod 2^32 on int64 without overflowing it: in two 16-bit halves.
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def random_bits(key: int, numel: int, device: torch.device | str = "cpu") -> Tensor:
    """32 random bits per element (int64 values in [0, 2^32)): lowbias32(index + key)."""
    x = (torch.arange(numel, dtype=torch.int64, device=device) + key) & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, MIX1)
    x = x ^ (x >> 15)
    x = _mul32(x, MIX2)
    return x ^ (x >> 16)


# --- bfloat16 -------------------------------------------------------------------------


def round_bfloat16(x: Tensor, noise: Tensor) -> Tensor:
    """float32 ``x`` to bfloat16, rounding the magnitude up with probability equal to the
    dropped fraction; ``noise`` holds 16 random bits per element. NaN stays NaN."""
    bits = x.view(torch.int32).to(torch.int64) & _MASK32
    bits = ((bits + noise) >> 16) & 0xFFFF
    bits = torch.where(torch.isnan(x), 0x7FC0, bits)
    # int16 holds the same 16 bits (a view reinterprets, it does not convert).
    return torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16).view(torch.bfloat16)


# --- 8 bits ---------------------------------------------------------------------------


def code_offset(binades: int) -> int:
    """Code c > 0 stands for the float32 whose top bits (exponent, 3 mantissa bits) are
    c + offset: code 1 is 2^-binades, and 1.0 is code 8 * binades + 1."""
    return ((127 - binades) << MANTISSA_BITS) - 1


FIRST_MOMENT_OFFSET = code_offset(FIRST_MOMENT_BINADES)
SECOND_MOMENT_OFFSET = code_offset(SECOND_MOMENT_BINADES)


def encode(x: Tensor, signed: bool, noise: Tensor) -> Quantized:
    """Block-wise 8-bit codes of a 1-dim float32 tensor in memory order.

    ``noise`` holds 16 random bits per element. The block's largest magnitude is its scale
    and is stored exactly, so a block's maximum survives every round trip.
    """
    binades = FIRST_MOMENT_BINADES if signed else SECOND_MOMENT_BINADES
    n = x.numel()
    blocks = -(-n // BLOCK)
    magnitude = torch.nn.functional.pad(x.abs(), (0, blocks * BLOCK - n)).view(blocks, BLOCK)
    scales = magnitude.amax(dim=1)
    inverse = torch.where(scales > 0, 1 / scales, torch.zeros_like(scales))
    # One ulp up where scale * (1 / scale) rounds below 1, so that the block's largest
    # magnitude encodes as exactly 1.0: decoding and re-encoding to nearest is then lossless.
    raised = torch.nextafter(inverse, torch.full_like(inverse, math.inf))
    inverse = torch.where((scales > 0) & (scales * inverse < 1), raised, inverse)
    relative = (magnitude * inverse[:, None]).clamp_(max=1.0).view(-1)[:n]
    relative = torch.nan_to_num(relative, nan=0.0)  # code 0; the block's NaN scale decodes NaN
    bits = relative.view(torch.int32).to(torch.int64)
    top = (bits + (noise << NOISE_SHIFT)) >> CUT
    codes = (top - code_offset(binades)).clamp_(min=0)
    if signed:
        codes = torch.where(x < 0, -codes, codes).to(torch.int8)
    else:
        codes = codes.to(torch.uint8)
    return Quantized(codes, scales)


def decode(codes: Tensor, scales: Tensor, signed: bool) -> Tensor:
    """float32 values of 1-dim codes in memory order (the inverse of :func:`encode` up to
    its rounding)."""
    binades = FIRST_MOMENT_BINADES if signed else SECOND_MOMENT_BINADES
    c = codes.to(torch.int32)
    magnitude_code = c.abs()
    bits = (magnitude_code + code_offset(binades)) << CUT
    relative = torch.where(magnitude_code > 0, bits, 0).view(torch.float32)
    scale = scales.repeat_interleave(BLOCK)[: codes.numel()]
    value = relative * scale
    return torch.where(c < 0, -value, value) if signed else value


def scale_count(numel: int) -> int:
    return math.ceil(numel / BLOCK)


# --- layout ---------------------------------------------------------------------------


def memory_flat(t: Tensor) -> Tensor:
    """A 1-dim view of a densely stored tensor in memory order (a real view of complex)."""
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.is_contiguous():
        return t.view(-1)
    return t.as_strided((t.numel(),), (1,))


# --- an optimizer's per-parameter state -----------------------------------------------

MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_NEAREST = 1 << (NOISE_BITS - 1)  # "noise" that rounds to nearest: conversions, not steps


def scale_key(moment: str) -> str:
    return moment + "_scale"


def storage(state_dtype, param: Tensor):
    """How ``state_dtype`` stores the moments of ``param``: bfloat16 moments of a bfloat16
    parameter are stored as with None."""
    if state_dtype is torch.bfloat16 and param.dtype is torch.bfloat16:
        return None
    return state_dtype


def moment_dtype(state_dtype) -> torch.dtype | None:
    """The dtype of ``exp_avg`` stored as ``state_dtype`` says, or None for the parameter's
    own dtype (bfloat16 moments of a bfloat16 parameter are that too)."""
    if state_dtype == EIGHT_BIT:
        return torch.int8
    return state_dtype


def stored_format(state: dict, param: Tensor):
    """How the moments in ``state`` are stored (None: in the parameter's dtype)."""
    if scale_key("exp_avg") in state:
        return EIGHT_BIT
    if state["exp_avg"].dtype is torch.bfloat16 and param.dtype is not torch.bfloat16:
        return torch.bfloat16
    return None


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def new_moment(param: Tensor, moment: str, state_dtype) -> dict[str, Tensor]:
    """State entries of one zero moment of ``param`` in ``state_dtype``."""
    if state_dtype is None:
        return {moment: torch.zeros_like(param, memory_format=torch.preserve_format)}
    real = _real(param)
    if state_dtype is torch.bfloat16:
        return {moment: torch.zeros_like(real, dtype=torch.bfloat16)}
    codes = torch.zeros_like(real, dtype=torch.int8 if moment == "exp_avg" else torch.uint8)
    scales = torch.zeros(scale_count(real.numel()), dtype=torch.float32, device=param.device)
    return {moment: codes, scale_key(moment): scales}


def moment_float32(state: Mapping[str, Any], moment: str) -> Tensor:
    """One moment as a new float32 tensor in the shape and layout of its parameter's real
    view."""
    stored = state[moment]
    if scale_key(moment) not in state:
        return _real(stored).to(torch.float32, copy=True)
    out = torch.empty_like(stored, dtype=torch.float32)
    values = decode(memory_flat(stored), state[scale_key(moment)], moment == "exp_avg")
    memory_flat(out).copy_(values)
    return out


def convert(state: dict, param: Tensor, state_dtype) -> None:
    """Re-store the moments in ``state`` in ``state_dtype``, rounding to nearest."""
    for moment in MOMENTS:
        if moment not in state:
            continue
        value = moment_float32(state, moment)
        state.pop(scale_key(moment), None)
        entries = new_moment(param, moment, state_dtype)
        stored = entries[moment]
        if state_dtype is None:
            target = _real(stored) if stored.is_complex() else stored
            target.copy_(value)
        elif state_dtype is torch.bfloat16:
            stored.copy_(value)  # round to nearest even
        else:
            noise = torch.full((value.numel(),), _NEAREST, dtype=torch.int64, device=value.device)
            codes, scales = encode(memory_flat(value), moment == "exp_avg", noise)
            memory_flat(stored).copy_(codes)
            entries[scale_key(moment)] = scales
        state.update(entries)
