"""Fused AdaBound step for CUDA tensors whose moments are stored in bfloat16 or 8 bits, or
whose bfloat16 parameters are rounded stochastically (:mod:`dynabound.state_formats`).

The math is the CPU kernel's (``update_encoded_body`` in ``cpu_kernel.cpp``) operation by
operation: decode the stored moments into float32, run the float32 update, encode them again
with stochastic rounding. Three state formats, picked on the host:

* ``FORMAT_BFLOAT16``: moments in bfloat16, rounded stochastically;
* ``FORMAT_8BIT``: one byte per element plus a float32 scale per block of 256 elements;
* ``FORMAT_PARAM``: moments in the parameter's dtype, rounded to nearest (only a bfloat16
  parameter is rounded stochastically: ``state_dtype=None, stochastic_rounding=True``).

Launches per step: one update launch per parameter dtype (float32 and complex64 parameters
in one list are two), then one per dtype that advances the step counters, as in
:mod:`.triton_kernel`: every program reads its counter before any counter moves. A callable
``bounds`` instead advances the counters and evaluates its coefficient table with a few
torch operations on the device before the update, as there.

One program per block of 256 elements of one tensor, in memory order, 64 threads of 4
elements (16-byte accesses to float32 parameters): a program holds the whole block's new
moments, so it takes the block's largest magnitude for the 8-bit scale (an integer max of
the float bits, which propagates NaN as ``torch.amax`` does) and encodes the block without
a second pass over memory. A table lists every block's tensor and first element, so all
tensors of a dtype share one launch however small they are. Each program derives its
tensor's scalars itself (a few float64 operations), which 256 elements amortise less than
the 8192 of :mod:`.triton_kernel`'s programs.

With ``PROJECTION`` (a step of ``final_lr="auto"``) each program also writes its block's
float64 sums of ``d*d`` and ``d*g`` from the decoded and updated float32 values, before
they are encoded, as :mod:`.triton_kernel` does.

bfloat16 values are converted through their bits, rounding to nearest even as the CPU
kernel does: the GPU's conversion gives the same bits, and Triton's interpreter, which the
tests run this kernel in, truncates instead.

No host synchronisation: the step's scalars come from the counter read in the kernel
(``scalars_at_step`` of :mod:`.triton_common`), and so does the random key,
``step_key(seed, step, stream)`` in 32-bit unsigned arithmetic, whose wraparound is the
masking of :func:`dynabound.state_formats.step_key`. The seeds (one per parameter, fixed
for a set of tensors) live in the cached launch plan. ``found_inf`` is read in the kernel
too: when it is set every block is empty and the counters do not move.

Host side, as in :mod:`.triton_kernel`: a step compares the tensors' addresses with a cached
plan (tables of element offsets from one base tensor per storage type: parameters and
gradients, exp_avg, exp_avg_sq with max_exp_avg_sq, and block scales), rebuilt when an
address, size, dtype or seed changes.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch
from torch import Tensor

from .. import state_formats as formats
from ..spec import StepSpec, StepTensors
from . import compat
from .layout import as_real, dense_in_any_order
from .triton_common import (
    TABLE,
    advance_counters,
    block_lists,
    cached,
    check_addresses,
    coefficient_table,
    counter_offsets,
    grad_table_for,
    hyper_table_for,
    kernel_flags,
    projection_partials,
    schedule_of,
    split_by_dtype,
    step_inputs,
    tl,
    to_device,
    triton,
)

__all__ = ["encoded_step", "random_bits", "step_keys"]

BLOCK = formats.BLOCK
NUM_WARPS = 2
FORMAT_BFLOAT16, FORMAT_8BIT, FORMAT_PARAM = 0, 1, 2
_ENCODED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Columns of a plan's offset table: elements from each storage type's base tensor.
_COLUMNS = ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "m_scale", "v_scale", "vmax_scale")

if triton is not None:
    from .triton_common import (
        TL_DTYPES,
        adam_rate,
        bounded_step,
        decayed,
        moments,
        projection_terms,
        store_partials,
        tensor_scalars,
    )

    # The encoding's constants, from the specification module.
    _CUT = tl.constexpr(formats.CUT)
    _NOISE_SHIFT = tl.constexpr(formats.NOISE_SHIFT)
    _FIRST_OFFSET = tl.constexpr(formats.FIRST_MOMENT_OFFSET)
    _SECOND_OFFSET = tl.constexpr(formats.SECOND_MOMENT_OFFSET)
    _GOLDEN = tl.constexpr(formats.GOLDEN)
    _MIX1 = tl.constexpr(formats.MIX1)
    _MIX2 = tl.constexpr(formats.MIX2)
    _STREAM_STATE = tl.constexpr(formats.STREAM_STATE)
    _STREAM_PARAM = tl.constexpr(formats.STREAM_PARAM)
    _NOISE_MASK = tl.constexpr((1 << formats.NOISE_BITS) - 1)
    _N_COLUMNS = tl.constexpr(len(_COLUMNS))

    @triton.jit
    def _mix32(x):
        """lowbias32 of uint32 values; the multiplications wrap modulo 2**32."""
        x = x ^ (x >> 16)
        x = x * _MIX1
        x = x ^ (x >> 15)
        x = x * _MIX2
        return x ^ (x >> 16)

    @triton.jit
    def _step_key(seed, step, stream: tl.constexpr):
        """state_formats.step_key on uint32 ``seed`` and ``step``."""
        return _mix32(_mix32(seed * _GOLDEN + stream) + step)

    @triton.jit
    def _decode8(code, offset: tl.constexpr, scale):
        """Float32 values of int32 codes (state_formats.decode)."""
        magnitude = tl.abs(code)
        relative = ((magnitude + offset) << _CUT).to(tl.float32, bitcast=True)
        value = tl.where(magnitude > 0, relative, 0.0) * scale
        return tl.where(code < 0, -value, value)

    @triton.jit
    def _encode8(x, scale, noise, offset: tl.constexpr):
        """Magnitude codes (int32) of ``x`` in a block whose largest magnitude is ``scale``."""
        # IEEE division (a plain fp32 `/` is approximate on the GPU), as on the CPU.
        inverse = tl.where(scale > 0.0, tl.div_rn(1.0, scale), 0.0)
        # One ulp up where scale * inverse < 1: the largest magnitude encodes as exactly 1.0.
        raised = (inverse.to(tl.uint32, bitcast=True) + 1).to(tl.float32, bitcast=True)
        inverse = tl.where((scale > 0.0) & (scale * inverse < 1.0), raised, inverse)
        relative = tl.abs(x) * inverse
        relative = tl.where(relative > 1.0, 1.0, relative)
        # NaN (a NaN value, or an infinite one times the inverse 0 of an infinite scale)
        # encodes as 0, as on the CPU.
        relative = tl.where(relative != relative, 0.0, relative)
        bits = relative.to(tl.uint32, bitcast=True) + (noise << _NOISE_SHIFT)
        code = (bits >> _CUT).to(tl.int32) - offset
        return tl.where(code < 0, 0, code)

    @triton.jit
    def _bfloat16_stochastic(x, noise):
        """bfloat16 of float32 ``x``, rounded up with the probability of its dropped bits."""
        bits = (x.to(tl.uint32, bitcast=True) + noise) >> 16
        bits = tl.where(x != x, 0x7FC0, bits)
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _to_float32(x):
        """A stored value in float32; bfloat16 through its bits (exact, subnormals too)."""
        if x.dtype == tl.bfloat16:
            return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        return x.to(tl.float32)

    @triton.jit
    def _to_stored(x, DTYPE: tl.constexpr):
        """Float32 ``x`` rounded to nearest even in DTYPE. bfloat16 through its bits, as the
        CPU kernel and c10::BFloat16 do (NaN to the canonical quiet NaN), so every backend
        and Triton's interpreter store the same bits."""
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            bits = tl.where(x != x, 0x7FC0, bits)
            return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return x.to(DTYPE)

    @triton.jit
    def _block_scale(x, mask, MASKED: tl.constexpr):
        """Largest magnitude of a block, NaN when any value is NaN: the bits of a
        non-negative float order as integers, and a NaN's lie above infinity's."""
        bits = tl.abs(x).to(tl.int32, bitcast=True)
        if MASKED:
            bits = tl.where(mask, bits, 0)
        return tl.max(bits, axis=0).to(tl.float32, bitcast=True)

    @triton.jit
    def _encoded_block(
        p_base, m_base, v_base, s_base, p_off, g_off, m_off, v_off, vmax_off, ms_off, vs_off,
        vmaxs_off, start, local, mask, key_state, key_param, scale, scalars, unit,
        partials, program, DTYPE: tl.constexpr, FORMAT: tl.constexpr, MASKED: tl.constexpr,
        AMSBOUND: tl.constexpr, WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr,
        EPS_USED: tl.constexpr, HAS_BOX: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
        ROUND_PARAM: tl.constexpr, PROJECTION: tl.constexpr, P_VEC: tl.constexpr,
        M_VEC: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """One block of one tensor; ``mask`` is None (and MASKED False) for a full block.
        With PROJECTION the block's projection sums go to ``partials``, from the decoded
        and updated float32 moments, before they are encoded."""
        # Hints true when the host found every address 16-byte aligned (VEC > 1): Triton
        # may then use 16-byte accesses.
        p_idx = tl.max_contiguous(tl.multiple_of(p_off + local, P_VEC), BLOCK)
        g_idx = tl.max_contiguous(tl.multiple_of(g_off + local, P_VEC), BLOCK)
        m_idx = tl.max_contiguous(tl.multiple_of(m_off + local, M_VEC), BLOCK)
        v_idx = tl.max_contiguous(tl.multiple_of(v_off + local, M_VEC), BLOCK)
        block = start // BLOCK
        grad = _to_float32(tl.load(p_base + g_idx, mask=mask))
        if HAS_GRAD_SCALE:
            grad = tl.div_rn(grad, scale)
            tl.store(p_base + g_idx, _to_stored(grad, DTYPE), mask=mask)
        if MAXIMIZE:
            grad = -grad
        param = _to_float32(tl.load(p_base + p_idx, mask=mask))
        grad, param = decayed(grad, param, scalars, WEIGHT_DECAY)
        if FORMAT == 1:
            m_old = _decode8(
                tl.load(m_base + m_idx, mask=mask).to(tl.int32), _FIRST_OFFSET,
                tl.load(s_base + ms_off + block),
            )  # fmt: skip
            v_old = _decode8(
                tl.load(v_base + v_idx, mask=mask).to(tl.int32), _SECOND_OFFSET,
                tl.load(s_base + vs_off + block),
            )  # fmt: skip
        else:  # bfloat16 or the parameter's dtype: exact conversions to float32
            m_old = _to_float32(tl.load(m_base + m_idx, mask=mask))
            v_old = _to_float32(tl.load(v_base + v_idx, mask=mask))
        avg, avg_sq = moments(grad, m_old, v_old, scalars)
        second = avg_sq
        if AMSBOUND:
            vmax_idx = tl.max_contiguous(tl.multiple_of(vmax_off + local, M_VEC), BLOCK)
            if FORMAT == 1:
                running = _decode8(
                    tl.load(v_base + vmax_idx, mask=mask).to(tl.int32), _SECOND_OFFSET,
                    tl.load(s_base + vmaxs_off + block),
                )  # fmt: skip
            else:
                running = _to_float32(tl.load(v_base + vmax_idx, mask=mask))
            # A select rather than maximum, so that NaN propagates like torch.maximum.
            second = tl.where((running < avg_sq) | (avg_sq != avg_sq), avg_sq, running)
        rate = adam_rate(second, scalars, False, EPS_USED)
        if PROJECTION:
            squares, along = projection_terms(rate, avg, grad, unit, mask, MASKED)
            store_partials(partials, program, squares, along)
        param = bounded_step(param, avg, rate, scalars, HAS_BOX)

        if ROUND_PARAM:
            # Element numbers count from the tensor's first element, in uint32 as the
            # reference's masked int64 arithmetic.
            noise = _mix32(local.to(tl.uint32) + key_param) & _NOISE_MASK
            tl.store(p_base + p_idx, _bfloat16_stochastic(param, noise), mask=mask)
        else:
            tl.store(p_base + p_idx, _to_stored(param, DTYPE), mask=mask)

        if FORMAT == 2:
            tl.store(m_base + m_idx, _to_stored(avg, DTYPE), mask=mask)
            tl.store(v_base + v_idx, _to_stored(avg_sq, DTYPE), mask=mask)
            if AMSBOUND:
                tl.store(v_base + vmax_idx, _to_stored(second, DTYPE), mask=mask)
        else:
            # Low 16 bits for exp_avg, high 16 for exp_avg_sq and max_exp_avg_sq.
            bits = _mix32(local.to(tl.uint32) + key_state)
            low = bits & _NOISE_MASK
            high = bits >> 16
            if FORMAT == 0:
                tl.store(m_base + m_idx, _bfloat16_stochastic(avg, low), mask=mask)
                tl.store(v_base + v_idx, _bfloat16_stochastic(avg_sq, high), mask=mask)
                if AMSBOUND:
                    tl.store(v_base + vmax_idx, _bfloat16_stochastic(second, high), mask=mask)
            else:
                m_scale = _block_scale(avg, mask, MASKED)
                code = _encode8(avg, m_scale, low, _FIRST_OFFSET)
                code = tl.where(avg < 0.0, -code, code)
                tl.store(m_base + m_idx, code.to(tl.int8), mask=mask)
                tl.store(s_base + ms_off + block, m_scale)
                v_scale = _block_scale(avg_sq, mask, MASKED)
                code = _encode8(avg_sq, v_scale, high, _SECOND_OFFSET)
                tl.store(v_base + v_idx, code.to(tl.uint8), mask=mask)
                tl.store(s_base + vs_off + block, v_scale)
                if AMSBOUND:
                    vmax_scale = _block_scale(second, mask, MASKED)
                    code = _encode8(second, vmax_scale, high, _SECOND_OFFSET)
                    tl.store(v_base + vmax_idx, code.to(tl.uint8), mask=mask)
                    tl.store(s_base + vmaxs_off + block, vmax_scale)

    @triton.jit
    def _encoded_kernel(
        p_base, m_base, v_base, s_base, offsets, grad_offsets, numels, block_tensor,
        block_start, steps, step_offsets, seeds, coef, hyper, lr_hi, lr_lo, final_hi, final_mid,
        final_lo, lr_ptr, found_inf, grad_scale, n_tensors, partials,
        DTYPE: tl.constexpr, FORMAT: tl.constexpr, SCHEDULE: tl.constexpr,
        LR_TENSOR: tl.constexpr, AMSBOUND: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
        UNSCALED_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr, EPS_USED: tl.constexpr,
        HAS_BOX: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
        ROUND_PARAM: tl.constexpr, PROJECTION: tl.constexpr, P_VEC: tl.constexpr,
        M_VEC: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        program = tl.program_id(0)
        t = tl.load(block_tensor + program).to(tl.int64)
        start = tl.load(block_start + program)
        row = offsets + t * _N_COLUMNS
        counter = tl.load(steps + tl.load(step_offsets + t))
        if SCHEDULE == 2:  # a bound function: counters advanced and scalars tabled already
            step = counter
        else:
            # The counter before the separate advance launch: this step is one more.
            step = counter + 1
        n, scale, scalars, unit = tensor_scalars(
            t, step.to(tl.float64), tl.load(numels + t), coef, hyper, lr_hi, lr_lo, final_hi,
            final_mid, final_lo, lr_ptr, found_inf, grad_scale, n_tensors, tl.float32, SCHEDULE,
            LR_TENSOR, UNSCALED_DECAY, HAS_FOUND_INF, HAS_GRAD_SCALE, PROJECTION,
        )  # fmt: skip
        seed = tl.load(seeds + t).to(tl.uint32)
        key_state = 0
        key_param = 0
        if FORMAT != 2:
            key_state = _step_key(seed, step.to(tl.uint32), _STREAM_STATE)
        if ROUND_PARAM:
            key_param = _step_key(seed, step.to(tl.uint32), _STREAM_PARAM)
        local = start + tl.arange(0, BLOCK)
        p_off = tl.load(row)
        g_off = tl.load(grad_offsets + t)
        m_off = tl.load(row + 1)
        v_off = tl.load(row + 2)
        vmax_off = tl.load(row + 3)
        ms_off = tl.load(row + 4)
        vs_off = tl.load(row + 5)
        vmaxs_off = tl.load(row + 6)
        # Full blocks go unmasked: a mask against a size read from memory would keep
        # Triton from vectorising the accesses.
        if start + BLOCK <= n:
            _encoded_block(
                p_base, m_base, v_base, s_base, p_off, g_off, m_off, v_off, vmax_off, ms_off,
                vs_off, vmaxs_off, start, local, None, key_state, key_param, scale, scalars,
                unit, partials, program, DTYPE, FORMAT, False, AMSBOUND, WEIGHT_DECAY, MAXIMIZE,
                EPS_USED, HAS_BOX, HAS_GRAD_SCALE, ROUND_PARAM, PROJECTION, P_VEC, M_VEC,
                BLOCK,
            )  # fmt: skip
        elif start < n:
            _encoded_block(
                p_base, m_base, v_base, s_base, p_off, g_off, m_off, v_off, vmax_off, ms_off,
                vs_off, vmaxs_off, start, local, local < n, key_state, key_param, scale,
                scalars, unit, partials, program, DTYPE, FORMAT, True, AMSBOUND, WEIGHT_DECAY,
                MAXIMIZE, EPS_USED, HAS_BOX, HAS_GRAD_SCALE, ROUND_PARAM, PROJECTION, P_VEC,
                M_VEC, BLOCK,
            )  # fmt: skip
        elif PROJECTION:  # an empty tensor, or a step skipped for found_inf: sums of nothing
            store_partials(partials, program, tl.zeros([BLOCK], tl.float64),
                           tl.zeros([BLOCK], tl.float64))  # fmt: skip

    @triton.jit
    def _keys_kernel(seeds, steps, out, STREAM: tl.constexpr, BLOCK: tl.constexpr):
        """The update kernel's key for each (seed, float32 step counter) pair, converted as
        the update kernel converts them, for tests."""
        index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        seed = tl.load(seeds + index).to(tl.uint32)
        step = tl.load(steps + index).to(tl.uint32)
        tl.store(out + index, _step_key(seed, step, STREAM).to(tl.int64))

    @triton.jit
    def _bits_kernel(key_ptr, out, n, BLOCK: tl.constexpr):
        """The update kernel's 32 random bits per element for one key, for tests."""
        index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        key = tl.load(key_ptr).to(tl.uint32)
        bits = _mix32(index.to(tl.uint32) + key)
        tl.store(out + index, bits.to(tl.int64), mask=index < n)


class _Plan(NamedTuple):
    """Device tables for the tensors of one parameter dtype (everything but gradients).

    No references to the tensors: offsets count from the first tensor of each storage type,
    which the cache key guarantees is where it was."""

    offsets: Tensor  # int64 [n, len(_COLUMNS)]
    numels: Tensor  # int64 [n]
    block_tensor: Tensor  # int32 [blocks]: the tensor of each 256-element block
    block_start: Tensor  # int64 [blocks]: its first element
    n_blocks: int
    step_offsets: Tensor  # int64 [n]: float32 elements from the first step counter
    seeds: Tensor  # int64 [n]: each parameter's seed modulo 2**32
    param_aligned: bool  # every parameter address 16-byte aligned
    state_aligned: bool  # every moment address 16-byte aligned
    strides: list[tuple[int, ...]]  # the parameters' strides, which gradients must share


_plans: OrderedDict[tuple, _Plan] = OrderedDict()


def _storage(moment, state_format: int) -> tuple[Tensor | None, Tensor | None]:
    """(values or codes as a real tensor, block scales or None) of one moment."""
    if moment is None:
        return None, None
    if isinstance(moment, formats.Quantized):
        if state_format != FORMAT_8BIT:
            return moment.codes, None  # refused by the validation: codes of no such dtype
        return moment.codes, moment.scales
    # An 8-bit step's plain tensor has no scales, which the validation refuses.
    return as_real(moment), None


def _addresses(moment_lists) -> list[int]:
    """Where every moment is stored (codes and scales of an 8-bit one), for a plan's key;
    inline rather than through _storage, as it runs every step over every moment."""
    out: list[int] = []
    for moments in moment_lists:
        for t in moments:
            if type(t) is formats.Quantized:
                out += (t.codes.data_ptr(), t.scales.data_ptr())
            else:
                out.append(-1 if t is None else t.data_ptr())
    return out


def _plan(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, seeds, state_format):
    """The cached plan for these tensors; validated and built when their addresses are new."""
    key = (
        state_format,
        params[0].dtype,
        *[p.data_ptr() for p in params],
        *_addresses((exp_avgs, exp_avg_sqs, max_exp_avg_sqs)),
        *[s.data_ptr() for s in state_steps],
        *[p.numel() for p in params],
        *seeds,
    )
    return cached(
        _plans,
        key,
        lambda: _build_plan(
            params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, seeds, state_format
        ),
    )


def _moment_error(state_format: int) -> RuntimeError:
    name = {FORMAT_BFLOAT16: "bfloat16", FORMAT_8BIT: "8-bit", FORMAT_PARAM: "unencoded"}
    return RuntimeError(
        f"fused AdaBound expected {name[state_format]} moments in the parameter's shape, "
        "layout and device; build the optimizer with this state_dtype or load its state with "
        "load_state_dict"
    )


def _build_plan(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, seeds, state_format):
    device = params[0].device
    amsbound = bool(max_exp_avg_sqs)
    rows: list[list[int]] = []
    scale_rows: list[list[int]] = []
    numels: list[int] = []
    for i, p in enumerate(params):
        p = as_real(p)
        if p.dtype not in _ENCODED_DTYPES:
            raise RuntimeError(
                "dynabound's fused CUDA kernel keeps low-precision moments for float32, "
                f"bfloat16 and float16 parameters (complex64 too), got {p.dtype}"
            )
        if not dense_in_any_order(p):
            raise RuntimeError(
                "low-precision optimizer state needs parameters stored without gaps "
                "(contiguous, channels-last or another dense layout)"
            )
        moments = [exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i] if amsbound else None]
        addresses, scales = [p.data_ptr()], []
        for k, moment in enumerate(moments):
            values, block_scales = _storage(moment, state_format)
            if values is None:
                addresses.append(0)
                scales.append(0)
                continue
            if state_format == FORMAT_8BIT:
                expected = torch.int8 if k == 0 else torch.uint8
                if (
                    block_scales is None
                    or block_scales.dtype != torch.float32
                    or block_scales.device != device
                    or block_scales.numel() != formats.scale_count(p.numel())
                    or not block_scales.is_contiguous()
                ):
                    raise _moment_error(state_format)
                _check_storage(block_scales)
                scales.append(block_scales.data_ptr())
            else:
                expected = torch.bfloat16 if state_format == FORMAT_BFLOAT16 else p.dtype
                scales.append(0)
            if (
                values.dtype != expected
                or values.shape != p.shape
                or values.stride() != p.stride()
                or values.device != device
            ):
                raise _moment_error(state_format)
            _check_storage(values)
            addresses.append(values.data_ptr())
        if p.device != device:
            raise RuntimeError(f"fused AdaBound got parameters on {device} and on {p.device}")
        _check_storage(p)
        rows.append(addresses)
        scale_rows.append(scales)
        numels.append(p.numel())
    step_offsets = counter_offsets(state_steps, device)

    # Offsets in elements from the first tensor of each storage type (vmax shares
    # exp_avg_sq's type and base); a missing tensor's offset is never read.
    real = as_real(params[0])
    sizes = (real.element_size(), *_state_itemsizes(state_format, real.dtype))
    bases = (rows[0][0], rows[0][1], rows[0][2], rows[0][2])
    table = []
    for addresses, scales in zip(rows, scale_rows, strict=True):
        for a, base, size in zip(addresses, bases, sizes, strict=True):
            table.append((a - base) // size if a else 0)
        table += [(a - scale_rows[0][0]) // 4 if a else 0 for a in scales]
    return _Plan(
        offsets=to_device(table, torch.int64, device),
        **block_lists(numels, BLOCK, device),
        step_offsets=step_offsets,
        seeds=to_device([s & 0xFFFFFFFF for s in seeds], torch.int64, device),
        param_aligned=all(row[0] % 16 == 0 for row in rows),
        state_aligned=all(a % 16 == 0 for row in rows for a in row[1:]),
        strides=[as_real(p).stride() for p in params],
    )


def _state_itemsizes(state_format: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """Bytes per element of exp_avg, exp_avg_sq and max_exp_avg_sq."""
    if state_format == FORMAT_8BIT:
        return 1, 1, 1
    size = 2 if state_format == FORMAT_BFLOAT16 else dtype.itemsize
    return size, size, size


def _check_storage(t: Tensor) -> None:
    check_addresses(t, [t.data_ptr()])


def encoded_step(tensors: StepTensors, spec: StepSpec) -> None:
    """One AdaBound step with low-precision state over tensors on one device, in place,
    with no host sync (8-bit moments as :class:`~dynabound.state_formats.Quantized`
    pairs)."""
    if triton is None:
        raise RuntimeError("dynabound's fused CUDA kernel needs Triton")
    params, grads, _, _, _, state_steps, rounding_seeds = tensors[:7]
    if not params:
        return
    state_dtype = spec.state_dtype
    formats.check_state_dtype(state_dtype)
    if state_dtype == formats.EIGHT_BIT:
        state_format = FORMAT_8BIT
    elif state_dtype is torch.bfloat16:
        state_format = FORMAT_BFLOAT16
    else:
        state_format = FORMAT_PARAM
    device = params[0].device
    estimating = tensors.projection is not None
    inputs = step_inputs(device, spec, final_lr_argument=estimating)
    if rounding_seeds is None:
        tensors = tensors._replace(rounding_seeds=list(range(len(params))))

    # Validate everything before touching any state, so a refused step changes nothing.
    launches = []
    for group in split_by_dtype(tensors):
        g_params, g_grads, g_avgs, g_avg_sqs, g_max, g_steps, g_seeds = group[:7]
        g_max = g_max if spec.amsbound else []
        plan = _plan(g_params, g_avgs, g_avg_sqs, g_max, g_steps, g_seeds, state_format)
        grad_table = grad_table_for(plan.strides, g_params, g_grads)
        launches.append((plan, grad_table, group))

    schedule = schedule_of(spec.bounds)
    if schedule == TABLE:
        torch._foreach_add_(state_steps, 1)
    flags = kernel_flags(spec, schedule, inputs)
    partials = projection_partials(
        tensors.projection, [plan.n_blocks for plan, _, _ in launches], device
    )
    for i, (plan, grad_table, group) in enumerate(launches):
        g_params, _, g_avgs, g_avg_sqs, _, g_steps = group[:6]
        real = as_real(g_params[0]).dtype
        hyper_table = hyper_table_for(spec, torch.float32, device, final_lr_argument=estimating)
        coef = coefficient_table(g_steps, spec, torch.float32) if schedule == TABLE else None
        if plan.n_blocks == 0:
            continue
        m_base = _storage(g_avgs[0], state_format)
        v_base = _storage(g_avg_sqs[0], state_format)
        state_size = _state_itemsizes(state_format, real)[0]
        _encoded_kernel[(plan.n_blocks,)](
            as_real(g_params[0]),
            m_base[0],
            v_base[0],
            m_base[1] if m_base[1] is not None else g_steps[0],
            plan.offsets,
            grad_table.offsets,
            plan.numels,
            plan.block_tensor,
            plan.block_start,
            g_steps[0],
            plan.step_offsets,
            plan.seeds,
            coef if coef is not None else hyper_table,
            hyper_table,
            *inputs.kernel_args(g_steps[0]),
            len(g_steps),
            partials.of(i) if partials is not None else g_steps[0],
            DTYPE=TL_DTYPES[real],
            FORMAT=state_format,
            **flags,
            ROUND_PARAM=bool(spec.stochastic_rounding) and real is torch.bfloat16,
            PROJECTION=partials is not None,
            P_VEC=16 // real.itemsize if plan.param_aligned and grad_table.aligned else 1,
            M_VEC=16 // state_size if plan.state_aligned else 1,
            BLOCK=BLOCK,
            # 64 threads, 4 elements each: 16-byte accesses to float32 parameters.
            num_warps=NUM_WARPS,
            # No FMA contraction: the CPU kernel's operation order and rounding.
            enable_fp_fusion=False,
        )
    if partials is not None and tensors.projection is not None:
        partials.add_to(tensors.projection)
    counters = [(group[5], plan.step_offsets) for plan, _, group in launches]
    advance_counters(schedule, state_steps, inputs.found_inf, counters)
    compat.bump_versions(params)
    compat.bump_versions(state_steps)
    if inputs.grad_scale is not None:
        compat.bump_versions(grads)


def step_keys(seeds: Tensor, steps: Tensor, stream: int) -> Tensor:
    """The update kernel's random keys (int64 in [0, 2**32)) for int64 ``seeds`` and
    float32 ``steps`` (the counters' type) of equal length, a multiple of 128, computed by
    the kernel's own code: :func:`dynabound.state_formats.step_key` on the device."""
    out = torch.empty_like(seeds, dtype=torch.int64)
    _keys_kernel[(seeds.numel() // 128,)](seeds, steps, out, STREAM=stream, BLOCK=128)
    return out


def random_bits(key: int, numel: int, device: torch.device | str) -> Tensor:
    """The update kernel's 32 random bits per element for one key (int64 values), computed
    by the kernel's own code: :func:`dynabound.state_formats.random_bits` on the device."""
    out = torch.empty(numel, dtype=torch.int64, device=device)
    key_tensor = torch.tensor([key], dtype=torch.int64, device=device)
    _bits_kernel[(triton.cdiv(numel, 1024),)](key_tensor, out, numel, BLOCK=1024)
    return out
