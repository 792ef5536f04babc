"""Fused AdaBound step for CUDA tensors: one multi-tensor Triton launch per dtype.

Layout of a launch: a table of data pointers (param, grad, exp_avg, exp_avg_sq,
max_exp_avg_sq per tensor), their sizes, and a list of blocks (tensor index, first element);
each program updates ``CHUNK`` elements of one tensor. The tables depend only on the
addresses and sizes, so they are built once (copied from pinned memory without a sync) and
reused while the tensors stay put, which also makes the step capturable by CUDA graphs.

The per-step scalars come from :func:`dynabound.bounds.step_coefficients` evaluated on the
device on the vector of per-parameter steps, so no step ever syncs with the host. A bound
function passed as ``bounds=`` therefore receives a 1-D float64 tensor of steps and must use
tensor arithmetic (as it must in capturable mode).

``grad_scale``/``found_inf`` follow torch's fused Adam: gradients are divided by the scale
(and left unscaled), and when ``found_inf`` is nonzero the kernel changes nothing and the
step counters are restored, all without reading ``found_inf`` on the host.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

from ..bounds import decoupled_decay_factor, step_coefficients, within_range
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
_tables: OrderedDict[tuple, tuple[Tensor, Tensor, Tensor, Tensor, int]] = OrderedDict()
_hypers: OrderedDict[tuple, Tensor] = OrderedDict()


def unavailable_reason() -> str | None:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return None


def is_available() -> bool:
    """True when Triton imports and a CUDA device is present."""
    return unavailable_reason() is None


if triton is not None:

    @triton.jit
    def _update(
        base, p_off, g_off, m_off, v_off, vmax_off, local, mask, scale, numerator, lower,
        upper, rate_scale, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
        weight_decay, box_lo, box_hi,
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
        if WEIGHT_DECAY == 1:
            grad = grad + weight_decay * param
        if WEIGHT_DECAY == 2:
            param = param * decay
        avg = tl.load(base + m_idx, mask=mask).to(COMPUTE) * beta1 + one_minus_beta1 * grad
        avg_sq = tl.load(base + v_idx, mask=mask).to(COMPUTE) * beta2
        avg_sq = avg_sq + one_minus_beta2 * grad * grad
        second = avg_sq
        if AMSBOUND:
            vmax_idx = tl.max_contiguous(tl.multiple_of(vmax_off + local, VEC), BLOCK)
            running = tl.load(base + vmax_idx, mask=mask).to(COMPUTE)
            running = tl.where((running < avg_sq) | (avg_sq != avg_sq), avg_sq, running)
            tl.store(base + vmax_idx, running.to(DTYPE), mask=mask)
            second = running
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
        tl.store(base + p_idx, param.to(DTYPE), mask=mask)
        tl.store(base + m_idx, avg.to(DTYPE), mask=mask)
        tl.store(base + v_idx, avg_sq.to(DTYPE), mask=mask)

    @triton.jit
    def _adabound_kernel(
        base, offsets, numels, block_tensor, block_start, coef, hyper, found_inf, grad_scale,
        n_tensors,
        DTYPE: tl.constexpr, COMPUTE: tl.constexpr, IS_FP64: tl.constexpr,
        AMSBOUND: tl.constexpr, WEIGHT_DECAY: tl.constexpr, MAXIMIZE: tl.constexpr,
        EPS_USED: tl.constexpr, HAS_BOX: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
        HAS_GRAD_SCALE: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr,
        CHUNK: tl.constexpr,
    ):  # fmt: skip
        block = tl.program_id(0)
        t = tl.load(block_tensor + block).to(tl.int64)
        start = tl.load(block_start + block)
        n = tl.load(numels + t)
        row = offsets + t * 5
        p_off = tl.load(row)
        g_off = tl.load(row + 1)
        m_off = tl.load(row + 2)
        v_off = tl.load(row + 3)
        vmax_off = tl.load(row + 4)
        numerator = tl.load(coef + t)
        lower = tl.load(coef + n_tensors + t)
        upper = tl.load(coef + 2 * n_tensors + t)
        rate_scale = tl.load(coef + 3 * n_tensors + t)
        decay = tl.load(coef + 4 * n_tensors + t)
        beta1 = tl.load(hyper)
        one_minus_beta1 = tl.load(hyper + 1)
        beta2 = tl.load(hyper + 2)
        one_minus_beta2 = tl.load(hyper + 3)
        eps = tl.load(hyper + 4)
        weight_decay = tl.load(hyper + 5)
        box_lo = tl.load(hyper + 6)
        box_hi = tl.load(hyper + 7)
        scale = 1.0
        if HAS_GRAD_SCALE:
            scale = tl.load(grad_scale).to(COMPUTE)
        if HAS_FOUND_INF:
            # An inf/NaN gradient somewhere: treat every tensor as empty (no host sync).
            n = n * (tl.load(found_inf) == 0).to(tl.int64)
        for offset in tl.static_range(0, CHUNK, BLOCK):
            first = start + offset
            local = first + tl.arange(0, BLOCK)
            # Full blocks go unmasked: a mask against a size read from memory would keep
            # Triton from vectorising the accesses.
            if first + BLOCK <= n:
                _update(
                    base, p_off, g_off, m_off, v_off, vmax_off, local, None, scale, numerator,
                    lower, upper, rate_scale, decay, beta1, one_minus_beta1, beta2,
                    one_minus_beta2, eps, weight_decay, box_lo, box_hi, DTYPE, COMPUTE,
                    IS_FP64, AMSBOUND, WEIGHT_DECAY, MAXIMIZE, EPS_USED, HAS_BOX,
                    HAS_GRAD_SCALE, VEC, BLOCK,
                )  # fmt: skip
            elif first < n:
                _update(
                    base, p_off, g_off, m_off, v_off, vmax_off, local, local < n, scale,
                    numerator, lower, upper, rate_scale, decay, beta1, one_minus_beta1, beta2,
                    one_minus_beta2, eps, weight_decay, box_lo, box_hi, DTYPE, COMPUTE,
                    IS_FP64, AMSBOUND, WEIGHT_DECAY, MAXIMIZE, EPS_USED, HAS_BOX,
                    HAS_GRAD_SCALE, VEC, BLOCK,
                )  # fmt: skip

    _TL_DTYPES = {
        torch.float32: tl.float32,
        torch.float64: tl.float64,
        torch.bfloat16: tl.bfloat16,
        torch.float16: tl.float16,
    }


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    if device.type == "cpu":  # Triton's interpreter runs on CPU tensors
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _remember(cache: OrderedDict, key: tuple, value):
    cache[key] = value
    if len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return value


def _launch_tables(pointers: list[int], numels: list[int], itemsize: int, device: torch.device):
    """Offset, size and block tables; cached by the addresses they describe.

    Offsets are in elements from the first address (the kernel's ``base`` argument): a
    pointer argument carries Triton's alignment specialisation, an address loaded from a
    table would not.
    """
    key = (device, CHUNK, itemsize, tuple(pointers), tuple(numels))
    hit = _tables.get(key)
    if hit is not None:
        _tables.move_to_end(key)
        return hit
    base = pointers[0]
    offsets = [(a - base) // itemsize if a else 0 for a in pointers]
    sizes = torch.tensor(numels, dtype=torch.int64)
    counts = (sizes + CHUNK - 1) // CHUNK
    owner = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts)
    first = torch.cumsum(counts, 0) - counts
    start = (torch.arange(owner.numel(), dtype=torch.int64) - first[owner.long()]) * CHUNK
    tables = (
        _to_device(torch.tensor(offsets, dtype=torch.int64), device),
        _to_device(sizes, device),
        _to_device(owner, device),
        _to_device(start, device),
        int(owner.numel()),
    )
    return _remember(_tables, key, tables)


def _hyper_tensor(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    key = (device, dtype, values)
    hit = _hypers.get(key)
    if hit is not None:
        _hypers.move_to_end(key)
        return hit
    return _remember(_hypers, key, _to_device(torch.tensor(values, dtype=dtype), device))


def _coefficient_table(
    steps: list[Tensor], lr: float | Tensor, dtype: torch.dtype, hyper: dict
) -> tuple[Tensor, bool]:
    """Rows numerator, lower, upper, lr*scale, decay (one column per tensor), on device."""
    step_vector = torch.stack(steps).to(torch.float64)
    c = step_coefficients(
        step_vector,
        bounds=hyper["bounds"],
        final_lr=hyper["final_lr"],
        base_lr=hyper["base_lr"],
        gamma=hyper["gamma"],
        beta1=hyper["beta1"],
        beta2=hyper["beta2"],
    )
    c = within_range(c, dtype)
    wd = hyper["weight_decay"]
    decay = decoupled_decay_factor(lr, wd, hyper["unscaled_decay"])
    table = torch.empty((5, len(steps)), dtype=dtype, device=step_vector.device)
    for row, value in enumerate((c.numerator, c.lower, c.upper, lr * c.scale, decay)):
        if isinstance(value, Tensor):
            table[row].copy_(value)
        else:
            table[row].fill_(value)
    return table, c.eps_used


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

    ``lr`` may be a float or a Tensor on the device (kept there: capturable). Steps must
    be tensors on the parameters' device.
    """
    if triton is None:
        raise RuntimeError(f"dynabound's fused CUDA kernel needs Triton: {_IMPORT_ERROR}")
    if not params:
        return
    device = params[0].device
    if isinstance(lr, Tensor) and lr.device != device:
        lr = lr.to(device, non_blocking=True)
    if any(s.device != device for s in state_steps):
        raise RuntimeError(
            "fused AdaBound on CUDA needs the step counters on the parameters' device "
            "(the optimizer creates them there when fused=True)"
        )
    if grad_scale is not None:
        grad_scale = grad_scale.to(device, non_blocking=True)
    if found_inf is not None:
        found_inf = found_inf.to(device, non_blocking=True)

    # Validate everything before touching any state, so a refused step changes nothing.
    groups: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p.dtype, []).append(i)
    launches = []
    for dtype, indices in groups.items():
        if dtype.to_real() not in _TL_DTYPES:
            raise RuntimeError(f"dynabound's fused CUDA kernel does not support {dtype}")
        vmax = max_exp_avg_sqs if amsbound else None
        rows = _pointer_rows(indices, params, grads, exp_avgs, exp_avg_sqs, vmax)
        launches.append((dtype, indices, *rows))

    torch._foreach_add_(state_steps, 1)
    for dtype, indices, pointers, numels, base in launches:
        dtype = base.dtype
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        coef, eps_used = _coefficient_table([state_steps[i] for i in indices], lr, compute, hyper)
        hyper_tensor = _hyper_tensor(
            (
                hyper["beta1"],
                1 - hyper["beta1"],
                hyper["beta2"],
                1 - hyper["beta2"],
                hyper["eps"],
                hyper["weight_decay"],
                box[0] if box is not None else 0.0,
                box[1] if box is not None else 0.0,
            ),
            compute,
            device,
        )
        itemsize = base.element_size()
        offset_table, size_table, owner, start, n_blocks = _launch_tables(
            pointers, numels, itemsize, device
        )
        if n_blocks == 0:
            continue
        aligned = all(a % 16 == 0 for a in pointers)
        wd = hyper["weight_decay"]
        _adabound_kernel[(n_blocks,)](
            base,
            offset_table,
            size_table,
            owner,
            start,
            coef,
            hyper_tensor,
            found_inf if found_inf is not None else coef,
            grad_scale if grad_scale is not None else coef,
            len(indices),
            DTYPE=_TL_DTYPES[dtype],
            COMPUTE=tl.float64 if compute == torch.float64 else tl.float32,
            IS_FP64=compute == torch.float64,
            AMSBOUND=amsbound,
            WEIGHT_DECAY=0 if wd == 0 else (2 if hyper["decoupled_weight_decay"] else 1),
            MAXIMIZE=maximize,
            EPS_USED=eps_used,
            HAS_BOX=box is not None,
            HAS_FOUND_INF=found_inf is not None,
            HAS_GRAD_SCALE=grad_scale is not None,
            VEC=16 // itemsize if aligned else 1,
            BLOCK=BLOCK,
            CHUNK=CHUNK,
            # No FMA contraction: same operation order and rounding as the CPU kernel.
            enable_fp_fusion=False,
        )
    if found_inf is not None:
        torch._foreach_sub_(state_steps, [found_inf] * len(state_steps))
    torch.autograd.graph.increment_version(params)


