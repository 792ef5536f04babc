"""How sign-like an optimizer's update is: the sign-descent view of adaptive methods.

Ma, Wu and E ("A Qualitative Study of the Dynamic Behavior of Adaptive Gradient
Algorithms", arXiv:2009.06125) explain Adam's fast start by sign descent, the limit of Adam
as its learning rate goes to 0 with the betas fixed: every element moves by about ``lr``
against the sign of its gradient. AdaBound starts as Adam and ends as SGD, whose update is
the gradient itself; these measures show where a run sits between the two:

* ``sign_cosine``: the cosine between the update's descent direction ``-(p_new - p_old)``
  and ``sign(g)``. 1 for sign descent (``lr * sign(g)``); ``||g||_1 / (sqrt(n) ||g||_2)``,
  below 1 unless every element's gradient has the same size, for SGD.
* ``grad_cosine``: the cosine between that direction and ``g``; 1 for SGD.
* ``near_lr``: the fraction of elements whose step ``|p_new - p_old|`` lies within a factor
  of 2 of their group's ``lr`` (``lr / 2 <= |step| <= 2 lr``); 1 for sign descent.

``g`` is the gradient the optimizer was given (``p.grad``), over all elements of all
parameters that have one. :class:`SignMonitor` measures chosen steps of any optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["SIGN_KEYS", "SignMonitor", "sign_alignment"]

SIGN_KEYS = ("sign_cosine", "grad_cosine", "near_lr")


@torch.no_grad()
def sign_alignment(
    steps: Sequence[Tensor], grads: Sequence[Tensor], lrs: Sequence[float]
) -> dict[str, float]:
    """The three measures of one update: ``steps[i] = p_new - p_old`` of parameter ``i``,
    ``grads[i]`` its gradient, ``lrs[i]`` its group's learning rate. A cosine whose vectors
    include a zero one is NaN (no direction to compare)."""
    if not (len(steps) == len(grads) == len(lrs)) or not steps:
        raise ValueError("give one step, gradient and lr per parameter, at least one")
    dot_sign = dot_grad = step_sq = sign_sq = grad_sq = 0.0
    near = count = 0
    for step, grad, lr in zip(steps, grads, lrs, strict=True):
        descent = -step.double()
        g = grad.double()
        sign = torch.sign(g)
        dot_sign += float(torch.sum(descent * sign))
        dot_grad += float(torch.sum(descent * g))
        step_sq += float(torch.sum(descent * descent))
        sign_sq += float(torch.sum(sign * sign))
        grad_sq += float(torch.sum(g * g))
        size = descent.abs()
        near += int(torch.count_nonzero((size >= 0.5 * lr) & (size <= 2.0 * lr)))
        count += descent.numel()
    return {
        "sign_cosine": _cosine(dot_sign, step_sq, sign_sq),
        "grad_cosine": _cosine(dot_grad, step_sq, grad_sq),
        "near_lr": near / count,
    }


def _cosine(dot: float, a_sq: float, b_sq: float) -> float:
    return dot / math.sqrt(a_sq * b_sq) if a_sq > 0 and b_sq > 0 else math.nan


class SignMonitor:
    """Measure :func:`sign_alignment` on every ``every``-th step of ``optimizer``, and keep
    the mean of each measure over the steps measured (NaNs left out).

    Step hooks copy the parameters before a measured step and compare after it; between
    measured steps they only count. ``start`` is the number of steps already taken (a loop
    that resumes partway continues the same schedule), and :meth:`state_dict` /
    :meth:`load_state_dict` carry the running sums across such a resume. :meth:`summary`
    gives the means (NaN for a measure with no finite value) and the number of steps
    measured; :meth:`remove` detaches the hooks.
    """

    def __init__(self, optimizer: Optimizer, every: int = 1, *, start: int = 0) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.optimizer, self.every, self.calls = optimizer, every, int(start)
        self.sums = dict.fromkeys(SIGN_KEYS, 0.0)
        self.counts = dict.fromkeys(SIGN_KEYS, 0)
        self._before: list[tuple[Tensor, Tensor, float]] | None = None
        self._grads: list[Tensor] = []
        self._handles = [
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
        ]

    def _pre(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.calls += 1
        if self.calls % self.every:
            return
        self._before, self._grads = [], []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._before.append((p, p.detach().clone(), float(group["lr"])))
                    # Read before the step: some optimizers write into p.grad.
                    self._grads.append(p.grad.detach().clone())

    def _post(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if self._before is None:
            return
        before, self._before = self._before, None
        if not before:
            return
        steps = [p.detach() - old for p, old, _ in before]
        values = sign_alignment(steps, self._grads, [lr for _, _, lr in before])
        for key, value in values.items():
            if math.isfinite(value):
                self.sums[key] += value
                self.counts[key] += 1

    def summary(self) -> dict[str, float]:
        out = {
            key: self.sums[key] / self.counts[key] if self.counts[key] else math.nan
            for key in SIGN_KEYS
        }
        out["measured_steps"] = float(max(self.counts.values()))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])
        self.sums = {k: float(v) for k, v in state["sums"].items()}
        self.counts = {k: int(v) for k, v in state["counts"].items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> SignMonitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()
