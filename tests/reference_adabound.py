"""Behavioural model of the authors' AdaBound 0.0.5 optimizer class, for tests only.

Written from the published algorithm (design.md section 2), keeping the reference's data
layout and its defects, because tests use it both as the numerical target and to show what
dynabound fixes:

* the base learning rates live on the optimizer object (``self.base_lrs``), computed once
  from the groups' ``lr`` at construction. ``torch.optim.Optimizer.__getstate__`` keeps only
  ``defaults``, ``state`` and ``param_groups``, so a deepcopied or unpickled copy has no
  ``base_lrs`` and its ``step`` raises ``AttributeError``;
* ``step`` pairs groups with ``base_lrs`` by ``zip``, so a group added by
  ``add_param_group`` after construction is silently never updated;
* a fresh optimizer built with a decayed lr takes that lr as its base, so a resumed run
  gets ``final_lr`` back at its undecayed size;
* ``gamma == 0`` is accepted and the upper bound divides by zero at the first step;
* ``state['step']`` is a Python int, and ``state_dict`` carries no base lr.

The update is computed the way the reference orders it: a Python-float step size, then
``full_like(denom, step_size) / denom``, clamped to absolute bounds, times ``exp_avg``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer


class ReferenceAdaBound(Optimizer):
    """The authors' ``adabound.AdaBound`` (coupled L2 weight decay, optional AMSBound)."""

    decoupled = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        final_lr: float = 0.1,
        gamma: float = 1e-3,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsbound: bool = False,
    ) -> None:
        # The reference's own checks: note that gamma == 0 passes.
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for index, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
        if not final_lr >= 0.0:
            raise ValueError(f"Invalid final learning rate: {final_lr}")
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"Invalid gamma parameter: {gamma}")
        defaults = dict(
            lr=lr,
            betas=betas,
            final_lr=final_lr,
            gamma=gamma,
            eps=eps,
            weight_decay=weight_decay,
            amsbound=amsbound,
        )
        super().__init__(params, defaults)
        self.base_lrs = [group["lr"] for group in self.param_groups]

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsbound", False)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # zip drops groups added after construction: the reference's add_param_group bug.
        for group, base_lr in zip(self.param_groups, self.base_lrs, strict=False):
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group, base_lr)
        return loss

    def _update(self, p: Tensor, group: dict[str, Any], base_lr: float) -> None:
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError(
                "Adam does not support sparse gradients, please consider SparseAdam instead"
            )
        amsbound = group["amsbound"]
        state = self.state[p]
        if len(state) == 0:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
            if amsbound:
                state["max_exp_avg_sq"] = torch.zeros_like(p)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t = state["step"]
        wd = group["weight_decay"]

        if wd != 0 and not self.decoupled:
            grad = grad.add(p, alpha=wd)
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if amsbound:
            max_exp_avg_sq = state["max_exp_avg_sq"]
            torch.max(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            denom = max_exp_avg_sq.sqrt().add_(group["eps"])
        else:
            denom = exp_avg_sq.sqrt().add_(group["eps"])

        step_size = group["lr"] * math.sqrt(1 - beta2**t) / (1 - beta1**t)
        final_lr = group["final_lr"] * group["lr"] / base_lr
        lower = final_lr * (1 - 1 / (group["gamma"] * t + 1))
        upper = final_lr * (1 + 1 / (group["gamma"] * t))
        update = torch.full_like(denom, step_size)
        update.div_(denom).clamp_(lower, upper).mul_(exp_avg)

        if wd != 0 and self.decoupled:
            # The unreleased AdaBoundW: the decay uses p from before the update, unscaled by lr.
            decay = p.mul(wd)
            p.add_(-update)
            p.sub_(decay)
        else:
            p.add_(-update)


class ReferenceAdaBoundW(ReferenceAdaBound):
    """The authors' unreleased ``AdaBoundW``: ``p -= step + weight_decay * p_old``."""

    decoupled = True


__all__ = ["ReferenceAdaBound", "ReferenceAdaBoundW"]
