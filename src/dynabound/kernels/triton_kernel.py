"""Fused AdaBound step for CUDA tensors: two Triton launches per dtype per step.

Host side: an eager step must cost what torch's fused Adam costs, so per step it only reads
the tensors' addresses and compares them with a cached launch plan. A plan (element offsets
of every tensor from one base address, sizes, the list of blocks, step-counter offsets) is
validated and uploaded once, and rebuilt only when an address, size, dtype, layout or the
set of tensors changes; gradients re-allocated by ``zero_grad(set_to_none=True)`` replace
only the small gradient-offset table, cached by address too. Nothing else touches the
device: the per-step scalars are computed inside the kernel.

Device side: each program reads its tensor's step counter and derives that step's scalars in
float64 (``_step_scalars``: the built-in ``"reference"`` and ``"paper"`` schedules of
:func:`dynabound.bounds.step_coefficients`, which tests pin this copy to). A second launch
then advances the counters, so no block reads a counter another block already advanced. A
bound function passed as ``bounds=`` is evaluated on the device on the vector of
per-parameter steps (a 1-D float64 tensor: it must use tensor arithmetic, as in capturable
mode) and handed to the kernel as a table; that path costs a few more launches.

``grad_scale``/``found_inf`` follow torch's fused Adam: gradients are divided by the scale
(and left unscaled), and when ``found_inf`` is nonzero nothing changes, the step counters
included, all without reading ``found_inf`` on the host.
"""

from __future__ import annotations

import functools
import struct
from collections import OrderedDict
from typing import NamedTuple

import torch
from torch import Tensor

from ..bounds import step_coefficients_from, within_range
from . import dense_layout

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # optional dependency
    triton = None
    tl = None
    _IMPORT_ERROR: str | None = f"triton is not importable ({exc})"
else:
    _IMPORT_ERROR = None

__all__ = ["fused_adabound_triton", "is_available", "unavailable_reason"]

BLOCK = 1024
CHUNK = 8 * BLOCK
_CACHE_SIZE = 8
# Kernel argument SCHEDULE: which per-step scalars the kernel computes.
REFERENCE, PAPER, TABLE = 0, 1, 2
# Row order of the `hyper` table the kernel reads (float64).
_HYPER = (
    "beta1", "beta2", "eps", "weight_decay", "final_lr", "base_lr", "gamma", "lo", "hi", "largest",
)  # fmt: skip


@functools.cache
def unavailable_reason() -> str | None:
    """Why the kernel cannot run here, or None; asked every default step, so cached."""
    # The device first: without one, a missing Triton is beside the point.
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            return f"no CUDA device (this torch, {torch.__version__}, is built without CUDA)"
        return "no CUDA device (torch.cuda.is_available() is False)"
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    return None


def is_available() -> bool:
    """True when Triton imports and a CUDA device is present."""
    return unavailable_reason() is None


