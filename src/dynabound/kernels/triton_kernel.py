"""Fused AdaBound step for CUDA tensors: two Triton launches per dtype per step.

Host side: an eager step must cost what torch's fused Adam costs, so per step it only reads
the tensors' addresses and compares them with a cached launch plan. A plan (element offsets
of every tensor from one base address, sizes, the list of blocks, step-counter offsets) is
validated and uploaded once, and rebuilt only when an address, size, dtype, layout or the
set of tensors changes; gradients re-allocated by ``zero_grad(set_to_none=True)`` replace
only the small gradient-offset table, cached by address too. Nothing else touches the
device: the per-step scalars are computed inside the kernel.

Device side: each program reads its tensor's step counter and derives that step's scalars in
float64 (``triton_common.scalars_at_step``: the built-in ``"reference"`` and ``"paper"``
schedules of :func:`dynabound.bounds.step_coefficients`, which tests pin this copy to). A
second launch then advances the counters, so no block reads a counter another block already
advanced. A bound function passed as ``bounds=`` is evaluated on the device on the vector of
per-parameter steps (a 1-D float64 tensor: it must use tensor arithmetic, as in capturable
mode) and handed to the kernel as a table; that path costs a few more launches.

``grad_scale``/``found_inf`` follow torch's fused Adam: gradients are divided by the scale
(and left unscaled), and when ``found_inf`` is nonzero nothing changes, the step counters
included, all without reading ``found_inf`` on the host.

A step of ``final_lr="auto"`` asks for the projection sums (``StepTensors.projection``): a
separately compiled variant of the same kernel (``PROJECTION``) also accumulates each
element's ``d*d`` and ``d*g`` per lane in float64 and writes one pair of sums per program to
a scratch buffer, which torch then sums into the projection in a fixed order (no atomics, so
the result repeats exactly). Same launches, no second pass over memory; ordinary steps run
the variant without it, unchanged.

Moments stored in a low-precision format take :mod:`.triton_encoded` instead; both import
their shared code from :mod:`.triton_common`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch
from torch import Tensor

from ..spec import StepSpec, StepTensors
from . import compat
from .layout import as_real, dense_in_standard_order
from .triton_common import (
    IMPORT_ERROR,
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

__all__ = ["float_step"]

BLOCK = 1024
CHUNK = 8 * BLOCK

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

    @triton.jit
    def _update(
        base, p_off, g_off, m_off, v_off, vmax_off, local, mask, scale, scalars, unit,
        DTYPE: tl.constexpr, COMPUTE: tl.constexpr, IS_FP64: tl.constexpr,
        AMSBOUND: tl.constexpr, WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr,
        EPS_USED: tl.constexpr, HAS_BOX: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
        PROJECTION: tl.constexpr, MASKED: tl.constexpr, VEC: tl.constexpr,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        """The element-wise update of one block; ``mask`` is None (MASKED False) for a full
        block. Returns the block's projection terms (``projection_terms``) with PROJECTION,
        else zeros that the caller ignores."""
        # Offsets are in elements from `base`; the hints (true when VEC > 1: all addresses
        # 16-byte aligned, checked on the host) let Triton emit 16-byte vector accesses.
        p_idx = tl.max_contiguous(tl.multiple_of(p_off + local, VEC), BLOCK)
        g_idx = tl.max_contiguous(tl.multiple_of(g_off + local, VEC), BLOCK)
        m_idx = tl.max_contiguous(tl.multiple_of(m_off + local, VEC), BLOCK)
        v_idx = tl.max_contiguous(tl.multiple_of(v_off + local, VEC), BLOCK)
        grad = tl.load(base + g_idx, mask=mask).to(COMPUTE)
        if HAS_GRAD_SCALE:
            grad = grad / scale
            tl.store(base + g_idx, grad.to(DTYPE), mask=mask)
        if MAXIMIZE:
            grad = -grad
        param = tl.load(base + p_idx, mask=mask).to(COMPUTE)
        grad, param = decayed(grad, param, scalars, WEIGHT_DECAY)
        avg, avg_sq = moments(
            grad, tl.load(base + m_idx, mask=mask).to(COMPUTE),
            tl.load(base + v_idx, mask=mask).to(COMPUTE), scalars,
        )  # fmt: skip
        second = avg_sq
        if AMSBOUND:
            vmax_idx = tl.max_contiguous(tl.multiple_of(vmax_off + local, VEC), BLOCK)
            running = tl.load(base + vmax_idx, mask=mask).to(COMPUTE)
            running = tl.where((running < avg_sq) | (avg_sq != avg_sq), avg_sq, running)
            tl.store(base + vmax_idx, running.to(DTYPE), mask=mask)
            second = running
        rate = adam_rate(second, scalars, IS_FP64, EPS_USED)
        squares = 0.0
        along = 0.0
        if PROJECTION:
            squares, along = projection_terms(rate, avg, grad, unit, mask, MASKED)
        param = bounded_step(param, avg, rate, scalars, HAS_BOX)
        tl.store(base + p_idx, param.to(DTYPE), mask=mask)
        tl.store(base + m_idx, avg.to(DTYPE), mask=mask)
        tl.store(base + v_idx, avg_sq.to(DTYPE), mask=mask)
        return squares, along

    @triton.jit
    def _adabound_kernel(
        base, offsets, grad_offsets, numels, block_tensor, block_start, steps, step_offsets,
        coef, hyper, lr_hi, lr_lo, final_hi, final_mid, final_lo, lr_ptr, found_inf,
        grad_scale, n_tensors, partials, DTYPE: tl.constexpr, COMPUTE: tl.constexpr,
        IS_FP64: tl.constexpr, SCHEDULE: tl.constexpr, LR_TENSOR: tl.constexpr,
        AMSBOUND: tl.constexpr, WEIGHT_DECAY: tl.constexpr, UNSCALED_DECAY: tl.constexpr,
        MAXIMIZE: tl.constexpr, EPS_USED: tl.constexpr, HAS_BOX: tl.constexpr,
        HAS_FOUND_INF: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, PROJECTION: tl.constexpr,
        VEC: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
    ):  # fmt: skip
        """One program: CHUNK elements of one tensor, in blocks of BLOCK. With PROJECTION
        it also writes its sums of the projection's terms to ``partials``
        (``store_partials``), accumulated per lane over its blocks in float64."""
        block = tl.program_id(0)
        t = tl.load(block_tensor + block).to(tl.int64)
        start = tl.load(block_start + block)
        row = offsets + t * 4
        p_off = tl.load(row)
        m_off = tl.load(row + 1)
        v_off = tl.load(row + 2)
        vmax_off = tl.load(row + 3)
        g_off = tl.load(grad_offsets + t)
        if SCHEDULE == 2:
            step = 0.0  # the coefficient table holds this step's scalars
        else:
            # This step's counter before the separate advance launch: the update uses it + 1.
            step = tl.load(steps + tl.load(step_offsets + t)).to(tl.float64) + 1
        n, scale, scalars, unit = tensor_scalars(
            t, step, tl.load(numels + t), coef, hyper, lr_hi, lr_lo, final_hi, final_mid,
            final_lo, lr_ptr, found_inf, grad_scale, n_tensors, COMPUTE, SCHEDULE, LR_TENSOR,
            UNSCALED_DECAY, HAS_FOUND_INF, HAS_GRAD_SCALE, PROJECTION,
        )  # fmt: skip
        if PROJECTION:
            squares = tl.zeros([BLOCK], dtype=tl.float64)
            along = tl.zeros([BLOCK], dtype=tl.float64)
        for offset in tl.static_range(0, CHUNK, BLOCK):
            first = start + offset
            local = first + tl.arange(0, BLOCK)
            # Full blocks go unmasked: a mask against a size read from memory would keep
            # Triton from vectorising the accesses.
            if first + BLOCK <= n:
                block_squares, block_along = _update(
                    base, p_off, g_off, m_off, v_off, vmax_off, local, None, scale, scalars,
                    unit, DTYPE, COMPUTE, IS_FP64, AMSBOUND, WEIGHT_DECAY, MAXIMIZE, EPS_USED,
                    HAS_BOX, HAS_GRAD_SCALE, PROJECTION, False, VEC, BLOCK,
                )  # fmt: skip
                if PROJECTION:
                    squares += block_squares
                    along += block_along
            elif first < n:
                block_squares, block_along = _update(
                    base, p_off, g_off, m_off, v_off, vmax_off, local, local < n, scale,
                    scalars, unit, DTYPE, COMPUTE, IS_FP64, AMSBOUND, WEIGHT_DECAY, MAXIMIZE,
                    EPS_USED, HAS_BOX, HAS_GRAD_SCALE, PROJECTION, True, VEC, BLOCK,
                )  # fmt: skip
                if PROJECTION:
                    squares += block_squares
                    along += block_along
        if PROJECTION:
            store_partials(partials, block, squares, along)


class _Plan(NamedTuple):
    """Device tables for one set of tensors of one dtype (everything but the gradients).

    It holds no reference to the tensors it describes (a cached plan must not keep a
    discarded model alive); addresses count from the first parameter's and the first step
    counter's, which the key guarantees are where they were."""

    offsets: Tensor  # int64 [n, 4]: param, exp_avg, exp_avg_sq, max_exp_avg_sq
    numels: Tensor  # int64 [n]
    block_tensor: Tensor  # int32 [blocks]: which tensor a block updates
    block_start: Tensor  # int64 [blocks]: its first element
    n_blocks: int
    step_offsets: Tensor  # int64 [n]: float32 elements from the first step counter
    aligned: bool  # every address 16-byte aligned
    strides: list[tuple[int, ...]]  # the parameters' strides, which gradients must share


