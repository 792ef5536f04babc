"""The AdaBound update, eager PyTorch: one functional entry, single-tensor and foreach paths.

Both paths run the same sequence of operations, so they agree bit for bit on CPU:

    g    = -grad if maximize;  g += wd * p (coupled)  |  p *= 1 - lr*wd or 1 - wd (decoupled)
    m    = b1 * m + (1 - b1) * g
    v    = b2 * v + (1 - b2) * g * g;   u = max(vmax, v) (amsbound) else v
    rate = clamp(numerator * (1 / (sqrt(u) + eps)), lower, upper) * multiplier
    p   -= rate * m;                    p = clamp(p, *box) if box

with ``multiplier = lr * scale`` and the per-step scalars from
:func:`dynabound.bounds.step_coefficients`, put in range by
:func:`dynabound.bounds.within_range`.

float16 and bfloat16 tensors (complex32 through its float16 real view) are updated in
float32, as the fused kernels do: each stored value is read into float32 once, and p, m, v
and vmax are rounded once when stored. In float16 arithmetic ``(1 - b2) * g * g`` is 0 for
|g| below about 7.7e-3 (eps = 1e-8 is 0 too), so 1/sqrt(v) is inf and the rate jumps to
its upper bound. The state keeps the parameter's dtype, so a float16 v still stores such a
term as 0: each step sees it, but the next one has lost it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from . import final_lr as final_lr_rule
from . import state_formats as formats
from .bounds import (
    BoundsSpec,
    decoupled_decay_factor,
    no_bounds,
    step_coefficients_from,
    within_range,
)
from .kernels.layout import dense_in_any_order, local_shards
from .spec import StepSpec, StepTensors

__all__ = [
    "PendingSample",
    "adabound",
    "adabound_step",
    "estimating_step",
    "finish_estimating_step",
    "start_estimating_step",
]


def adabound(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    capturable: bool = False,
    differentiable: bool = False,
    has_complex: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    amsbound: bool,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    final_lr: float | str,
    base_lr: float,
    gamma: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    unscaled_decay: bool,
    bounds: BoundsSpec,
    box: tuple[float, float] | None,
    maximize: bool,
    state_dtype: torch.dtype | str | None = None,
    stochastic_rounding: bool = False,
    rounding_seeds: list[int] | None = None,
    final_lr_estimation: dict | None = None,
) -> float | None:
    """Apply one AdaBound/AMSBound step in place, like ``torch.optim._functional.adam``.

    ``state_steps`` are incremented here. ``max_exp_avg_sqs`` is only read with
    ``amsbound=True``. ``fused`` selects the fused kernels of :mod:`dynabound.kernels`;
    ``foreach`` the multi-tensor path; otherwise the single-tensor reference runs.

    ``state_dtype`` is the moments' format (:mod:`dynabound.state_formats`): with
    ``"8bit"`` each moment is a :class:`~dynabound.state_formats.Quantized` pair, with
    ``torch.bfloat16`` a bfloat16 tensor. ``stochastic_rounding`` rounds bfloat16
    parameters stochastically. ``rounding_seeds`` (one integer per parameter, default its
    index) seed the random bits of both; foreach falls back to the single-tensor path for
    them.

    ``final_lr="auto"`` estimates the SGD rate from the step itself
    (:mod:`dynabound.final_lr`): pass ``final_lr_estimation``, a record from
    :func:`dynabound.final_lr.new_estimation` that the caller keeps between steps (like the
    moments), and switch to the returned float once it is not None: the estimate, fixed.
    On a GPU this waits for the step's two sums; :func:`start_estimating_step` and
    :func:`finish_estimating_step` split the step from that read, as the optimizer classes
    do, so the read can wait until the next step.

    The keywords but ``foreach``, ``fused`` and ``final_lr_estimation`` are the fields of a
    :class:`~dynabound.spec.StepSpec`; this builds one and calls :func:`adabound_step` (or
    :func:`estimating_step`).
    """
    auto = isinstance(final_lr, str)
    if auto and final_lr != final_lr_rule.AUTO:
        raise ValueError(f"final_lr must be a number or 'auto', got {final_lr!r}")
    record = final_lr_estimation
    if auto and record is None:
        raise ValueError("final_lr='auto' needs final_lr_estimation (final_lr.new_estimation())")
    spec = StepSpec(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        final_lr=math.nan if auto else float(final_lr),
        base_lr=base_lr,
        gamma=gamma,
        eps=eps,
        weight_decay=weight_decay,
        amsbound=amsbound,
        decoupled_weight_decay=decoupled_weight_decay,
        unscaled_decay=unscaled_decay,
        maximize=maximize,
        bounds=bounds,
        box=box,
        stochastic_rounding=stochastic_rounding,
        capturable=capturable,
        differentiable=differentiable,
        has_complex=has_complex,
        state_dtype=state_dtype,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )
    tensors = StepTensors(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, rounding_seeds
    )
    if record is not None and auto:
        check_auto_final_lr(spec, params)
        return estimating_step(tensors, spec, record, foreach=foreach, fused=fused)
    adabound_step(tensors, spec, foreach=foreach, fused=fused)
    return None


def check_auto_final_lr(spec: StepSpec, params: list[Tensor]) -> None:
    """Refuse ``final_lr="auto"`` where it has no meaning or cannot be computed."""
    if callable(spec.bounds):
        raise ValueError(final_lr_rule.AUTO_WITH_BOUND_FUNCTION)
    if spec.bounds == "paper":
        raise ValueError(final_lr_rule.AUTO_WITH_PAPER_BOUNDS)
    if spec.capturable:
        raise ValueError(
            "final_lr='auto' does not support capturable=True: while estimating, each step "
            "reads two sums per group on the host"
        )
    if any(is_traceable_wrapper_subclass(p) for p in params):
        raise ValueError(
            "final_lr='auto' is not supported for DTensor parameters (FSDP2, tensor "
            "parallel): each rank sees only its shard of the projection; pass a number"
        )


class PendingSample(NamedTuple):
    """One estimating step's projection, on its way to the host.

    The step's device writes the two sums (and the step's number and lr where they live
    on the device too) into ``readings`` by a copy that may still be running; ``copied`` is
    the CUDA event recorded after it (None: the readings are on the host already).
    :func:`finish_estimating_step` waits for it and turns the readings into a sample, so a
    caller that holds the sample until the next step never stalls the device's queue."""

    readings: Tensor  # float64 [sum of d*d, sum of d*g, step?, lr?], on the host
    copied: Any  # torch.cuda.Event | None
    step: float | None  # the step's number when the host knew it, else readings[2]
    lr: float | None  # its lr when the host knew it, else the last reading
    spec: StepSpec
    dtype: torch.dtype  # the arithmetic dtype of the group's first parameter