if triton is not None:
    # Rows of the hyper table, as kernel constants.
    _H_BETA1 = tl.constexpr(_HYPER.index("beta1"))
    _H_BETA2 = tl.constexpr(_HYPER.index("beta2"))
    _H_EPS = tl.constexpr(_HYPER.index("eps"))
    _H_WD = tl.constexpr(_HYPER.index("weight_decay"))
    _H_FINAL_LR = tl.constexpr(_HYPER.index("final_lr"))
    _H_BASE_LR = tl.constexpr(_HYPER.index("base_lr"))
    _H_GAMMA = tl.constexpr(_HYPER.index("gamma"))
    _H_LO = tl.constexpr(_HYPER.index("lo"))
    _H_HI = tl.constexpr(_HYPER.index("hi"))
    _H_LARGEST = tl.constexpr(_HYPER.index("largest"))

    @triton.jit
    def _power(base, exponent):
        """``base ** exponent`` in float64 as exp(exponent * log(base)): its relative error
        stays near one ulp while exponent * log(base) is small, which is where
        1 - base**exponent cancels (repeated squaring would grow it with the exponent)."""
        return tl.exp(exponent * tl.log(base))

    @triton.jit
    def _step_scalars(t, beta1, beta2, final_lr, base_lr, gamma, SCHEDULE: tl.constexpr):
        """(numerator, lower, upper, scale) at step ``t``, float64, in the operation order of
        dynabound.bounds.step_coefficients."""
        if SCHEDULE == 1:  # "paper": Algorithm 2 of the paper
            numerator = t * 0.0 + 1.0
            lower = final_lr * (1 - 1 / ((1 - beta2) * t + 1)) / base_lr
            upper = final_lr * (1 + 1 / ((1 - beta2) * t)) / base_lr
            scale = 1 / tl.sqrt(t)
        else:  # "reference": the authors' AdaBound
            numerator = tl.sqrt(1 - _power(beta2, t)) / (1 - _power(beta1, t))
            lower = final_lr * (1 - 1 / (gamma * t + 1)) / base_lr
            upper = final_lr * (1 + 1 / (gamma * t)) / base_lr
            scale = t * 0.0 + 1.0
        return numerator, lower, upper, scale

    @triton.jit
    def _tensor_scalars(
        t, step, n, coef, hyper, lr_hi, lr_lo, lr_ptr, found_inf, grad_scale, n_tensors,
        COMPUTE: tl.constexpr, SCHEDULE: tl.constexpr, LR_TENSOR: tl.constexpr,
        UNSCALED_DECAY: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    ):  # fmt: skip
        """Tensor ``t``'s element count (0 when ``found_inf`` is set), the gradient scale, and
        the scalars of its update in COMPUTE, as ``_decayed``, ``_moments`` and
        ``_bounded_step`` take them. ``step`` is this step's number in float64; a table
        (SCHEDULE 2) needs none."""
        beta1 = tl.load(hyper + _H_BETA1)
        beta2 = tl.load(hyper + _H_BETA2)
        weight_decay = tl.load(hyper + _H_WD)
        largest = tl.load(hyper + _H_LARGEST)
        # The learning rate in float64: a tensor, or a Python float split into two float32
        # kernel arguments (Triton passes floats as float32) that sum to it.
        if LR_TENSOR:
            lr = tl.load(lr_ptr).to(tl.float64)
        else:
            lr = tl.cast(lr_hi, tl.float64) + tl.cast(lr_lo, tl.float64)
        if SCHEDULE == 2:
            numerator = tl.load(coef + t).to(tl.float64)
            lower = tl.load(coef + n_tensors + t).to(tl.float64)
            upper = tl.load(coef + 2 * n_tensors + t).to(tl.float64)
            step_scale = tl.load(coef + 3 * n_tensors + t).to(tl.float64)
        else:
            numerator, lower, upper, step_scale = _step_scalars(
                step, beta1, beta2, tl.load(hyper + _H_FINAL_LR), tl.load(hyper + _H_BASE_LR),
                tl.load(hyper + _H_GAMMA), SCHEDULE,
            )  # fmt: skip
        # Bounds capped at the arithmetic type's range (dynabound.bounds.within_range).
        lower = tl.where(lower > largest, largest, lower)
        upper = tl.where(upper > largest, largest, upper)
        rate_scale = lr * step_scale
        if UNSCALED_DECAY:
            decay = 1 - weight_decay * (lr != 0).to(tl.float64)
        else:
            decay = 1 - lr * weight_decay
        scale = 1.0
        if HAS_GRAD_SCALE:
            scale = tl.load(grad_scale).to(COMPUTE)
        if HAS_FOUND_INF:
            # An inf/NaN gradient somewhere: treat every tensor as empty (no host sync).
            n = n * (tl.load(found_inf) == 0).to(tl.int64)
        scalars = (
            numerator.to(COMPUTE), lower.to(COMPUTE), upper.to(COMPUTE),
            rate_scale.to(COMPUTE), decay.to(COMPUTE), beta1.to(COMPUTE),
            (1 - beta1).to(COMPUTE), beta2.to(COMPUTE), (1 - beta2).to(COMPUTE),
            tl.load(hyper + _H_EPS).to(COMPUTE), weight_decay.to(COMPUTE),
            tl.load(hyper + _H_LO).to(COMPUTE), tl.load(hyper + _H_HI).to(COMPUTE),
        )  # fmt: skip
        return n, scale, scalars

    @triton.jit
    def _decayed(grad, param, scalars, WEIGHT_DECAY: tl.constexpr):
        """(gradient, parameter) after weight decay: L2 (1) or decoupled (2)."""
        _, _, _, _, decay, _, _, _, _, _, weight_decay, _, _ = scalars
        if WEIGHT_DECAY == 1:
            grad = grad + weight_decay * param
        if WEIGHT_DECAY == 2:
            param = param * decay
        return grad, param

    @triton.jit
    def _moments(grad, avg, avg_sq, scalars):
        """The new (exp_avg, exp_avg_sq) from the old ones."""
        _, _, _, _, _, beta1, one_minus_beta1, beta2, one_minus_beta2, _, _, _, _ = scalars
        avg = avg * beta1 + one_minus_beta1 * grad
        avg_sq = avg_sq * beta2 + one_minus_beta2 * grad * grad
        return avg, avg_sq

    @triton.jit
    def _bounded_step(
        param, avg, second, scalars, IS_FP64: tl.constexpr, EPS_USED: tl.constexpr,
        HAS_BOX: tl.constexpr,
    ):  # fmt: skip
        """The parameter after the step with the clipped learning rate."""
        numerator, lower, upper, rate_scale, _, _, _, _, _, eps, _, box_lo, box_hi = scalars
        # IEEE-rounded sqrt and division (tl.sqrt and / are approximate in fp32), so the
        # result matches the eager path to rounding.
        if IS_FP64:
            denom = tl.sqrt(second)
        else:
            denom = tl.sqrt_rn(second)
        if EPS_USED:
            denom = denom + eps
        if IS_FP64:
            rate = (1.0 / denom) * numerator
        else:
            rate = tl.div_rn(1.0, denom) * numerator
        # Selects rather than minimum/maximum so that NaN propagates, like torch.clamp.
        rate = tl.where(rate < lower, lower, rate)
        rate = tl.where(rate > upper, upper, rate)
        param = param - (rate * rate_scale) * avg
        if HAS_BOX:
            param = tl.where(param < box_lo, box_lo, param)
            param = tl.where(param > box_hi, box_hi, param)
        return param

    @triton.jit
    def _update(
        base, p_off, g_off, m_off, v_off, vmax_off, local, mask, scale, scalars,
        DTYPE: tl.constexpr, COMPUTE: tl.constexpr, IS_FP64: tl.constexpr,
        AMSBOUND: tl.constexpr, WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr,
        EPS_USED: tl.constexpr, HAS_BOX: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
        VEC: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """The element-wise update of one block; ``mask`` is None for a full block."""
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
        grad, param = _decayed(grad, param, scalars, WEIGHT_DECAY)
        avg, avg_sq = _moments(
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
        param = _bounded_step(param, avg, second, scalars, IS_FP64, EPS_USED, HAS_BOX)
        tl.store(base + p_idx, param.to(DTYPE), mask=mask)
        tl.store(base + m_idx, avg.to(DTYPE), mask=mask)
        tl.store(base + v_idx, avg_sq.to(DTYPE), mask=mask)

    @triton.jit
    def _adabound_kernel(
        base, offsets, grad_offsets, numels, block_tensor, block_start, steps, step_offsets,
        coef, hyper, lr_hi, lr_lo, lr_ptr, found_inf, grad_scale, n_tensors,
        DTYPE: tl.constexpr, COMPUTE: tl.constexpr, IS_FP64: tl.constexpr,
        SCHEDULE: tl.constexpr, LR_TENSOR: tl.constexpr, AMSBOUND: tl.constexpr,
        WEIGHT_DECAY: tl.constexpr, UNSCALED_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr,
        EPS_USED: tl.constexpr, HAS_BOX: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
        HAS_GRAD_SCALE: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr,
        CHUNK: tl.constexpr,
    ):  # fmt: skip
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
        n, scale, scalars = _tensor_scalars(
            t, step, tl.load(numels + t), coef, hyper, lr_hi, lr_lo, lr_ptr, found_inf,
            grad_scale, n_tensors, COMPUTE, SCHEDULE, LR_TENSOR, UNSCALED_DECAY, HAS_FOUND_INF,
            HAS_GRAD_SCALE,
        )  # fmt: skip
        for offset in tl.static_range(0, CHUNK, BLOCK):
            first = start + offset
            local = first + tl.arange(0, BLOCK)
            # Full blocks go unmasked: a mask against a size read from memory would keep
            # Triton from vectorising the accesses.
            if first + BLOCK <= n:
                _update(
                    base, p_off, g_off, m_off, v_off, vmax_off, local, None, scale, scalars,
                    DTYPE, COMPUTE, IS_FP64, AMSBOUND, WEIGHT_DECAY, MAXIMIZE, EPS_USED,
                    HAS_BOX, HAS_GRAD_SCALE, VEC, BLOCK,
                )  # fmt: skip
            elif first < n:
                _update(
                    base, p_off, g_off, m_off, v_off, vmax_off, local, local < n, scale,
                    scalars, DTYPE, COMPUTE, IS_FP64, AMSBOUND, WEIGHT_DECAY, MAXIMIZE,
                    EPS_USED, HAS_BOX, HAS_GRAD_SCALE, VEC, BLOCK,
                )  # fmt: skip

    @triton.jit
    def _advance_steps(
        steps, step_offsets, n_tensors, found_inf, HAS_FOUND_INF: tl.constexpr,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        """Add one to every step counter (nothing when ``found_inf`` is set)."""
        index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = index < n_tensors
        where = steps + tl.load(step_offsets + index, mask=mask, other=0)
        increment = 1.0
        if HAS_FOUND_INF:
            increment = (tl.load(found_inf) == 0).to(tl.float32)
        tl.store(where, tl.load(where, mask=mask) + increment, mask=mask)

    @triton.jit
    def _scalars_kernel(
        steps, out, n, beta1, beta2, final_lr, base_lr, gamma, SCHEDULE: tl.constexpr
    ):
        """The per-step scalars of one step per program (float64): what the update kernel
        computes, exposed so tests can pin it to dynabound.bounds."""
        index = tl.program_id(0)
        numerator, lower, upper, scale = _step_scalars(
            tl.load(steps + index), tl.load(beta1), tl.load(beta2), tl.load(final_lr),
            tl.load(base_lr), tl.load(gamma), SCHEDULE,
        )  # fmt: skip
        tl.store(out + index, numerator)
        tl.store(out + n + index, lower)
        tl.store(out + 2 * n + index, upper)
        tl.store(out + 3 * n + index, scale)

    _TL_DTYPES = {
        torch.float32: tl.float32,
        torch.float64: tl.float64,
        torch.bfloat16: tl.bfloat16,
        torch.float16: tl.float16,
    }


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


class _GradTable(NamedTuple):
    offsets: Tensor  # int64 [n]: elements from the plan's base
    aligned: bool


_plans: OrderedDict[tuple, _Plan] = OrderedDict()
_grad_tables: OrderedDict[tuple, _GradTable] = OrderedDict()
_hypers: OrderedDict[tuple, Tensor] = OrderedDict()


def _cached(cache: OrderedDict, key: tuple, build):
    """``cache[key]``, made by ``build()`` on a miss; the least recently used entries go."""
    hit = cache.get(key)
    if hit is not None:
        cache.move_to_end(key)
        return hit
    value = cache[key] = build()
    if len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return value


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":  # Triton's interpreter runs on CPU tensors
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _as_real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


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
    return _cached(
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
        p, *state = (_as_real(t) for t in (p, *state))
        for t in state:
            if t.dtype != p.dtype or t.device != p.device:
                raise RuntimeError(
                    "fused AdaBound needs state of the parameter's dtype and device, got a "
                    f"{p.dtype} parameter on {p.device} with {t.dtype} state on {t.device}"
                )
        if not dense_layout(p) or any(t.stride() != p.stride() for t in state):
            raise RuntimeError(
                "fused AdaBound on CUDA needs each parameter, its gradient and its state in "
                "one dense memory layout; use fused=False for this parameter group"
            )
        addresses = [t.data_ptr() for t in (p, *state)]
        _check_addresses(p, addresses)
        rows.append(addresses if len(addresses) == 4 else addresses + [0])
        numels.append(p.numel())
    step_offsets = _step_offsets(state_steps, device)
    itemsize = _as_real(params[0]).element_size()
    offsets = [(a - rows[0][0]) // itemsize if a else 0 for row in rows for a in row]
    return _Plan(
        offsets=_to_device(offsets, torch.int64, device),
        **_blocks(numels, CHUNK, device),
        step_offsets=step_offsets,
        aligned=all(a % 16 == 0 for row in rows for a in row),
        strides=[_as_real(p).stride() for p in params],
    )


def _step_offsets(state_steps: list[Tensor], device: torch.device) -> Tensor:
    """The counters' float32 offsets from the first, on ``device``, once they are checked."""
    for s in state_steps:
        if s.device != device or s.dtype != torch.float32 or s.numel() != 1:
            raise RuntimeError(
                "fused AdaBound on CUDA needs float32 step counters on the parameters' device "
                f"(the optimizer creates them there), got a {s.dtype} counter on {s.device}"
            )
    step_base = state_steps[0].data_ptr()
    step_offsets = [(s.data_ptr() - step_base) // 4 for s in state_steps]
    return _to_device(step_offsets, torch.int64, device)


def _blocks(numels: list[int], size: int, device: torch.device) -> dict:
    """A plan's block fields: every tensor cut into blocks of ``size`` elements, in order,
    so one launch covers all tensors however small."""
    counts = (torch.tensor(numels, dtype=torch.int64) + size - 1) // size
    owner = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts)
    first = torch.cumsum(counts, 0) - counts
    start = (torch.arange(owner.numel(), dtype=torch.int64) - first[owner.long()]) * size
    return dict(
        numels=_to_device(numels, torch.int64, device),
        block_tensor=_to_device(owner.tolist(), torch.int32, device),
        block_start=_to_device(start.tolist(), torch.int64, device),
        n_blocks=int(owner.numel()),
    )


def _check_addresses(p: Tensor, addresses: list[int]) -> None:
    if p.numel() and not all(addresses):  # a wrapper subclass that owns no storage
        raise RuntimeError(
            f"fused AdaBound cannot update a {type(p).__name__} without storage of its "
            "own (data_ptr() is 0); use fused=False"
        )
    if any(a % p.element_size() for a in addresses):
        raise RuntimeError("fused AdaBound got a tensor not aligned to its element size")


def _grad_table(plan: _Plan, params: list[Tensor], grads: list[Tensor]) -> _GradTable:
    """Gradient offsets from the first parameter; gradients must share their parameter's
    dtype and layout (autograd's always do; the check catches ones assigned by hand)."""
    if params[0].is_complex():
        grads = [_as_real(g) for g in grads]
    if [g.stride() for g in grads] != plan.strides:
        _raise_for_gradients(params, grads)
    base = params[0]
    key = (base.dtype, base.data_ptr(), *[g.data_ptr() for g in grads])
    return _cached(_grad_tables, key, lambda: _build_grad_table(params, grads))


def _build_grad_table(params: list[Tensor], grads: list[Tensor]) -> _GradTable:
    for p, g in zip(params, grads, strict=True):
        if g.dtype != _as_real(p).dtype or g.device != p.device:
            _raise_for_gradients(params, grads)
        _check_addresses(_as_real(p), [g.data_ptr()])
    base, itemsize = params[0].data_ptr(), _as_real(params[0]).element_size()
    addresses = [g.data_ptr() for g in grads]
    offsets = [(a - base) // itemsize for a in addresses]
    return _GradTable(
        offsets=_to_device(offsets, torch.int64, grads[0].device),
        aligned=all(a % 16 == 0 for a in addresses),
    )


def _raise_for_gradients(params: list[Tensor], grads: list[Tensor]) -> None:
    for p, g in zip(params, grads, strict=True):
        p = _as_real(p)
        if g.dtype != p.dtype or g.device != p.device:
            raise RuntimeError(
                "fused AdaBound needs gradients of the parameter's dtype and device, got a "
                f"{p.dtype} parameter on {p.device} with a {g.dtype} gradient on {g.device}"
            )
        if g.stride() != p.stride():
            raise RuntimeError(
                "fused AdaBound on CUDA needs each parameter, its gradient and its state in "
                "one dense memory layout; use fused=False for this parameter group"
            )


def _hyper_table(hyper: dict, box, compute: torch.dtype, device: torch.device) -> Tensor:
    lo, hi = box if box is not None else (0.0, 0.0)
    values = dict(hyper, lo=lo, hi=hi, largest=torch.finfo(compute).max)
    row = tuple(float(values[k]) for k in _HYPER)
    key = (device, row)
    return _cached(_hypers, key, lambda: _to_device(list(row), torch.float64, device))


def _coefficient_table(steps: list[Tensor], hyper: dict, compute: torch.dtype) -> Tensor:
    """Rows numerator, lower, upper, scale (a column per tensor) for a bound function."""
    c = step_coefficients_from(torch.stack(steps).to(torch.float64), hyper)
    c = within_range(c, compute)
    table = torch.empty((4, len(steps)), dtype=torch.float64, device=steps[0].device)
    for row, value in enumerate((c.numerator, c.lower, c.upper, c.scale)):
        table[row].copy_(value) if isinstance(value, Tensor) else table[row].fill_(value)
    return table


def _split_float(value: float) -> tuple[float, float]:
    """Two float32 values whose float64 sum is ``value`` to within 2**-48 relative."""
    high = _float32(value)
    return high, _float32(value - high)


def _float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


class _StepInputs(NamedTuple):
    grad_scale: Tensor | None
    found_inf: Tensor | None
    lr_tensor: Tensor | None  # None: lr is the float lr_hi + lr_lo
    lr_hi: float
    lr_lo: float

    def kernel_args(self, placeholder: Tensor) -> tuple:
        """The update kernels' lr_hi, lr_lo, lr_ptr, found_inf and grad_scale arguments;
        ``placeholder`` stands for an absent tensor, which the kernel then never reads."""
        tensors = (self.lr_tensor, self.found_inf, self.grad_scale)
        return self.lr_hi, self.lr_lo, *(t if t is not None else placeholder for t in tensors)


def _step_inputs(device, grad_scale, found_inf, lr, capturable) -> _StepInputs:
    """The GradScaler tensors on ``device``, and lr as the kernel reads it: a device tensor
    (read in the kernel), or a float sent as two float32 halves (hi, lo)."""
    if grad_scale is not None:
        grad_scale = grad_scale.to(device, non_blocking=True)
    if found_inf is not None:
        found_inf = found_inf.to(device, non_blocking=True)
    lr_tensor = None
    if isinstance(lr, Tensor):
        if lr.device == device:
            lr_tensor = lr
        elif capturable:
            lr_tensor = lr.to(device, non_blocking=True)
        else:
            lr = lr.item()  # a CPU tensor: no device sync
    lr_hi, lr_lo = _split_float(float(lr)) if lr_tensor is None else (0.0, 0.0)
    return _StepInputs(grad_scale, found_inf, lr_tensor, lr_hi, lr_lo)


def _schedule(bounds) -> int:
    return TABLE if callable(bounds) else (PAPER if bounds == "paper" else REFERENCE)


def _flags(hyper: dict, schedule: int, inputs: _StepInputs, amsbound, maximize, box) -> dict:
    """The compile-time arguments that both update kernels take."""
    wd = hyper["weight_decay"]
    return dict(
        SCHEDULE=schedule,
        LR_TENSOR=inputs.lr_tensor is not None,
        AMSBOUND=amsbound,
        WEIGHT_DECAY=0 if wd == 0 else (2 if hyper["decoupled_weight_decay"] else 1),
        UNSCALED_DECAY=bool(hyper["unscaled_decay"]),
        MAXIMIZE=maximize,
        EPS_USED=schedule != PAPER,
        HAS_BOX=box is not None,
        HAS_FOUND_INF=inputs.found_inf is not None,
        HAS_GRAD_SCALE=inputs.grad_scale is not None,
    )


def _advance_counters(
    schedule: int,
    state_steps: list[Tensor],
    found_inf: Tensor | None,
    counters: list[tuple[list[Tensor], Tensor]],
) -> None:
    """Count the step after the update launches, one launch per (steps, step_offsets) of
    ``counters``. A bound function's counters moved before its table was made, so a
    skipped step (``found_inf``) only takes them back."""
    if schedule == TABLE:
        if found_inf is not None:
            torch._foreach_sub_(state_steps, [found_inf] * len(state_steps))
        return
    for steps, step_offsets in counters:
        _advance_steps[(triton.cdiv(len(steps), BLOCK),)](
            steps[0],
            step_offsets,
            len(steps),
            found_inf if found_inf is not None else steps[0],
            HAS_FOUND_INF=found_inf is not None,
            BLOCK=BLOCK,
        )


def fused_adabound_triton(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    capturable: bool,
    has_complex: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    amsbound: bool,
    lr: float | Tensor,
    box: tuple[float, float] | None,
    maximize: bool,
    **hyper,
) -> None:
    """One AdaBound step over tensors on one device, in place, with no host sync.

    ``lr`` may be a float or a Tensor (one on the device is read there, so it may change
    between CUDA-graph replays). Steps must be float32 tensors on the parameters' device.
    """
    if triton is None:
        raise RuntimeError(f"dynabound's fused CUDA kernel needs Triton: {_IMPORT_ERROR}")
    if not params:
        return
    # Low-precision moments or stochastically rounded bfloat16 parameters: triton_encoded.
    encoded = dict(
        state_dtype=hyper.pop("state_dtype", None),
        stochastic_rounding=hyper.pop("stochastic_rounding", False),
        rounding_seeds=hyper.pop("rounding_seeds", None),
    )
    if encoded["state_dtype"] is not None or (
        encoded["stochastic_rounding"] and any(p.dtype is torch.bfloat16 for p in params)
    ):
        from .triton_encoded import fused_adabound_triton_encoded

        fused_adabound_triton_encoded(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
            capturable=capturable, has_complex=has_complex, grad_scale=grad_scale,
            found_inf=found_inf, amsbound=amsbound, lr=lr, box=box, maximize=maximize,
            **encoded, **hyper,
        )  # fmt: skip
        return
    device = params[0].device
    inputs = _step_inputs(device, grad_scale, found_inf, lr, capturable)

    # Validate everything before touching any state, so a refused step changes nothing.
    dtype = params[0].dtype
    if all(p.dtype is dtype for p in params):
        split = [(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)]
    else:
        split = _split_by_dtype(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
    launches = []
    for lists in split:
        real = lists[0][0].dtype.to_real()
        if real not in _TL_DTYPES:
            raise RuntimeError(f"dynabound's fused CUDA kernel does not support {real}")
        plan = _plan(lists[0], lists[2], lists[3], lists[4] if amsbound else [], lists[5])
        grad_table = _grad_table(plan, lists[0], lists[1])
        launches.append((real, plan, grad_table, _as_real(lists[0][0]), lists[5]))

    schedule = _schedule(hyper["bounds"])
    if schedule == TABLE:
        torch._foreach_add_(state_steps, 1)
    flags = _flags(hyper, schedule, inputs, amsbound, maximize, box)
    for real, plan, grad_table, base, steps in launches:
        compute = torch.float64 if real == torch.float64 else torch.float32
        coef = _coefficient_table(steps, hyper, compute) if schedule == TABLE else plan.offsets
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
            _hyper_table(hyper, box, compute, device),
            *inputs.kernel_args(steps[0]),
            len(steps),
            DTYPE=_TL_DTYPES[real],
            COMPUTE=tl.float64 if compute == torch.float64 else tl.float32,
            IS_FP64=compute == torch.float64,
            **flags,
            VEC=16 // itemsize if plan.aligned and grad_table.aligned else 1,
            BLOCK=BLOCK,
            CHUNK=CHUNK,
            # No FMA contraction: same operation order and rounding as the CPU kernel.
            enable_fp_fusion=False,
        )
    counters = [(steps, plan.step_offsets) for _, plan, _, _, steps in launches]
    _advance_counters(schedule, state_steps, inputs.found_inf, counters)
    torch.autograd.graph.increment_version(params)
    torch.autograd.graph.increment_version(state_steps)


def _split_by_dtype(*lists: list[Tensor]) -> list[tuple[list[Tensor], ...]]:
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(lists[0]):
        by_dtype.setdefault(p.dtype, []).append(i)
    return [
        tuple([ts[i] for i in indices] if ts else [] for ts in lists)
        for indices in by_dtype.values()
    ]


def step_scalars(steps: Tensor, *, bounds: str, final_lr, base_lr, gamma, beta1, beta2):
    """The kernel's float64 (numerator, lower, upper, scale) for a 1-D float64 tensor of
    steps, computed by the kernel's own code (for tests pinning it to dynabound.bounds)."""
    n = steps.numel()
    out = torch.empty(4 * n, dtype=torch.float64, device=steps.device)
    scalars = [
        _to_device([float(x)], torch.float64, steps.device)
        for x in (beta1, beta2, final_lr, base_lr, gamma)
    ]
    _scalars_kernel[(n,)](
        steps, out, n, *scalars, SCHEDULE=PAPER if bounds == "paper" else REFERENCE
    )
    return out.view(4, n).unbind(0)
