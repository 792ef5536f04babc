"""Neighbouring methods to compare AdaBound with: Adan, AdamSSM, delta-GClip, signSGD, Signum.

Each is a plain ``torch.optim.Optimizer`` written from its paper's update equations (cited
in each class), for the harness's comparisons; they live here rather than in the library.
Every hyperparameter is checked at construction and in ``add_param_group``: a bad value is
a ValueError naming it. Betas follow torch's convention throughout (the weight of the
past, so 0.9 averages over about ten steps); where a paper writes the weight of the new
term instead, the class says how its values map.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["COMPARATORS", "AdamSSM", "Adan", "DeltaGClip", "SignSGD", "Signum"]


def _check_range(name: str, value: float, low: float, high: float, *, high_open: bool = True):
    ok = low <= value < high if high_open else low <= value <= high
    if not (isinstance(value, int | float) and ok):
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must lie in [{low:g}, {high:g}{bracket}, got {value!r}")


def _check_positive(name: str, value: float, *, zero_ok: bool = False) -> None:
    ok = value >= 0 if zero_ok else value > 0
    if not (isinstance(value, int | float) and math.isfinite(value) and ok):
        raise ValueError(f"{name} must be {'0 or more' if zero_ok else 'positive'}, got {value!r}")


class _Checked(torch.optim.Optimizer):
    """Checks every param group's hyperparameters with :meth:`_check` (the constructor adds
    its groups through ``add_param_group`` too), and refuses gradients it cannot handle."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._check(merged)
        super().add_param_group(param_group)

    def _check(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    @staticmethod
    def _grad(p: Tensor, name: str) -> Tensor:
        grad = p.grad
        if grad is None:  # the steps skip such parameters before asking
            raise RuntimeError(f"{name}: a parameter without a gradient has nothing to step")
        if grad.is_sparse:
            raise RuntimeError(f"{name} does not support sparse gradients")
        if torch.is_complex(p):
            raise RuntimeError(f"{name} does not support complex parameters")
        return grad

    def _closure(self, closure: Callable[[], Any] | None) -> Any:
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()


class Adan(_Checked):
    """Adan: Xie, Zhou, Li, Lin, Yan, "Adan: Adaptive Nesterov Momentum Algorithm for Faster
    Optimizing Deep Models" (arXiv:2208.06677), Algorithm 1 without the optional restart.

    With the paper's beta_i written here as ``1 - beta_i`` (the paper's defaults 0.02, 0.08,
    0.01 are ``betas=(0.98, 0.92, 0.99)``), per element, with ``g_prev`` the previous
    gradient, Algorithm 1's lines 3-7 read::

        m = beta1 * m + (1 - beta1) * g                             # line 3
        v = beta2 * v + (1 - beta2) * (g - g_prev)                  # line 4
        n = beta3 * n + (1 - beta3) * (g + beta2 * (g - g_prev))**2 # line 5
        eta = lr / (sqrt(n) + eps)                                  # line 6
        p = (p - eta * (m + beta2 * v)) / (1 + weight_decay * lr)   # line 7

    The paper starts the moments from the first gradient (``m = g``, ``v = 0``,
    ``n = g**2``) and sets ``v = g - g_prev`` at the second step, instead of zeros and bias
    corrections; this follows the paper (its released code uses zeros with bias
    corrections, which differ in the first few hundred steps). Weight decay is the paper's
    proximal step of line 7.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(
            params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        )

    def _check(self, group: dict[str, Any]) -> None:
        _check_positive("lr", group["lr"])
        if len(group["betas"]) != 3:
            raise ValueError(f"Adan takes three betas, got {group['betas']!r}")
        for i, beta in enumerate(group["betas"], start=1):
            _check_range(f"beta{i}", beta, 0.0, 1.0)
        _check_positive("eps", group["eps"], zero_ok=True)
        _check_positive("weight_decay", group["weight_decay"], zero_ok=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = self._closure(closure)
        for group in self.param_groups:
            beta1, beta2, beta3 = group["betas"]
            lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = self._grad(p, "Adan")
                state = self.state[p]
                if not state:
                    state["step"] = 1
                    state["m"] = g.clone()
                    state["v"] = torch.zeros_like(g)
                    state["n"] = g * g
                    state["prev_grad"] = g.clone()
                else:
                    state["step"] += 1
                    diff = g - state["prev_grad"]
                    state["m"].lerp_(g, 1 - beta1)
                    if state["step"] == 2:
                        state["v"].copy_(diff)
                    else:
                        state["v"].lerp_(diff, 1 - beta2)
                    nesterov = g + beta2 * diff
                    state["n"].mul_(beta3).addcmul_(nesterov, nesterov, value=1 - beta3)
                    state["prev_grad"].copy_(g)
                direction = state["m"] + beta2 * state["v"]
                p.addcdiv_(direction, state["n"].sqrt().add_(eps), value=-lr)
                if decay:
                    p.div_(1 + decay * lr)
        return loss


class AdamSSM(_Checked):
    """AdamSSM: Adam with a pole-zero pair added to the second-moment filter, after
    Chakrabarti and Chopra, "A Control Theoretic Framework for Adaptive Gradient Optimizers
    in Machine Learning" (arXiv:2206.02034).

    The paper's exact update equations and default pole and zero could not be confirmed from
    its text; what is implemented is the form its abstract states: Adam's transfer function
    from squared gradients to the second moment, ``(1 - beta2) z / (z - beta2)``, times a
    pole-zero pair normalised to unit gain at z = 1, so that the second moment still
    estimates E[g**2]::

        V(z) / G2(z) = (1 - beta2) z / (z - beta2) * c (z - zero) / (z - pole),
        c = (1 - pole) / (1 - zero)

    in state-space form, per element::

        m = beta1 * m + (1 - beta1) * g                 # Adam's first moment
        u = beta2 * u + (1 - beta2) * g**2               # Adam's second moment
        s = pole * s + c * (u - zero * u_prev)           # the added pole-zero section
        p = p - lr * (m / b1(t)) / (sqrt(s / b2(t)) + eps)

    where ``b1(t) = 1 - beta1**t`` and ``b2(t)`` is the same filter's response to a constant
    input of 1 from step 1 (Adam's ``1 - beta2**t`` when ``zero == pole``). ``zero == pole``
    cancels the pair and gives Adam exactly. ``-1 < zero <= pole < 1`` keeps the impulse
    response, and so ``s``, non-negative. Weight decay is Adam's (added to the gradient).
    The defaults ``pole=0.9, zero=0.5`` are this implementation's choice, not the paper's.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        pole: float = 0.9,
        zero: float = 0.5,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        defaults = dict(
            lr=lr, betas=tuple(betas), pole=pole, zero=zero, eps=eps, weight_decay=weight_decay
        )
        super().__init__(params, defaults)

    def _check(self, group: dict[str, Any]) -> None:
        _check_positive("lr", group["lr"])
        if len(group["betas"]) != 2:
            raise ValueError(f"AdamSSM takes two betas, got {group['betas']!r}")
        for i, beta in enumerate(group["betas"], start=1):
            _check_range(f"beta{i}", beta, 0.0, 1.0)
        _check_range("pole", group["pole"], 0.0, 1.0)
        zero, pole = group["zero"], group["pole"]
        if not (isinstance(zero, int | float) and -1.0 < zero <= pole):
            raise ValueError(
                f"zero must lie in (-1, pole] = (-1, {pole:g}] so that the second moment "
                f"stays non-negative, got {zero!r}"
            )
        _check_positive("eps", group["eps"], zero_ok=True)
        _check_positive("weight_decay", group["weight_decay"], zero_ok=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = self._closure(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            pole, zero = group["pole"], group["zero"]
            gain = (1 - pole) / (1 - zero)
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = self._grad(p, "AdamSSM")
                if group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    # The filter's response to a constant 1, for the bias correction.
                    state["unit_u"], state["unit_s"] = 0.0, 0.0
                    for key in ("m", "u", "s"):
                        state[key] = torch.zeros_like(p)
                state["step"] += 1
                u_prev = state["u"].clone()
                state["m"].lerp_(g, 1 - beta1)
                state["u"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                state["s"].mul_(pole).add_(state["u"] - zero * u_prev, alpha=gain)
                unit_prev = state["unit_u"]
                state["unit_u"] = beta2 * unit_prev + (1 - beta2)
                state["unit_s"] = pole * state["unit_s"] + gain * (
                    state["unit_u"] - zero * unit_prev
                )
                m_hat = state["m"] / (1 - beta1 ** state["step"])
                denom = (state["s"].clamp(min=0) / state["unit_s"]).sqrt_().add_(group["eps"])
                p.addcdiv_(m_hat, denom, value=-group["lr"])
        return loss


class DeltaGClip(_Checked):
    """delta-regularized gradient clipping (delta-GClip): Tucat, Mukherjee, Sun, Sen,
    Rivasplata, "Regularized Gradient Clipping Provably Trains Wide and Deep Neural
    Networks" (TMLR 2025, arXiv:2404.08624), Definition 2 (the stochastic form, their
    Definition 5, uses the mini-batch gradient in the same rule)::

        h = lr * min(1, max(delta, clip_norm / ||g||))
        p = p - h * g

    with ``||g||`` the Euclidean norm of the whole gradient of a param group (all its
    tensors together), ``clip_norm`` the paper's gamma and ``delta`` the floor that makes it
    "regularized": the step is never below ``delta * lr`` times the gradient, unlike plain
    clipping (``delta = 0``). A zero gradient takes no step. Weight decay is added to the
    gradient before its norm is taken (the gradient of the L2-regularized loss). Defaults
    are the authors' ViT settings: lr 0.2, clip_norm 1.0, delta 1e-3.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.2,
        clip_norm: float = 1.0,
        delta: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        defaults = dict(lr=lr, clip_norm=clip_norm, delta=delta, weight_decay=weight_decay)
        super().__init__(params, defaults)

    def _check(self, group: dict[str, Any]) -> None:
        _check_positive("lr", group["lr"])
        _check_positive("clip_norm", group["clip_norm"])
        _check_range("delta", group["delta"], 0.0, 1.0, high_open=False)
        _check_positive("weight_decay", group["weight_decay"], zero_ok=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = self._closure(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = []
            for p in params:
                g = self._grad(p, "DeltaGClip")
                grads.append(g.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else g)
            norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
            if norm == 0.0:
                continue
            scale = min(1.0, max(group["delta"], group["clip_norm"] / norm))
            for p, g in zip(params, grads, strict=True):
                p.add_(g, alpha=-group["lr"] * scale)
        return loss


class Signum(_Checked):
    """Signum (sign of momentum): Bernstein, Wang, Azizzadenesheli, Anandkumar, "signSGD:
    Compressed Optimisation for Non-Convex Problems" (ICML 2018), Algorithm 1::

        m = momentum * m + (1 - momentum) * g
        p = p - lr * sign(m)

    ``momentum=0`` is signSGD (:class:`SignSGD`). Weight decay is added to the gradient
    before the sign. Every element moves by exactly ``lr`` (or not at all where the momentum
    is 0). Ma, Wu and E ("A Qualitative Study of the Dynamic Behavior of Adaptive Gradient
    Algorithms", arXiv:2009.06125) show sign descent is the limit of Adam as its learning
    rate goes to 0 with the betas fixed, which is why these belong next to the Adam family.
    Defaults: lr 1e-4 and momentum 0.9, the values the paper's large-scale experiments are
    reported with as far as could be confirmed (not from a table of defaults).
    """

    name = "Signum"

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    def _check(self, group: dict[str, Any]) -> None:
        _check_positive("lr", group["lr"])
        _check_range("momentum", group["momentum"], 0.0, 1.0)
        _check_positive("weight_decay", group["weight_decay"], zero_ok=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = self._closure(closure)
        for group in self.param_groups:
            momentum = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = self._grad(p, self.name)
                if group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                if momentum:
                    state = self.state[p]
                    if not state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    g = state["momentum_buffer"].lerp_(g, 1 - momentum)
                p.add_(torch.sign(g), alpha=-group["lr"])
        return loss


class SignSGD(Signum):
    """signSGD: ``p = p - lr * sign(g)`` (Bernstein et al. 2018, Algorithm 1); Signum
    without momentum. Default lr 1e-4, as :class:`Signum`."""

    name = "SignSGD"

    def __init__(self, params: Iterable[Any], lr: float = 1e-4, weight_decay: float = 0.0):
        super().__init__(params, lr=lr, momentum=0.0, weight_decay=weight_decay)

    def _check(self, group: dict[str, Any]) -> None:
        super()._check(group)
        if group["momentum"] != 0.0:
            raise ValueError("signSGD has no momentum; use Signum")


# name -> (class, display name, harness keys)
COMPARATORS: dict[str, tuple[type[torch.optim.Optimizer], str, frozenset[str]]] = {
    "adan": (Adan, "Adan", frozenset({"lr", "beta1", "beta2", "beta3", "eps", "weight_decay"})),
    "adamssm": (
        AdamSSM,
        "AdamSSM",
        frozenset({"lr", "beta1", "beta2", "pole", "zero", "eps", "weight_decay"}),
    ),
    "gclip": (DeltaGClip, "δ-GClip", frozenset({"lr", "clip_norm", "delta", "weight_decay"})),
    "signsgd": (SignSGD, "signSGD", frozenset({"lr", "weight_decay"})),
    "signum": (Signum, "Signum", frozenset({"lr", "momentum", "weight_decay"})),
}
