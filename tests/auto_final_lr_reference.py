"""final_lr="auto" in the PyTorch classes, step by step: the reference that the optax and
Keras ports are compared with (tests/test_optax.py, tests/test_keras.py).

The runs use gamma = 0.02, which caps the estimation at max(SETTLE_PATIENCE,
ceil(1/gamma)) = 100 steps, and go on past it, so the fixed estimate bounds their last
steps.
"""

from __future__ import annotations

import numpy as np

STEPS, GAMMA = 160, 0.02

# The estimate is an average of ratios of sums over every element. The ports form it in
# the parameters' dtype, PyTorch in float64: in float32 each of the ~100 averaged samples
# adds roundings of 6e-8 relative (observed: up to 6.3e-7). The parameters stay within the
# parity tests' tolerance: the bounds move by that much only where they clip.
FINAL_LR_TOL = {"float32": 1e-5, "float64": 1e-12}
PARAMS_TOL = {"float32": 1e-6, "float64": 1e-12}


def torch_run(cls, kwargs, params, grads, dtype, scheduler=None):
    """``cls(final_lr="auto", foreach=False, **kwargs)`` fed ``grads`` (name -> array of
    steps): the final_lr each step used (NaN for Adam's unclipped steps), the parameters
    after each step, and the param group at the end."""
    # Imported here: tests/keras_runs.py reads the constants above in processes that run
    # Keras on other backends and never load torch.
    import torch

    from dynabound.final_lr import final_lr_at

    dtype = getattr(torch, dtype)
    tensors = {k: torch.tensor(v, dtype=dtype, requires_grad=True) for k, v in params.items()}
    opt = cls(list(tensors.values()), final_lr="auto", foreach=False, **kwargs)
    sched = scheduler(opt) if scheduler is not None else None
    used, trajectory = [], []
    for t in range(len(next(iter(grads.values())))):
        for k, p in tensors.items():
            p.grad = torch.tensor(grads[k][t], dtype=dtype)
        value = final_lr_at(opt.param_groups[0], t + 1)
        used.append(np.nan if value is None else value)
        opt.step()
        if sched is not None:
            sched.step()
        trajectory.append({k: p.detach().numpy().copy() for k, p in tensors.items()})
    return np.array(used), trajectory, opt.param_groups[0]


def rel_err(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(a[k] - b[k])) / np.max(np.abs(b[k]))) for k in b)


def assert_runs_agree(expected, used, trajectory, fixed, dtype, initial) -> None:
    """A port's run (the final_lr each step used, parameters after each step, whether the
    estimate was fixed after each step) against :func:`torch_run`'s."""
    expected_used, expected_trajectory, group = expected
    record = group["final_lr_auto"]
    assert record["fixed_at"] is not None and record["fixed_at"] < len(expected_used)
    # Adam's unclipped step first, then the estimate: the same steps on both sides.
    assert np.isnan(expected_used[0]) and not np.isnan(expected_used[1:]).any()
    np.testing.assert_array_equal(np.isnan(used), np.isnan(expected_used))
    np.testing.assert_allclose(used[1:], expected_used[1:], rtol=FINAL_LR_TOL[dtype], atol=0)
    assert list(fixed).index(True) + 1 == record["fixed_at"]
    np.testing.assert_allclose(used[-1], group["final_lr"], rtol=FINAL_LR_TOL[dtype])
    # The run must have moved the parameters, or agreement would prove nothing.
    assert rel_err(expected_trajectory[-1], initial) > 1e-3
    errors = [rel_err(a, b) for a, b in zip(trajectory, expected_trajectory, strict=True)]
    assert max(errors) <= PARAMS_TOL[dtype]
