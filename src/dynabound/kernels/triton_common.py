"""The Triton code both CUDA kernels share: the per-step scalars and the update's parts
(device side), and the launch plans' shared tables (host side).

:mod:`.triton_kernel` (moments in the parameter's dtype) and :mod:`.triton_encoded`
(low-precision moments) both import this module and neither imports the other.

Device side: ``step_scalars`` derives a step's scalars from its counter in float64 (the
built-in ``"reference"`` and ``"paper"`` schedules of
:func:`dynabound.bounds.step_coefficients`, which tests pin this copy to);
``tensor_scalars`` gathers one tensor's scalars from the ``hyper`` table, the lr and the
GradScaler tensors; ``decayed``, ``moments``, ``adam_rate`` and ``bounded_step`` are the
update between loading and storing; ``projection_terms`` and ``store_partials`` the sums of
``final_lr="auto"``'s projection, which :class:`Partials` adds up on the host side.
``advance_steps`` is the second launch of a step, which advances the counters after every
program has read its own.

Host side: caches keyed by addresses (gradient-offset tables, ``hyper`` tables), the block
lists of a plan, the step's lr and GradScaler inputs, the kernels' compile-time flags.
"""

from __future__ import annotations

import functools
import struct
from collections import OrderedDict
from typing import NamedTuple

import torch
from torch import Tensor

from ..bounds import _EXPONENT_LIMIT, step_coefficients_from, within_range
from ..spec import FLOATS, StepSpec, StepTensors
from . import compat
from .layout import as_real

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # optional dependency
    triton = None
    tl = None
    IMPORT_ERROR: str | None = f"triton is not importable ({exc})"
else:
    IMPORT_ERROR = None

__all__ = ["is_available", "step_scalars", "unavailable_reason"]

# Entries per cache of launch plans and tables, least recently used dropped first.
CACHE_SIZE = 8
# Kernel argument SCHEDULE: which per-step scalars the kernel computes.
REFERENCE, PAPER, TABLE = 0, 1, 2
# Step counters per program of advance_steps.
COUNTER_BLOCK = 1024
# Row order of the `hyper` table the kernels read (float64): the step's floats but lr
# (a kernel argument, so that the cached table outlives a scheduler's change of lr), then
# the box and the arithmetic type's largest value.
_TABLED_FLOATS = tuple(name for name in FLOATS if name != "lr")
HYPER = (*_TABLED_FLOATS, "box_lo", "box_hi", "largest")


@functools.cache
def unavailable_reason() -> str | None:
    """Why the kernel cannot run here, or None; asked every default step, so cached."""
    # The device first: without one, a missing or old Triton is beside the point.
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            return f"no CUDA device (this torch, {torch.__version__}, is built without CUDA)"
        return "no CUDA device (torch.cuda.is_available() is False)"
    if IMPORT_ERROR is not None:
        return IMPORT_ERROR
    if compat.triton_version(triton) < compat.MIN_TRITON:
        oldest = ".".join(map(str, compat.MIN_TRITON))
        return (
            f"Triton {triton.__version__} is older than {oldest}, the oldest release the fused "
            f"CUDA kernel is tested with (it comes with torch {compat.TORCH_WITH_MIN_TRITON})"
        )
    return None


def is_available() -> bool:
    """True when a recent enough Triton imports and a CUDA device is present."""
    return unavailable_reason() is None