def _pointer_rows(indices, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs):
    """Addresses (0 for an absent max_exp_avg_sq), sizes, and the group's base tensor."""
    pointers: list[int] = []
    numels: list[int] = []
    base = None
    for i in indices:
        p, g, m, v = params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]
        vmax = max_exp_avg_sqs[i] if max_exp_avg_sqs is not None else None
        if p.is_complex():
            p, g, m, v = (torch.view_as_real(t) for t in (p, g, m, v))
            vmax = torch.view_as_real(vmax) if vmax is not None else None
        tensors = (p, g, m, v) if vmax is None else (p, g, m, v, vmax)
        if any(t.dtype != p.dtype for t in tensors) or any(t.device != p.device for t in tensors):
            raise RuntimeError(
                "fused AdaBound needs gradients and state of the parameter's dtype and device, "
                f"got a {p.dtype} parameter on {p.device} with a {g.dtype} gradient on {g.device}"
            )
        if not dense_layout(p) or any(t.stride() != p.stride() for t in tensors):
            raise RuntimeError(
                "fused AdaBound on CUDA needs each parameter, its gradient and its state in "
                "one dense memory layout; use fused=False for this parameter group"
            )
        if base is None:
            base = p
        addresses = [t.data_ptr() for t in tensors]
        if p.numel() and not all(addresses):  # a wrapper subclass that owns no storage
            raise RuntimeError(
                f"fused AdaBound cannot update a {type(p).__name__} without storage of its "
                "own (data_ptr() is 0); use fused=False"
            )
        if any(a % p.element_size() for a in addresses):
            raise RuntimeError("fused AdaBound got a tensor not aligned to its element size")
        pointers += addresses
        if vmax is None:
            pointers.append(0)
        numels.append(p.numel())
    return pointers, numels, base
