"""Independent float64 NumPy models of the comparators' updates, written from the papers'
equations as stated in each class's documentation (not from the torch code).

Each model is a function ``(params, grads_per_step, **hyper) -> params after every step``:
``params`` is a list of arrays, ``grads_per_step`` a list (one entry per step) of lists of
arrays shaped like ``params``.
"""

from __future__ import annotations

import numpy as np

Arrays = list[np.ndarray]


def adan(params: Arrays, grads: list[Arrays], *, lr, betas, eps, weight_decay) -> list[Arrays]:
    # Paper notation: the weights of the new terms.
    a1, a2, a3 = (1 - b for b in betas)
    x = [p.astype(np.float64).copy() for p in params]
    m = v = n = prev = None
    out = []
    for k, g in enumerate(grads):
        if k == 0:
            m, v, n = [gi.copy() for gi in g], [np.zeros_like(gi) for gi in g], [gi**2 for gi in g]
        else:
            diff = [gi - pi for gi, pi in zip(g, prev, strict=True)]
            m = [(1 - a1) * mi + a1 * gi for mi, gi in zip(m, g, strict=True)]
            v = (
                diff
                if k == 1
                else [(1 - a2) * vi + a2 * di for vi, di in zip(v, diff, strict=True)]
            )
            n = [
                (1 - a3) * ni + a3 * (gi + (1 - a2) * di) ** 2
                for ni, gi, di in zip(n, g, diff, strict=True)
            ]
        prev = [gi.copy() for gi in g]
        x = [
            (xi - lr / (np.sqrt(ni) + eps) * (mi + (1 - a2) * vi)) / (1 + weight_decay * lr)
            for xi, mi, vi, ni in zip(x, m, v, n, strict=True)
        ]
        out.append([xi.copy() for xi in x])
    return out


def adamssm(
    params: Arrays, grads: list[Arrays], *, lr, betas, pole, zero, eps, weight_decay
) -> list[Arrays]:
    """Adam whose second moment goes through (1-b2) z/(z-b2) * c (z-zero)/(z-pole); the bias
    correction divides by the same filter's step response, computed by convolution with
    its impulse response (a different route from the torch code's recursion)."""
    b1, b2 = betas
    c = (1 - pole) / (1 - zero)
    steps = len(grads)
    # Impulse response of the whole filter: Adam's (1-b2) b2^k convolved with the section's
    # c, c (pole - zero) pole^(k-1), ...
    adam_ir = (1 - b2) * b2 ** np.arange(steps)
    section_ir = np.array([c] + [c * (pole - zero) * pole ** (k - 1) for k in range(1, steps)])
    impulse = np.convolve(adam_ir, section_ir)[:steps]
    x = [p.astype(np.float64).copy() for p in params]
    m = [np.zeros_like(xi) for xi in x]
    squares: list[Arrays] = []
    out = []
    for t, g in enumerate(grads, start=1):
        g = [gi + weight_decay * xi for gi, xi in zip(g, x, strict=True)]
        squares.append([gi**2 for gi in g])
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g, strict=True)]
        # s_t = sum_j impulse[j] * g_{t-j}^2
        s = [sum(impulse[j] * squares[t - 1 - j][i] for j in range(t)) for i in range(len(x))]
        step_response = impulse[:t].sum()
        x = [
            xi - lr * (mi / (1 - b1**t)) / (np.sqrt(si / step_response) + eps)
            for xi, mi, si in zip(x, m, s, strict=True)
        ]
        out.append([xi.copy() for xi in x])
    return out


def delta_gclip(
    params: Arrays, grads: list[Arrays], *, lr, clip_norm, delta, weight_decay
) -> list[Arrays]:
    x = [p.astype(np.float64).copy() for p in params]
    out = []
    for g in grads:
        g = [gi + weight_decay * xi for gi, xi in zip(g, x, strict=True)]
        norm = np.sqrt(sum(float(np.sum(gi**2)) for gi in g))
        h = 0.0 if norm == 0 else lr * min(1.0, max(delta, clip_norm / norm))
        x = [xi - h * gi for xi, gi in zip(x, g, strict=True)]
        out.append([xi.copy() for xi in x])
    return out


def signum(params: Arrays, grads: list[Arrays], *, lr, momentum, weight_decay) -> list[Arrays]:
    x = [p.astype(np.float64).copy() for p in params]
    m = [np.zeros_like(xi) for xi in x]
    out = []
    for g in grads:
        g = [gi + weight_decay * xi for gi, xi in zip(g, x, strict=True)]
        m = [momentum * mi + (1 - momentum) * gi for mi, gi in zip(m, g, strict=True)]
        direction = m if momentum else g
        x = [xi - lr * np.sign(di) for xi, di in zip(x, direction, strict=True)]
        out.append([xi.copy() for xi in x])
    return out
