"""The AdaBound update, eager PyTorch: one functional entry, single-tensor and foreach paths.

Both paths run the same sequence of operations, so they agree bit for bit on CPU:

    g    = -grad if maximize;  g += wd * p (coupled)  |  p *= 1 - lr*wd or 1 - wd (decoupled)
    m    = b1 * m + (1 - b1) * g
    v    = b2 * v + (1 - b2) * g * g;   u = max(vmax, v) (amsbound) else v
    rate = clamp(numerator * (1 / (sqrt(u) + eps)), lower, upper) * (lr * scale)
    p   -= rate * m;                    p = clamp(p, *box) if box

with the per-step scalars from :func:`dynabound.bounds.step_coefficients`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .bounds import BoundsSpec, decoupled_decay_factor, step_coefficients, within_range

__all__ = ["adabound"]


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
    final_lr: float,
    base_lr: float,
    gamma: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    unscaled_decay: bool,
    bounds: BoundsSpec,
    box: tuple[float, float] | None,
    maximize: bool,
) -> None:
    """Apply one AdaBound/AMSBound step in place, like ``torch.optim._functional.adam``.

    ``state_steps`` are incremented here. ``max_exp_avg_sqs`` is only read with
    ``amsbound=True``. ``fused`` selects the fused kernels of :mod:`dynabound.kernels`;
    ``foreach`` the multi-tensor path; otherwise the single-tensor reference runs.
    """
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if isinstance(lr, Tensor) and lr.dim() != 0:
        lr = lr.reshape(())  # a shape-(1,) lr must not broadcast 0-dim params to (1,)
    hyper = dict(
        amsbound=amsbound,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        final_lr=final_lr,
        base_lr=base_lr,
        gamma=gamma,
        eps=eps,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        unscaled_decay=unscaled_decay,
        bounds=bounds,
        box=box,
        maximize=maximize,
    )
    tensors = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
    if fused:
        from .kernels import fused_adabound

        fused_adabound(
            *tensors,
            capturable=capturable,
            has_complex=has_complex,
            grad_scale=grad_scale,
            found_inf=found_inf,
            **hyper,
        )
        return
    if grad_scale is not None or found_inf is not None:
        raise RuntimeError("grad_scale and found_inf are only supported by the fused paths")
    if foreach:
        _multi_tensor_adabound(*tensors, capturable=capturable, has_complex=has_complex, **hyper)
    else:
        _single_tensor_adabound(
            *tensors, capturable=capturable, differentiable=differentiable, **hyper
        )


def _coefficients(step, dtype, *, bounds, final_lr, base_lr, gamma, beta1, beta2, **_):
    c = step_coefficients(
        step,
        bounds=bounds,
        final_lr=final_lr,
        base_lr=base_lr,
        gamma=gamma,
        beta1=beta1,
        beta2=beta2,
    )
    return within_range(c, dtype)


def _step_value(step_t: Tensor, capturable: bool) -> float | Tensor:
    # Capturable (and compiled) steps keep every scalar a tensor, so no host sync happens;
    # eager steps read the CPU step counter once and do the scalar math in Python.
    if capturable or torch.compiler.is_compiling():
        return step_t
    return step_t.item()


def _single_tensor_adabound(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    state_steps,
    *,
    capturable: bool,
    differentiable: bool,
    **hyper,
) -> None:
    amsbound, lr, wd = hyper["amsbound"], hyper["lr"], hyper["weight_decay"]
    beta1, beta2, eps, box = hyper["beta1"], hyper["beta2"], hyper["eps"], hyper["box"]
    for i, param in enumerate(params):
        grad = grads[i] if not hyper["maximize"] else -grads[i]
        exp_avg, exp_avg_sq, step_t = exp_avgs[i], exp_avg_sqs[i], state_steps[i]
        max_exp_avg_sq = max_exp_avg_sqs[i] if amsbound else None
        if torch.is_complex(param):
            # Real and imaginary parts are independent coordinates, as in torch's Adam.
            param, grad = torch.view_as_real(param), torch.view_as_real(grad)
            exp_avg, exp_avg_sq = torch.view_as_real(exp_avg), torch.view_as_real(exp_avg_sq)
            if amsbound:
                max_exp_avg_sq = torch.view_as_real(max_exp_avg_sq)

        step_t += 1
        step = _step_value(step_t, capturable)

        if wd != 0:
            if not hyper["decoupled_weight_decay"]:
                grad = grad.add(param, alpha=wd)
            else:
                param.mul_(decoupled_decay_factor(lr, wd, hyper["unscaled_decay"]))

        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if amsbound:
            if differentiable:
                # maximum saves its inputs for backward: compare against a copy, not the
                # state tensor that is overwritten next.
                second_moment = torch.maximum(max_exp_avg_sq.clone(), exp_avg_sq)
                max_exp_avg_sq.copy_(second_moment)
            else:
                torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
                second_moment = max_exp_avg_sq
        else:
            second_moment = exp_avg_sq

        c = _coefficients(step, param.dtype, **hyper)
        denom = second_moment.sqrt()
        if c.eps_used:
            denom = denom + eps
        rate = denom.reciprocal() * c.numerator
        rate = rate.clamp(c.lower, c.upper) * (lr * c.scale)
        param.addcmul_(rate, exp_avg, value=-1)
        if box is not None:
            param.clamp_(box[0], box[1])


def _chunks(sizes: Sequence[int]) -> Iterator[slice]:
    """Consecutive slices whose total size stays within the largest single tensor.

    The foreach path allocates one temporary per tensor of a chunk, so this caps the
    extra memory of a step at the size of the largest parameter.
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