_plans: OrderedDict[tuple, _Plan] = OrderedDict()


def _plan(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps) -> _Plan:
    """The cached plan for these tensors; validated and built when their addresses are new."""
    key = (
        *[p.data_ptr() for p in params],
        *[m.data_ptr() for m in exp_avgs],
        *[v.data_ptr() for v in exp_avg_sqs],
        *[v.data_ptr() for v in max_exp_avg_sqs],
        *[s.data_ptr() for s in state_steps],
        *[p.numel() for p in params],
        params[0].dtype,
    )
    return cached(
        _plans,
        key,
        lambda: _build_plan(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps),
    )


def _build_plan(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps) -> _Plan:
    device = params[0].device
    rows: list[list[int]] = []
    numels: list[int] = []
    for i, p in enumerate(params):
        state = [exp_avgs[i], exp_avg_sqs[i]] + ([max_exp_avg_sqs[i]] if max_exp_avg_sqs else [])
        p, *state = (as_real(t) for t in (p, *state))
        for t in state:
            if t.dtype != p.dtype or t.device != p.device:
                raise RuntimeError(
                    "fused AdaBound needs state of the parameter's dtype and device, got a "
                    f"{p.dtype} parameter on {p.device} with {t.dtype} state on {t.device}"
                )
        if not dense_in_standard_order(p) or any(t.stride() != p.stride() for t in state):
            raise RuntimeError(
                "fused AdaBound on CUDA needs each parameter, its gradient and its state in "
                "one dense memory layout; use fused=False for this parameter group"
            )
        addresses = [t.data_ptr() for t in (p, *state)]
        check_addresses(p, addresses)
        rows.append(addresses if len(addresses) == 4 else addresses + [0])
        numels.append(p.numel())
    step_offsets = counter_offsets(state_steps, device)
    itemsize = as_real(params[0]).element_size()
    offsets = [(a - rows[0][0]) // itemsize if a else 0 for row in rows for a in row]
    return _Plan(
        offsets=to_device(offsets, torch.int64, device),
        **block_lists(numels, CHUNK, device),
        step_offsets=step_offsets,
        aligned=all(a % 16 == 0 for row in rows for a in row),
        strides=[as_real(p).stride() for p in params],
    )


def float_step(tensors: StepTensors, spec: StepSpec) -> None:
    """One AdaBound step over tensors on one device whose moments are stored in the
    parameter's dtype, in place, with no host sync.

    ``lr`` may be a float or a Tensor (one on the device is read there, so it may change
    between CUDA-graph replays). Steps must be float32 tensors on the parameters' device.
    """
    if triton is None:
        raise RuntimeError(f"dynabound's fused CUDA kernel needs Triton: {IMPORT_ERROR}")
    if not tensors.params:
        return
    device = tensors.params[0].device
    estimating = tensors.projection is not None
    inputs = step_inputs(device, spec, final_lr_argument=estimating)

    # Validate everything before touching any state, so a refused step changes nothing.
    launches = []
    for group in split_by_dtype(tensors):
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = group[:6]
        real = params[0].dtype.to_real()
        if real not in TL_DTYPES:
            raise RuntimeError(f"dynabound's fused CUDA kernel does not support {real}")
        vmax = max_exp_avg_sqs if spec.amsbound else []
        plan = _plan(params, exp_avgs, exp_avg_sqs, vmax, steps)
        grad_table = grad_table_for(plan.strides, params, grads)
        launches.append((real, plan, grad_table, as_real(params[0]), steps))

    schedule = schedule_of(spec.bounds)
    if schedule == TABLE:
        torch._foreach_add_(tensors.state_steps, 1)
    flags = kernel_flags(spec, schedule, inputs)
    partials = projection_partials(
        tensors.projection, [plan.n_blocks for _, plan, _, _, _ in launches], device
    )
    for i, (real, plan, grad_table, base, steps) in enumerate(launches):
        compute = torch.float64 if real == torch.float64 else torch.float32
        coef = coefficient_table(steps, spec, compute) if schedule == TABLE else plan.offsets
        if plan.n_blocks == 0:
            continue
        itemsize = base.element_size()
        _adabound_kernel[(plan.n_blocks,)](
            base,
            plan.offsets,
            grad_table.offsets,
            plan.numels,
            plan.block_tensor,
            plan.block_start,
            steps[0],
            plan.step_offsets,
            coef,
            hyper_table_for(spec, compute, device, final_lr_argument=estimating),
            *inputs.kernel_args(steps[0]),
            len(steps),
            partials.of(i) if partials is not None else steps[0],
            DTYPE=TL_DTYPES[real],
            COMPUTE=tl.float64 if compute == torch.float64 else tl.float32,
            IS_FP64=compute == torch.float64,
            **flags,
            PROJECTION=partials is not None,
            VEC=16 // itemsize if plan.aligned and grad_table.aligned else 1,
            BLOCK=BLOCK,
            CHUNK=CHUNK,
            # No FMA contraction: same operation order and rounding as the CPU kernel.
            enable_fp_fusion=False,
        )
    if partials is not None and tensors.projection is not None:
        partials.add_to(tensors.projection)
    counters = [(steps, plan.step_offsets) for _, plan, _, _, steps in launches]
    advance_counters(schedule, tensors.state_steps, inputs.found_inf, counters)
    params, state_steps = tensors.params, tensors.state_steps
    compat.bump_versions(params)
    compat.bump_versions(state_steps)
