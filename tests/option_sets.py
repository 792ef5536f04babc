"""The option sets every backend is tested with, and the registry of backends that the
parity tests iterate.

``EVERY_OPTION`` maps a name to keyword arguments of :class:`dynabound.AdaBound`; together
they vary every field of :class:`dynabound.spec.StepSpec` that decides what a step computes
(``test_option_sets.py`` checks that, by field). ``BACKENDS`` maps each implementation of
the update to the option sets it does not implement, each with the reason. A parity test
takes its cases from :func:`cases`: every option set, with the declared gaps marked as
strict expected failures. So

* a new option set runs on every backend, and a backend that does not implement it fails
  by name, ``test_...[<option set>]`` in that backend's parity test, until it is
  implemented or declared here;
* a declared gap that a backend closes fails too (an unexpected pass) until its
  declaration goes.
"""

from __future__ import annotations

import pytest

# A bound function unlike the built-in schedules (tensor-friendly arithmetic only).
USER_BOUNDS = lambda t: (0.05 * (1 - 1 / (0.01 * t + 1)), 0.05 * (1 + 3 / (0.01 * t)))  # noqa: E731

EVERY_OPTION: dict[str, dict] = {
    "default": {},
    "amsbound": dict(amsbound=True),
    "coupled_wd": dict(weight_decay=0.1),
    "adamw_decay": dict(weight_decay=0.1, decoupled_weight_decay=True),
    "unscaled_decay": dict(weight_decay=0.1, decoupled_weight_decay=True, unscaled_decay=True),
    "maximize": dict(maximize=True),
    "paper": dict(bounds="paper"),
    "callable_bounds": dict(bounds=USER_BOUNDS),
    "box": dict(box=(-0.3, 0.25)),
    "everything": dict(amsbound=True, weight_decay=0.05, maximize=True, box=(-1.0, 1.0)),
    "lr_zero": dict(lr=0.0, base_lr=1e-2),
    "hyperparameters": dict(betas=(0.8, 0.99), final_lr=0.05, gamma=0.05, eps=1e-6),
}

_NO_MAXIMIZE = "no maximize option: negate the gradients (optax.scale(-1.0) before it)"
_NO_BOX = "no box option: project after the update (optax.projections)"
_NO_BOUND_FUNCTION = "bounds is 'reference' or 'paper': a bound function is not traceable"

# Backend -> {option set: why the backend does not implement it}.
BACKENDS: dict[str, dict[str, str]] = {
    "foreach": {},  # functional's multi-tensor path, bit for bit
    "fused_cpu": {},  # the C++ kernel, float32 and float64 parameters
    "fused_cpu_bf16_state": {},  # the C++ kernel's encoded loops, bfloat16 moments
    "fused_cpu_8bit_state": {},  # the C++ kernel's encoded loops, 8-bit moments
    "compiled": {},  # torch.compile: the fused kernel as one custom op
    "triton": {},  # the Triton kernel, in Triton's interpreter
    "triton_8bit_state": {},  # the encoded Triton kernel, in Triton's interpreter
    "fused_cuda": {},  # both Triton kernels on a GPU (tests/test_cuda.py)
    "optax": {
        "maximize": _NO_MAXIMIZE,
        "box": _NO_BOX,
        "callable_bounds": _NO_BOUND_FUNCTION,
        "everything": f"{_NO_MAXIMIZE}; {_NO_BOX}",
    },
    "keras": {
        "maximize": "no maximize option: minimise the negated loss",
        "box": "no box option: a kernel constraint projects after the update",
        "callable_bounds": _NO_BOUND_FUNCTION,
        "everything": "no maximize or box option",
    },
}


def cases(backend: str, extra: dict[str, dict] | None = None) -> list:
    """``pytest.param(name, options)`` for every option set (and ``extra`` ones), id'd by
    name; the option sets ``backend`` does not implement are strict expected failures."""
    gaps = BACKENDS[backend]
    params = []
    for name, options in (EVERY_OPTION | (extra or {})).items():
        marks = [pytest.mark.xfail(strict=True, reason=gaps[name])] if name in gaps else []
        params.append(pytest.param(name, options, id=name, marks=marks))
    return params