def _multi_tensor_adabound(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    state_steps,
    *,
    capturable: bool,
    has_complex: bool,
    **hyper,
) -> None:
    if not params:
        return
    amsbound, lr, wd = hyper["amsbound"], hyper["lr"], hyper["weight_decay"]
    beta1, beta2, eps, box = hyper["beta1"], hyper["beta2"], hyper["eps"], hyper["box"]
    if isinstance(lr, Tensor) and not capturable:
        lr = lr.item()
    lists = [params, grads, exp_avgs, exp_avg_sqs, state_steps]
    if amsbound:
        lists.append(max_exp_avg_sqs)
    grouped = torch.utils._foreach_utils._group_tensors_by_device_and_dtype(lists)
    for device_lists, _ in grouped.values():
        d_params, d_grads, d_avgs, d_avg_sqs, d_steps = device_lists[:5]
        d_max = device_lists[5] if amsbound else []
        if has_complex:
            d_params, d_grads, d_avgs, d_avg_sqs, d_max = (
                [torch.view_as_real(t) if torch.is_complex(t) else t for t in ts]
                for ts in (d_params, d_grads, d_avgs, d_avg_sqs, d_max)
            )

        if not capturable and d_steps[0].is_cpu:
            torch._foreach_add_(d_steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
        else:
            torch._foreach_add_(d_steps, 1)
        dtype = d_params[0].dtype
        coeffs = [_coefficients(_step_value(s, capturable), dtype, **hyper) for s in d_steps]

        for part in _chunks([p.numel() for p in d_params]):
            _multi_tensor_chunk(
                d_params[part],
                d_grads[part],
                d_avgs[part],
                d_avg_sqs[part],
                d_max[part] if amsbound else None,
                coeffs[part],
                lr=lr,
                wd=wd,
                beta1=beta1,
                beta2=beta2,
                eps=eps,
                box=box,
                maximize=hyper["maximize"],
                decoupled=hyper["decoupled_weight_decay"],
                unscaled_decay=hyper["unscaled_decay"],
            )


def _multi_tensor_chunk(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, coeffs, *, lr, wd, beta1, beta2,
    eps, box, maximize, decoupled, unscaled_decay,
) -> None:  # fmt: skip
    # One temporary list at most: the modified gradient, reused as the denominator.
    scratch = None
    if maximize:
        grads = scratch = torch._foreach_neg(grads)
    if wd != 0:
        if not decoupled:
            if scratch is None:
                grads = scratch = torch._foreach_add(grads, params, alpha=wd)
            else:
                torch._foreach_add_(grads, params, alpha=wd)
        else:
            torch._foreach_mul_(params, decoupled_decay_factor(lr, wd, unscaled_decay))

    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    second_moments = exp_avg_sqs
    if max_exp_avg_sqs is not None:
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
        second_moments = max_exp_avg_sqs

    if scratch is None:
        rates = torch._foreach_sqrt(second_moments)
    else:
        rates = scratch
        torch._foreach_zero_(rates)  # DTensor (FSDP2) has no sharding rule for _foreach_copy_
        torch._foreach_add_(rates, second_moments)
        torch._foreach_sqrt_(rates)
    if coeffs[0].eps_used:
        torch._foreach_add_(rates, eps)
    torch._foreach_reciprocal_(rates)
    torch._foreach_mul_(rates, [c.numerator for c in coeffs])
    torch._foreach_clamp_min_(rates, [c.lower for c in coeffs])
    torch._foreach_clamp_max_(rates, [c.upper for c in coeffs])
    torch._foreach_mul_(rates, [lr * c.scale for c in coeffs])
    torch._foreach_addcmul_(params, rates, exp_avgs, value=-1)
    if box is not None:
        torch._foreach_clamp_min_(params, box[0])
        torch._foreach_clamp_max_(params, box[1])