if triton is not None:
    # Rows of the hyper table, as kernel constants.
    _H_BETA1 = tl.constexpr(HYPER.index("beta1"))
    _H_BETA2 = tl.constexpr(HYPER.index("beta2"))
    _H_EPS = tl.constexpr(HYPER.index("eps"))
    _H_WD = tl.constexpr(HYPER.index("weight_decay"))
    _H_FINAL_LR = tl.constexpr(HYPER.index("final_lr"))
    _H_BASE_LR = tl.constexpr(HYPER.index("base_lr"))
    _H_GAMMA = tl.constexpr(HYPER.index("gamma"))
    _H_LO = tl.constexpr(HYPER.index("box_lo"))
    _H_HI = tl.constexpr(HYPER.index("box_hi"))
    _H_LARGEST = tl.constexpr(HYPER.index("largest"))
    _TWO_LIMIT = tl.constexpr(_EXPONENT_LIMIT)  # within_range's largest rescaling exponent

    @triton.jit
    def power(base, exponent):
        """``base ** exponent`` in float64 as exp(exponent * log(base)): its relative error
        stays near one ulp while exponent * log(base) is small, which is where
        1 - base**exponent cancels (repeated squaring would grow it with the exponent)."""
        return tl.exp(exponent * tl.log(base))

    @triton.jit
    def scalars_at_step(t, beta1, beta2, final_lr, base_lr, gamma, SCHEDULE: tl.constexpr):
        """(numerator, lower, upper, scale) at step ``t``, float64, in the operation order of
        dynabound.bounds.step_coefficients."""
        if SCHEDULE == 1:  # "paper": Algorithm 2 of the paper
            numerator = t * 0.0 + 1.0
            lower = final_lr * (1 - 1 / ((1 - beta2) * t + 1)) / base_lr
            upper = final_lr * (1 + 1 / ((1 - beta2) * t)) / base_lr
            scale = 1 / tl.sqrt(t)
        else:  # "reference": the authors' AdaBound
            numerator = tl.sqrt(1 - power(beta2, t)) / (1 - power(beta1, t))
            lower = final_lr * (1 - 1 / (gamma * t + 1)) / base_lr
            upper = final_lr * (1 + 1 / (gamma * t)) / base_lr
            scale = t * 0.0 + 1.0
        return numerator, lower, upper, scale

    @triton.jit
    def tensor_scalars(
        t, step, n, coef, hyper, lr_hi, lr_lo, final_hi, final_mid, final_lo, lr_ptr,
        found_inf, grad_scale, n_tensors, COMPUTE: tl.constexpr, SCHEDULE: tl.constexpr,
        LR_TENSOR: tl.constexpr, UNSCALED_DECAY: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
        HAS_GRAD_SCALE: tl.constexpr, PROJECTION: tl.constexpr,
    ):  # fmt: skip
        """Tensor ``t``'s element count (0 when ``found_inf`` is set), the gradient scale, the
        scalars of its update in COMPUTE, as ``decayed``, ``moments`` and ``bounded_step``
        take them, and with PROJECTION the unit of its projection terms
        (``projection_unit``). ``step`` is this step's number in float64; a table
        (SCHEDULE 2) needs none. With PROJECTION (a step of final_lr="auto", whose final_lr
        moves every step) final_lr is ``(final_hi + final_mid) + final_lo``, exactly
        (``split_float_exactly``), not the table's."""
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
            if PROJECTION:
                final_lr = tl.cast(final_hi, tl.float64) + tl.cast(final_mid, tl.float64)
                final_lr = final_lr + tl.cast(final_lo, tl.float64)
            else:
                final_lr = tl.load(hyper + _H_FINAL_LR)
            numerator, lower, upper, step_scale = scalars_at_step(
                step, beta1, beta2, final_lr, tl.load(hyper + _H_BASE_LR),
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
        unit = 1.0
        if PROJECTION:
            unit = projection_unit(upper, rate_scale, largest)
        return n, scale, scalars, unit

    @triton.jit
    def projection_unit(upper, lr_scale, largest):
        """The power of two by which dynabound.bounds.within_range, given lr, rescales the
        numerator (and ``1/scale``) where the upper bound or its rate comes within a factor
        two of the arithmetic type's largest value (``bounds._rescaling``, in float64): this
        kernel never rescales, and the projection is per unit of ``lr * scale`` as rescaled
        there, so its terms are multiplied by it (exactly). ``upper`` capped at ``largest``
        decides as the uncapped one: a capped one is above half of it either way."""
        near = largest * 0.5
        # frexp's exponent from the float64 bits: lr_scale = m * 2**e, m in [0.5, 1).
        biased = (lr_scale.to(tl.int64, bitcast=True) >> 52) & 0x7FF
        exponent = tl.minimum(tl.maximum(biased - 1022, -_TWO_LIMIT), _TWO_LIMIT)
        two = ((exponent + 1023) << 52).to(tl.float64, bitcast=True)
        two = tl.where((lr_scale > 0) & (biased != 0x7FF), two, 1.0)  # positive and finite
        needed = (upper > near) | (upper * lr_scale > near)
        return tl.where(needed, two, 1.0)

    @triton.jit
    def decayed(grad, param, scalars, WEIGHT_DECAY: tl.constexpr):
        """(gradient, parameter) after weight decay: L2 (1) or decoupled (2)."""
        _, _, _, _, decay, _, _, _, _, _, weight_decay, _, _ = scalars
        if WEIGHT_DECAY == 1:
            grad = grad + weight_decay * param
        if WEIGHT_DECAY == 2:
            param = param * decay
        return grad, param

    @triton.jit
    def moments(grad, avg, avg_sq, scalars):
        """The new (exp_avg, exp_avg_sq) from the old ones."""
        _, _, _, _, _, beta1, one_minus_beta1, beta2, one_minus_beta2, _, _, _, _ = scalars
        avg = avg * beta1 + one_minus_beta1 * grad
        avg_sq = avg_sq * beta2 + one_minus_beta2 * grad * grad
        return avg, avg_sq

    @triton.jit
    def adam_rate(second, scalars, IS_FP64: tl.constexpr, EPS_USED: tl.constexpr):
        """The unclipped rate per unit of ``lr * scale``: numerator / (sqrt(second) + eps)."""
        numerator, _, _, _, _, _, _, _, _, eps, _, _, _ = scalars
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
        return rate

    @triton.jit
    def bounded_step(param, avg, rate, scalars, HAS_BOX: tl.constexpr):
        """The parameter after the step with ``rate`` (``adam_rate``) clipped."""
        _, lower, upper, rate_scale, _, _, _, _, _, _, _, box_lo, box_hi = scalars
        # Selects rather than minimum/maximum so that NaN propagates, like torch.clamp.
        rate = tl.where(rate < lower, lower, rate)
        rate = tl.where(rate > upper, upper, rate)
        param = param - (rate * rate_scale) * avg
        if HAS_BOX:
            param = tl.where(param < box_lo, box_lo, param)
            param = tl.where(param > box_hi, box_hi, param)
        return param

    @triton.jit
    def projection_terms(rate, avg, grad, unit, mask, MASKED: tl.constexpr):
        """The terms of ``sum(d*d)`` and ``sum(d*g)`` (StepTensors.projection) in float64,
        zero in masked lanes; ``d = rate * avg`` is rounded in the update's arithmetic, as
        the reference rounds it, then multiplied by ``unit`` (a power of two:
        ``projection_unit``). The product of two float32 values is exact in float64, so a
        float32 step's terms carry no rounding and only their float64 sums do: a sum of
        ``d*g`` that cancels loses nothing to float32."""
        step = (rate * avg).to(tl.float64) * unit
        squares = step * step
        along = step * grad.to(tl.float64)
        if MASKED:  # masked lanes hold whatever the loads left there
            squares = tl.where(mask, squares, 0.0)
            along = tl.where(mask, along, 0.0)
        return squares, along

    @triton.jit
    def store_partials(partials, program, squares, along):
        """One program's two sums: ``sum(d*d)`` at ``program``, ``sum(d*g)`` one launch's
        programs further (the launch's slice of the step's partials, ``add_partials``)."""
        tl.store(partials + program, tl.sum(squares, axis=0))
        tl.store(partials + tl.num_programs(0) + program, tl.sum(along, axis=0))

    @triton.jit
    def advance_steps(
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
        numerator, lower, upper, scale = scalars_at_step(
            tl.load(steps + index), tl.load(beta1), tl.load(beta2), tl.load(final_lr),
            tl.load(base_lr), tl.load(gamma), SCHEDULE,
        )  # fmt: skip
        tl.store(out + index, numerator)
        tl.store(out + n + index, lower)
        tl.store(out + 2 * n + index, upper)
        tl.store(out + 3 * n + index, scale)

    TL_DTYPES = {
        torch.float32: tl.float32,
        torch.float64: tl.float64,
        torch.bfloat16: tl.bfloat16,
        torch.float16: tl.float16,
    }


class GradTable(NamedTuple):
    offsets: Tensor  # int64 [n]: elements from the plan's base
    aligned: bool


_grad_tables: OrderedDict[tuple, GradTable] = OrderedDict()
_hypers: OrderedDict[tuple, Tensor] = OrderedDict()


def cached(cache: OrderedDict, key: tuple, build):
    """``cache[key]``, made by ``build()`` on a miss; the least recently used entries go."""
    hit = cache.get(key)
    if hit is not None:
        cache.move_to_end(key)
        return hit
    value = cache[key] = build()
    if len(cache) > CACHE_SIZE:
        cache.popitem(last=False)
    return value


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":  # Triton's interpreter runs on CPU tensors
        return host
    return host.pin_memory().to(device, non_blocking=True)


def counter_offsets(state_steps: list[Tensor], device: torch.device) -> Tensor:
    """The counters' float32 offsets from the first, on ``device``, once they are checked."""
    for s in state_steps:
        if s.device != device or s.dtype != torch.float32 or s.numel() != 1:
            raise RuntimeError(
                "fused AdaBound on CUDA needs float32 step counters on the parameters' device "
                f"(the optimizer creates them there), got a {s.dtype} counter on {s.device}"
            )
    step_base = state_steps[0].data_ptr()
    step_offsets = [(s.data_ptr() - step_base) // 4 for s in state_steps]
    return to_device(step_offsets, torch.int64, device)


def block_lists(numels: list[int], size: int, device: torch.device) -> dict:
    """A plan's block fields: every tensor cut into blocks of ``size`` elements, in order,
    so one launch covers all tensors however small."""
    counts = (torch.tensor(numels, dtype=torch.int64) + size - 1) // size
    owner = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts)
    first = torch.cumsum(counts, 0) - counts
    start = (torch.arange(owner.numel(), dtype=torch.int64) - first[owner.long()]) * size
    return dict(
        numels=to_device(numels, torch.int64, device),
        block_tensor=to_device(owner.tolist(), torch.int32, device),
        block_start=to_device(start.tolist(), torch.int64, device),
        n_blocks=int(owner.numel()),
    )


def check_addresses(p: Tensor, addresses: list[int]) -> None:
    if p.numel() and not all(addresses):  # a wrapper subclass that owns no storage
        raise RuntimeError(
            f"fused AdaBound cannot update a {type(p).__name__} without storage of its "
            "own (data_ptr() is 0); use fused=False"
        )
    if any(a % p.element_size() for a in addresses):
        raise RuntimeError("fused AdaBound got a tensor not aligned to its element size")


def grad_table_for(
    strides: list[tuple[int, ...]], params: list[Tensor], grads: list[Tensor]
) -> GradTable:
    """Gradient offsets from the first parameter; gradients must share their parameter's
    dtype and layout (autograd's always do; the check catches ones assigned by hand)."""
    if params[0].is_complex():
        grads = [as_real(g) for g in grads]
    if [g.stride() for g in grads] != strides:
        raise_for_gradients(params, grads)
    base = params[0]
    key = (base.dtype, base.data_ptr(), *[g.data_ptr() for g in grads])
    return cached(_grad_tables, key, lambda: build_grad_table(params, grads))


def build_grad_table(params: list[Tensor], grads: list[Tensor]) -> GradTable:
    for p, g in zip(params, grads, strict=True):
        if g.dtype != as_real(p).dtype or g.device != p.device:
            raise_for_gradients(params, grads)
        check_addresses(as_real(p), [g.data_ptr()])
    base, itemsize = params[0].data_ptr(), as_real(params[0]).element_size()
    addresses = [g.data_ptr() for g in grads]
    offsets = [(a - base) // itemsize for a in addresses]
    return GradTable(
        offsets=to_device(offsets, torch.int64, grads[0].device),
        aligned=all(a % 16 == 0 for a in addresses),
    )


def raise_for_gradients(params: list[Tensor], grads: list[Tensor]) -> None:
    for p, g in zip(params, grads, strict=True):
        p = as_real(p)
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


def hyper_table_for(
    spec: StepSpec, compute: torch.dtype, device: torch.device, *, final_lr_argument: bool
) -> Tensor:
    """The step's :data:`HYPER` table on ``device``, cached by its values. With
    ``final_lr_argument`` the kernel takes final_lr as an argument (a step that estimates
    it, where it moves every step): the table holds 0 in its place, and stays cached."""
    if final_lr_argument:
        spec = spec._replace(final_lr=0.0)
    lo, hi = spec.box if spec.box is not None else (0.0, 0.0)
    row = (
        *(float(getattr(spec, name)) for name in _TABLED_FLOATS),
        float(lo),
        float(hi),
        torch.finfo(compute).max,
    )
    key = (device, row)
    return cached(_hypers, key, lambda: to_device(list(row), torch.float64, device))


def coefficient_table(steps: list[Tensor], spec: StepSpec, compute: torch.dtype) -> Tensor:
    """Rows numerator, lower, upper, scale (a column per tensor) for a bound function."""
    c = step_coefficients_from(torch.stack(steps).to(torch.float64), spec)
    c = within_range(c, compute)
    table = torch.empty((4, len(steps)), dtype=torch.float64, device=steps[0].device)
    for row, value in enumerate((c.numerator, c.lower, c.upper, c.scale)):
        table[row].copy_(value) if isinstance(value, Tensor) else table[row].fill_(value)
    return table


def split_float(value: float) -> tuple[float, float]:
    """Two float32 values whose float64 sum is ``value`` to within 2**-48 relative."""
    high = _float32(value)
    return high, _float32(value - high)


def split_float_exactly(value: float) -> tuple[float, float, float]:
    """Three float32 values whose float64 sum, ``(hi + mid) + lo``, is ``value`` exactly
    (for ``value`` in float32's normal range over 2**48). Each remainder is exact
    (Sterbenz), ``mid`` takes 24 of the at most 30 bits ``hi`` leaves, ``lo`` the rest;
    ``hi + mid`` spans at most 50 bits, so it is exact in float64 too."""
    high = _float32(value)
    rest = value - high
    middle = _float32(rest)
    return high, middle, _float32(rest - middle)


def _float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


class StepInputs(NamedTuple):
    grad_scale: Tensor | None
    found_inf: Tensor | None
    lr_tensor: Tensor | None  # None: lr is the float lr_hi + lr_lo
    lr_hi: float
    lr_lo: float
    final_parts: tuple[float, float, float]  # final_lr as an argument (estimating steps)

    def kernel_args(self, placeholder: Tensor) -> tuple:
        """The update kernels' lr_hi, lr_lo, final_hi, final_mid, final_lo, lr_ptr,
        found_inf and grad_scale arguments; ``placeholder`` stands for an absent tensor,
        which the kernel then never reads."""
        tensors = (self.lr_tensor, self.found_inf, self.grad_scale)
        floats = (self.lr_hi, self.lr_lo, *self.final_parts)
        return *floats, *(t if t is not None else placeholder for t in tensors)


def step_inputs(device: torch.device, spec: StepSpec, *, final_lr_argument: bool) -> StepInputs:
    """The GradScaler tensors on ``device``, and lr as the kernel reads it: a device tensor
    (read in the kernel), or a float sent as two float32 halves (hi, lo). With
    ``final_lr_argument``, final_lr is sent as three float32 parts that sum to it exactly
    (the table path reads it exactly; a step must not depend on which path it took)."""
    grad_scale, found_inf, lr = spec.grad_scale, spec.found_inf, spec.lr
    if grad_scale is not None:
        grad_scale = grad_scale.to(device, non_blocking=True)
    if found_inf is not None:
        found_inf = found_inf.to(device, non_blocking=True)
    lr_tensor = None
    if isinstance(lr, Tensor):
        if lr.device == device:
            lr_tensor = lr
        elif spec.capturable:
            lr_tensor = lr.to(device, non_blocking=True)
        else:
            lr = lr.item()  # a CPU tensor: no device sync
    lr_hi, lr_lo = split_float(float(lr)) if lr_tensor is None else (0.0, 0.0)
    final_parts = split_float_exactly(float(spec.final_lr)) if final_lr_argument else (0.0,) * 3
    return StepInputs(grad_scale, found_inf, lr_tensor, lr_hi, lr_lo, final_parts)


def schedule_of(bounds) -> int:
    return TABLE if callable(bounds) else (PAPER if bounds == "paper" else REFERENCE)


def kernel_flags(spec: StepSpec, schedule: int, inputs: StepInputs) -> dict:
    """The compile-time arguments that both update kernels take."""
    wd = spec.weight_decay
    return dict(
        SCHEDULE=schedule,
        LR_TENSOR=inputs.lr_tensor is not None,
        AMSBOUND=spec.amsbound,
        WEIGHT_DECAY=0 if wd == 0 else (2 if spec.decoupled_weight_decay else 1),
        UNSCALED_DECAY=bool(spec.unscaled_decay),
        MAXIMIZE=spec.maximize,
        EPS_USED=schedule != PAPER,
        HAS_BOX=spec.box is not None,
        HAS_FOUND_INF=inputs.found_inf is not None,
        HAS_GRAD_SCALE=inputs.grad_scale is not None,
    )


def advance_counters(
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
        advance_steps[(triton.cdiv(len(steps), COUNTER_BLOCK),)](
            steps[0],
            step_offsets,
            len(steps),
            found_inf if found_inf is not None else steps[0],
            HAS_FOUND_INF=found_inf is not None,
            BLOCK=COUNTER_BLOCK,
        )


class Partials(NamedTuple):
    """Scratch for one step's projection sums (StepTensors.projection): two float64 sums
    per program of every update launch, the launches one after the other, each as its
    row of sums of ``d*d`` followed by its row of sums of ``d*g``."""

    values: Tensor
    counts: list[int]  # programs per launch, in launch order

    def of(self, launch: int) -> Tensor:
        """The slice that update launch ``launch`` writes."""
        return self.values[2 * sum(self.counts[:launch]) :] if launch else self.values

    def add_to(self, projection: Tensor) -> None:
        """Add the step's two sums to ``projection``. Every partial was written by its
        program (no atomics) and torch sums them in an order fixed by their number, so
        the result repeats exactly from run to run."""
        if len(self.counts) == 1:  # one dtype: no slicing
            sums = self.values.view(2, self.counts[0]).sum(1)
        else:
            start, sums = 0, None
            for count in self.counts:
                part = self.values[2 * start : 2 * (start + count)].view(2, count).sum(1)
                sums = part if sums is None else sums + part
                start += count
        if sums is not None:
            projection.add_(sums.to(projection.device, non_blocking=True))


def projection_partials(projection: Tensor | None, counts: list[int], device) -> Partials | None:
    """The scratch for a step's projection sums, None when the step computes none; refuses
    a projection the step could not add to."""
    if projection is None:
        return None
    if projection.dtype != torch.float64 or projection.shape != (2,):
        raise RuntimeError(
            "the projection of a step (StepTensors.projection) must be a float64 tensor of "
            f"shape (2,), got a {projection.dtype} tensor of shape {tuple(projection.shape)}"
        )
    values = torch.empty(2 * sum(counts), dtype=torch.float64, device=device)
    return Partials(values, counts)


def split_by_dtype(tensors: StepTensors) -> list[StepTensors]:
    """The tensors of each parameter dtype, in order of first appearance: a launch each."""
    dtype = tensors.params[0].dtype
    if all(p.dtype is dtype for p in tensors.params):
        return [tensors]
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(tensors.params):
        by_dtype.setdefault(p.dtype, []).append(i)
    return [tensors.take(indices) for indices in by_dtype.values()]


def step_scalars(steps: Tensor, *, bounds: str, final_lr, base_lr, gamma, beta1, beta2):
    """The kernel's float64 (numerator, lower, upper, scale) for a 1-D float64 tensor of
    steps, computed by the kernel's own code (for tests pinning it to dynabound.bounds)."""
    n = steps.numel()
    out = torch.empty(4 * n, dtype=torch.float64, device=steps.device)
    scalars = [
        to_device([float(x)], torch.float64, steps.device)
        for x in (beta1, beta2, final_lr, base_lr, gamma)
    ]
    _scalars_kernel[(n,)](
        steps, out, n, *scalars, SCHEDULE=PAPER if bounds == "paper" else REFERENCE
    )
    return out.view(4, n).unbind(0)