def _host_value(value: Any) -> float | None:
    """``value`` as a float when reading it costs no device sync, else None."""
    if isinstance(value, Tensor):
        return float(value.item()) if value.device.type == "cpu" else None
    return float(value)


def start_estimating_step(
    tensors: StepTensors,
    spec: StepSpec,
    record: dict,
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> PendingSample:
    """One step of a group whose ``final_lr`` is being estimated: the step bounded by the
    current estimate (``record``, :func:`dynabound.final_lr.new_estimation`), its
    projection left on the way to the host. Give the result to
    :func:`finish_estimating_step` before the group's next step. ``spec.final_lr`` is
    ignored; the caller has refused what cannot be estimated (``check_auto_final_lr``)."""
    estimate = record["estimate"]
    if estimate is None:
        spec = spec._replace(final_lr=1.0, bounds=no_bounds)
    else:
        spec = spec._replace(final_lr=estimate)
    device = tensors.params[0].device
    readings = torch.zeros(4, dtype=torch.float64, device=device)
    adabound_step(tensors._replace(projection=readings[:2]), spec, foreach=foreach, fused=fused)
    step, lr = tensors.state_steps[0], spec.lr
    step_value, lr_value = _host_value(step), _host_value(lr)
    # What only the device knows travels with the sums: reading it here would wait.
    late = [
        v
        for v, known in ((step, step_value), (lr, lr_value))
        if isinstance(v, Tensor) and known is None
    ]
    for slot, value in enumerate(late, start=2):
        readings[slot].copy_(value.reshape(()))
    dtype = _arithmetic_dtype(tensors.params[0].dtype)
    host, copied = _send_to_host(readings)
    return PendingSample(host, copied, step_value, lr_value, spec, dtype)


def _send_to_host(readings: Tensor) -> tuple[Tensor, Any]:
    """``readings`` on the host, and the CUDA event after which they are there (None: they
    are there now). From a GPU they travel by a non-blocking copy into pinned memory, so
    the step does not wait for its kernels."""
    if readings.device.type == "cpu":
        return readings, None
    if readings.device.type != "cuda":  # no event to wait on: read now
        return readings.cpu(), None
    host = torch.empty(readings.shape, dtype=readings.dtype, pin_memory=True)
    host.copy_(readings, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(readings.device))  # where the copy was queued
    return host, copied


def finish_estimating_step(record: dict, pending: PendingSample) -> float | None:
    """Add the sample of a step started by :func:`start_estimating_step` to ``record``
    (waiting for its readings if they are still on the way). Returns the estimate once it
    is fixed, else None."""
    if pending.copied is not None:
        pending.copied.synchronize()
    squares, along, *late = pending.readings.tolist()
    step = int(pending.step if pending.step is not None else late.pop(0))
    lr = pending.lr if pending.lr is not None else late.pop(0)
    spec = pending.spec
    # The backends' Adam steps are per unit of lr * scale, scale after within_range.
    scale = float(within_range(step_coefficients_from(step, spec), pending.dtype, lr).scale)
    sample = spec.base_lr * scale * squares / along if along > 0 else math.nan
    cap = final_lr_rule.estimation_cap(spec.gamma)
    if final_lr_rule.record_sample(record, step, sample, spec.beta2, cap):
        return record["estimate"]
    return None


def estimating_step(
    tensors: StepTensors,
    spec: StepSpec,
    record: dict,
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> float | None:
    """:func:`start_estimating_step` and :func:`finish_estimating_step` at once: the step,
    then its sample added to ``record`` (on a GPU, after waiting for the step). Returns
    the estimate once it is fixed, else None."""
    pending = start_estimating_step(tensors, spec, record, foreach=foreach, fused=fused)
    return finish_estimating_step(record, pending)


def adabound_step(
    tensors: StepTensors, spec: StepSpec, *, foreach: bool | None = None, fused: bool | None = None
) -> None:
    """:func:`adabound` with the tensors and the step's hyperparameters and flags as one
    value each: what :meth:`dynabound.AdaBound.step` calls, once per param group."""
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if isinstance(spec.lr, Tensor) and spec.lr.dim() != 0:
        # A shape-(1,) lr must not broadcast 0-dim params to (1,).
        spec = spec._replace(lr=spec.lr.reshape(()))
    if not spec.amsbound and tensors.max_exp_avg_sqs:
        tensors = tensors._replace(max_exp_avg_sqs=[])  # read only by AMSBound
    if fused:
        from .kernels import fused_adabound

        fused_adabound(tensors, spec)
        return
    if spec.grad_scale is not None or spec.found_inf is not None:
        raise RuntimeError("grad_scale and found_inf are only supported by the fused paths")
    if spec.encodes(tensors.params):
        _single_tensor_encoded(tensors, spec)
    elif foreach:
        _multi_tensor_adabound(tensors, spec)
    else:
        _single_tensor_adabound(tensors, spec)


_LOW_PRECISION = (torch.float16, torch.bfloat16)
# What torch's foreach ops take (and those that return a new list give back a tuple).
_TensorList = list[Tensor] | tuple[Tensor, ...]
_FIELDS = ("numerator", "lower", "upper", "multiplier")


def _arithmetic_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype a parameter of ``dtype`` is updated in: its own, at least float32."""
    real = dtype.to_real()
    return torch.float32 if real in _LOW_PRECISION else real


class _Scalars(NamedTuple):
    """The scalars of one step for a list of tensors.

    Each of the first four fields is one value shared by every tensor (a float or a 0-dim
    tensor) or a list with one value per tensor, so foreach ops take the scalar overloads
    when steps agree and the list overloads when they do not.
    """

    numerator: Any
    lower: Any
    upper: Any
    multiplier: Any
    eps_used: bool

    @classmethod
    def of_fields(cls, fields: Iterable[Any], eps_used: bool) -> _Scalars:
        """The scalars from the first four fields, in order, and ``eps_used``."""
        numerator, lower, upper, multiplier = fields
        return cls(numerator, lower, upper, multiplier, eps_used)

    def of(self, i: int) -> tuple:
        return tuple(f[i] if isinstance(f, list) else f for f in self[:4])

    def take(self, indices: Sequence[int]) -> _Scalars:
        fields = ([f[i] for i in indices] if isinstance(f, list) else f for f in self[:4])
        return _Scalars.of_fields(fields, self.eps_used)

    def part(self, part: slice) -> _Scalars:
        fields = (f[part] if isinstance(f, list) else f for f in self[:4])
        return _Scalars.of_fields(fields, self.eps_used)


def _step_scalars(steps: list[Tensor], dtypes: list[torch.dtype], spec: StepSpec) -> _Scalars:
    """Scalars of the (already counted) steps of tensors updated in ``dtypes``."""
    if spec.capturable or torch.compiler.is_compiling():
        return _tensor_step_scalars(steps, dtypes, spec)
    # Eager steps live on the CPU: read each once and do the scalar math in Python, once per
    # distinct (step, dtype); every tensor of a group usually shares one.
    # A tensor lr stays one in the multiplier (it may require grad); its value picks the
    # rescaling of within_range.
    lr = spec.lr
    lr_value = lr.item() if isinstance(lr, Tensor) else lr
    keys = [(s.item(), d) for s, d in zip(steps, dtypes, strict=True)]
    rows = {}
    for key in keys:
        if key not in rows:
            c = _coefficients(key[0], key[1], spec, lr_value)
            rows[key] = (c.numerator, c.lower, c.upper, lr * c.scale, c.eps_used)
    eps_used = next(iter(rows.values()))[4]
    if len(rows) == 1:
        return _Scalars.of_fields(next(iter(rows.values()))[:4], eps_used)
    columns = zip(*(rows[key][:4] for key in keys), strict=True)
    return _Scalars.of_fields((list(column) for column in columns), eps_used)


def _tensor_step_scalars(
    steps: list[Tensor], dtypes: list[torch.dtype], spec: StepSpec
) -> _Scalars:
    # The steps of one device and arithmetic dtype form one vector, so a step costs a fixed
    # number of small tensor ops however many tensors there are (each 0-dim step through
    # the formulas on its own costs about fifteen), and never a host sync.
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, (step, dtype) in enumerate(zip(steps, dtypes, strict=True)):
        groups.setdefault((step.device, dtype), []).append(i)
    if len(groups) == 1:
        return _vector_scalars(steps, dtypes[0], spec)
    columns: list[list] = [[None] * len(steps) for _ in _FIELDS]
    for (_, dtype), indices in groups.items():
        scalars = _vector_scalars([steps[i] for i in indices], dtype, spec)
        for column, field in zip(columns, scalars[:4], strict=True):
            for j, i in enumerate(indices):
                column[i] = field[j] if isinstance(field, list) else field
    return _Scalars.of_fields(columns, scalars.eps_used)


def _vector_scalars(steps: list[Tensor], dtype: torch.dtype, spec: StepSpec) -> _Scalars:
    # In float64, as the eager steps' Python floats: float32 would overflow a relative bound
    # before within_range could rescale it. Then rounded to the arithmetic dtype, as every
    # use would round them, which lets one shared tensor take the fast foreach overload.
    step = torch.stack(steps)
    step = step.to(torch.float64 if step.device.type != "mps" else torch.float32)
    c = _coefficients(step, dtype, spec, spec.lr)
    fields = [c.numerator, c.lower, c.upper, spec.lr * c.scale]
    fields = [f.to(dtype) if isinstance(f, Tensor) else f for f in fields]
    return _Scalars.of_fields(
        (list(f.unbind()) if isinstance(f, Tensor) and f.dim() == 1 else f for f in fields),
        c.eps_used,
    )


def _coefficients(step, dtype, spec: StepSpec, lr):
    return within_range(step_coefficients_from(step, spec), dtype, lr)


def _single_tensor_adabound(tensors: StepTensors, spec: StepSpec) -> None:
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps = tensors[:6]
    amsbound = spec.amsbound
    for step_t in state_steps:
        step_t += 1
    dtypes = [_arithmetic_dtype(p.dtype) for p in params]
    scalars = _step_scalars(state_steps, dtypes, spec)
    for i, param in enumerate(params):
        grad, exp_avg, exp_avg_sq = grads[i], exp_avgs[i], exp_avg_sqs[i]
        max_exp_avg_sq = max_exp_avg_sqs[i] if amsbound else None
        if torch.is_complex(param):
            # Real and imaginary parts are independent coordinates, as in torch's Adam.
            param, grad = torch.view_as_real(param), torch.view_as_real(grad)
            exp_avg, exp_avg_sq = torch.view_as_real(exp_avg), torch.view_as_real(exp_avg_sq)
            if max_exp_avg_sq is not None:
                max_exp_avg_sq = torch.view_as_real(max_exp_avg_sq)
        stored = None
        if param.dtype in _LOW_PRECISION:
            stored = (param, exp_avg, exp_avg_sq, max_exp_avg_sq)
            param, grad, exp_avg, exp_avg_sq = (
                t.to(torch.float32) for t in (param, grad, exp_avg, exp_avg_sq)
            )
            if max_exp_avg_sq is not None:
                max_exp_avg_sq = max_exp_avg_sq.to(torch.float32)
        _update_tensor(
            param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, scalars.of(i), scalars.eps_used,
            spec, tensors.projection,
        )  # fmt: skip
        if stored is not None:
            for target, value in zip(
                stored, (param, exp_avg, exp_avg_sq, max_exp_avg_sq), strict=True
            ):
                if target is not None:
                    target.copy_(value)


def _update_tensor(
    param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, coefficients, eps_used, spec: StepSpec,
    projection: Tensor | None = None,
) -> None:  # fmt: skip
    """The element-wise update of one tensor in its arithmetic dtype, in place; adds the
    tensor's Adam-step sums to ``projection`` if given (:class:`~dynabound.spec.StepTensors`)."""
    amsbound, wd = spec.amsbound, spec.weight_decay
    beta1, beta2, eps, box = spec.beta1, spec.beta2, spec.eps, spec.box
    if spec.maximize:
        grad = -grad

    if wd != 0:
        if not spec.decoupled_weight_decay:
            grad = grad.add(param, alpha=wd)
        else:
            param.mul_(decoupled_decay_factor(spec.lr, wd, spec.unscaled_decay))

    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if amsbound:
        if spec.differentiable:
            # maximum saves its inputs for backward: compare against a copy, not the
            # state tensor that is overwritten next.
            second_moment = torch.maximum(max_exp_avg_sq.clone(), exp_avg_sq)
            max_exp_avg_sq.copy_(second_moment)
        else:
            torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            second_moment = max_exp_avg_sq
    else:
        second_moment = exp_avg_sq

    numerator, lower, upper, multiplier = coefficients
    denom = second_moment.sqrt()
    if eps_used:
        denom = denom + eps
    rate = denom.reciprocal() * numerator
    if projection is not None:
        _add_projection(projection, [rate * exp_avg], [grad])
    rate = rate.clamp(lower, upper) * multiplier
    param.addcmul_(rate, exp_avg, value=-1)
    if box is not None:
        param.clamp_(box[0], box[1])


def _single_tensor_encoded(tensors: StepTensors, spec: StepSpec) -> None:
    """The single-tensor step with moments in a low-precision format or stochastically
    rounded bfloat16 parameters: decode into float32, update, encode.

    Everything runs on 1-dim views in memory order, the order of the fused kernels' blocks
    and random bits. The random bits depend on the step's value, read on the host.
    """
    # A DTensor's shard is encoded on its own (dynabound.sharded_state).
    tensors = local_shards(tensors)
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, rounding_seeds = tensors[:7]
    amsbound, state_dtype = spec.amsbound, spec.state_dtype
    for step_t in state_steps:
        step_t += 1
    scalars = _step_scalars(state_steps, [torch.float32] * len(params), spec)
    for i, param in enumerate(params):
        if param.dtype.to_real() not in (torch.float32, *_LOW_PRECISION):
            raise RuntimeError(
                f"state_dtype={state_dtype!r} and stochastic rounding need float32, bfloat16 "
                f"or float16 parameters (complex64 too), got {param.dtype}"
            )
        if not dense_in_any_order(param):
            raise RuntimeError(
                "low-precision optimizer state needs parameters stored without gaps "
                "(contiguous, channels-last or any permutation of them)"
            )
        grad = grads[i]
        if grad.stride() != param.stride():
            grad = torch.empty_like(param).copy_(grad)  # in the parameter's memory order
        seed = rounding_seeds[i] if rounding_seeds is not None else i
        step = int(state_steps[i].item())
        moments = [exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i] if amsbound else None]
        stored_param = formats.memory_flat(param)
        work_param = stored_param.to(torch.float32, copy=True)
        work_grad = formats.memory_flat(grad).to(torch.float32)
        work_avg, work_avg_sq, work_max = (
            _read_moment(t, signed=k == 0) for k, t in enumerate(moments)
        )
        _update_tensor(
            work_param, work_grad, work_avg, work_avg_sq, work_max, scalars.of(i),
            scalars.eps_used, spec, tensors.projection,
        )  # fmt: skip
        bits = formats.random_bits(
            formats.step_key(seed, step, formats.STREAM_STATE), work_param.numel(), param.device
        )
        noise = (bits & 0xFFFF, bits >> 16, bits >> 16)  # exp_avg, exp_avg_sq, max_exp_avg_sq
        work = (work_avg, work_avg_sq, work_max)
        for k, (target, value) in enumerate(zip(moments, work, strict=True)):
            if target is not None and value is not None:
                _write_moment(target, value, noise[k], k == 0, state_dtype)
        if spec.stochastic_rounding and stored_param.dtype is torch.bfloat16:
            key = formats.step_key(seed, step, formats.STREAM_PARAM)
            param_noise = formats.random_bits(key, work_param.numel(), param.device) & 0xFFFF
            stored_param.copy_(formats.round_bfloat16(work_param, param_noise))
        else:
            stored_param.copy_(work_param)


def _read_moment(moment, signed: bool) -> Tensor | None:
    """A moment as a new 1-dim float32 tensor in memory order."""
    if moment is None:
        return None
    if isinstance(moment, formats.Quantized):
        return formats.decode(formats.memory_flat(moment.codes), moment.scales, signed)
    return formats.memory_flat(moment).to(torch.float32, copy=True)


def _write_moment(moment, value: Tensor, noise: Tensor, signed: bool, state_dtype) -> None:
    if isinstance(moment, formats.Quantized):
        codes, scales = formats.encode(value, signed, noise)
        formats.memory_flat(moment.codes).copy_(codes)
        moment.scales.copy_(scales)
    elif state_dtype is torch.bfloat16:  # stochastically, for bfloat16 parameters too
        formats.memory_flat(moment).copy_(formats.round_bfloat16(value, noise))
    else:  # the parameter's own dtype, rounded to nearest as without a state format
        formats.memory_flat(moment).copy_(value)


def _chunks(sizes: Sequence[int]) -> Iterator[slice]:
    """Consecutive slices whose total size stays within the largest single tensor.

    The foreach path allocates one temporary per tensor of a chunk, so this caps the
    extra memory of a step at the size of the largest parameter. float16 and bfloat16
    chunks are updated in float32 copies of p, g, m, v (and vmax) instead, the gradient's
    copy doubling as the temporary: at most 16 bytes per element of the largest parameter
    (AMSBound 20), eight (ten) times its own size.
    """
    budget = max(sizes, default=0)
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > budget:
            yield slice(start, i)
            start, total = i, 0
        total += size
    if start < len(sizes):
        yield slice(start, len(sizes))


def _multi_tensor_adabound(tensors: StepTensors, spec: StepSpec) -> None:
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps = tensors[:6]
    if not params:
        return
    amsbound, capturable = spec.amsbound, spec.capturable
    if isinstance(spec.lr, Tensor) and not capturable:
        spec = spec._replace(lr=spec.lr.item())
    lists = [params, grads, exp_avgs, exp_avg_sqs, state_steps]
    if amsbound:
        lists.append(max_exp_avg_sqs)
    grouped = _by_device_and_dtype(lists)
    for device_lists, _ in grouped:
        d_steps = device_lists[4]
        if not capturable and d_steps[0].is_cpu:
            torch._foreach_add_(d_steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
        else:
            torch._foreach_add_(d_steps, 1)
    dtypes = [_arithmetic_dtype(p.dtype) for p in params]
    scalars = _step_scalars(state_steps, dtypes, spec)

    for device_lists, indices in grouped:
        d_params, d_grads, d_avgs, d_avg_sqs = device_lists[:4]
        d_max = device_lists[5] if amsbound else []
        if spec.has_complex:
            d_params, d_grads, d_avgs, d_avg_sqs, d_max = (
                [torch.view_as_real(t) if torch.is_complex(t) else t for t in ts]
                for ts in (d_params, d_grads, d_avgs, d_avg_sqs, d_max)
            )
        d_scalars = scalars.take(indices)
        low_precision = d_params[0].dtype in _LOW_PRECISION
        for part in _chunks([p.numel() for p in d_params]):
            _multi_tensor_chunk(
                d_params[part],
                d_grads[part],
                d_avgs[part],
                d_avg_sqs[part],
                d_max[part] if amsbound else None,
                d_scalars.part(part),
                spec,
                low_precision=low_precision,
                projection=tensors.projection,
            )


def _by_device_and_dtype(
    lists: list[list[Tensor]],
) -> list[tuple[list[list[Tensor]], list[int]]]:
    """The lists split by the device and dtype of the first list's tensors, each part with
    the indices of its tensors."""
    # torch types the lists as holding None (optional state in its own optimizers); these
    # are whole lists of tensors, and grouping only reorders them.
    grouped = torch.utils._foreach_utils._group_tensors_by_device_and_dtype(
        cast(list[list[Tensor | None]], lists), with_indices=True
    )
    return cast(list[tuple[list[list[Tensor]], list[int]]], list(grouped.values()))


def _multi_tensor_chunk(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, scalars, spec, *, low_precision,
    projection=None,
) -> None:  # fmt: skip
    if not low_precision:
        _multi_tensor_update(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, scalars, spec, scratch=None,
            projection=projection,
        )  # fmt: skip
        return
    stored = (params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)
    work = [_float32_copies(ts) if ts is not None else None for ts in stored]
    grads = _float32_copies(grads)
    # The projection reads the step's gradients after the rates are formed: no scratch then.
    scratch = grads if projection is None else None
    _multi_tensor_update(
        work[0], grads, work[1], work[2], work[3], scalars, spec, scratch=scratch,
        projection=projection,
    )  # fmt: skip
    for targets, values in zip(stored, work, strict=True):
        if targets is not None and values is not None:
            _copy_(targets, values)


def _float32_copies(tensors: list[Tensor]) -> list[Tensor]:
    copies = [torch.empty_like(t, dtype=torch.float32) for t in tensors]
    _copy_(copies, tensors)
    return copies


def _copy_(targets: list[Tensor], sources: list[Tensor]) -> None:
    if is_traceable_wrapper_subclass(targets[0]) or is_traceable_wrapper_subclass(sources[0]):
        # DTensor (FSDP2) has no sharding rule for _foreach_copy_.
        for target, source in zip(targets, sources, strict=True):
            target.copy_(source)
    else:
        torch._foreach_copy_(targets, sources)


def _multi_tensor_update(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, scalars, spec: StepSpec, *, scratch,
    projection=None,
) -> None:  # fmt: skip
    # One temporary list at most: the modified gradient, reused as the rates. ``scratch``
    # is a list of gradients the caller owns, which can serve as that temporary.
    wd, beta1, beta2 = spec.weight_decay, spec.beta1, spec.beta2
    if spec.maximize:
        if scratch is None:
            grads = scratch = torch._foreach_neg(grads)
        else:
            torch._foreach_neg_(scratch)
    if wd != 0:
        if not spec.decoupled_weight_decay:
            if scratch is None:
                grads = scratch = torch._foreach_add(grads, params, alpha=wd)
            else:
                torch._foreach_add_(grads, params, alpha=wd)
        else:
            torch._foreach_mul_(params, decoupled_decay_factor(spec.lr, wd, spec.unscaled_decay))

    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    second_moments = exp_avg_sqs
    if max_exp_avg_sqs is not None:
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
        second_moments = max_exp_avg_sqs

    if scratch is None or projection is not None:  # the projection reads the gradients
        rates = torch._foreach_sqrt(second_moments)
    else:
        rates = scratch
        torch._foreach_zero_(rates)  # DTensor (FSDP2) has no sharding rule for _foreach_copy_
        torch._foreach_add_(rates, second_moments)
        torch._foreach_sqrt_(rates)
    if scalars.eps_used:
        torch._foreach_add_(rates, spec.eps)
    torch._foreach_reciprocal_(rates)
    _foreach_mul_(rates, scalars.numerator)
    if projection is not None:
        _add_projection(projection, torch._foreach_mul(rates, exp_avgs), grads)
    torch._foreach_clamp_min_(rates, _scalar_list(scalars.lower, rates))
    torch._foreach_clamp_max_(rates, _scalar_list(scalars.upper, rates))
    _foreach_mul_(rates, scalars.multiplier)
    torch._foreach_addcmul_(params, rates, exp_avgs, value=-1)
    if spec.box is not None:
        torch._foreach_clamp_min_(params, spec.box[0])
        torch._foreach_clamp_max_(params, spec.box[1])


def _add_projection(projection: Tensor, steps: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
    """Add ``sum(d*d)`` and ``sum(d*g)`` over the Adam steps ``d`` (unclipped, per unit of
    ``lr * scale``) and the gradients ``g`` to ``projection``, in float64."""
    with torch.no_grad():
        flat_steps = [d.detach().reshape(-1).to(torch.float64) for d in steps]
        flat_grads = [g.detach().reshape(-1).to(torch.float64) for g in grads]
        pairs = zip(flat_steps, flat_grads, strict=True)
        sums = torch.stack(
            [
                torch.stack([torch.dot(d, d) for d in flat_steps]).sum(),
                torch.stack([torch.dot(d, g) for d, g in pairs]).sum(),
            ]
        )
        projection.add_(sums.to(projection.device))


def _foreach_mul_(tensors: _TensorList, value) -> None:
    if isinstance(value, Tensor) and (
        value.device != tensors[0].device or value.dtype != tensors[0].dtype
    ):
        # The one-tensor overload would read a CPU scalar on the host (a graph would keep
        # that value) and take the slow route for another dtype.
        value = [value] * len(tensors)
    torch._foreach_mul_(tensors, value)


def _scalar_list(value, tensors: _TensorList):
    # The clamps have no overload for one tensor scalar.
    return [value] * len(tensors) if isinstance(value, Tensor) else value
