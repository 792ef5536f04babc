"""AdaBound in a JAX training loop with optax, with a checkpoint and a resume.

A small MLP learns a synthetic regression with ``dynabound.optax.adabound`` under a
learning-rate schedule. ``base_learning_rate`` is the rate ``final_lr`` refers to (by
default the schedule's value at step 0; given here explicitly), and the bounds follow the
schedule as in PyTorch.

The same training runs twice: once straight through, once stopped half way after saving
the parameters, the optimizer state and the step to a file, and resumed from that file.
The optimizer state is an ordinary pytree (moments and step count), so the resumed run ends
with the same parameters, bit for bit.

Needs jax and optax (``python -m pip install ".[jax]"`` in the clone). Run
``python examples/optax_loop.py``.
"""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dynabound.optax import adabound

LR = 1e-2
# the learning rate falls to a tenth half way: the bounds fall with it
SCHEDULE = optax.piecewise_constant_schedule(LR, {60: 0.1})
# gamma is large so that the bounds have closed in on final_lr within these few steps
OPTIMIZER = adabound(SCHEDULE, final_lr=0.05, gamma=0.5, base_learning_rate=LR)
BATCH = 16


def init_params(key: jax.Array) -> dict:
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (4, 32)) * 0.5,
        "b1": jnp.zeros(32),
        "w2": jax.random.normal(k2, (32, 1)) * 0.2,
        "b2": jnp.zeros(1),
    }


def model(params: dict, x: jax.Array) -> jax.Array:
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


@jax.jit
def batch(step: int) -> tuple[jax.Array, jax.Array]:
    """The batch for ``step``: a function of the step alone, so a resumed run sees the same
    data as an uninterrupted one."""
    x = jax.random.normal(jax.random.PRNGKey(step), (BATCH, 4))
    y = jnp.sin(x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3]
    return x, y


@jax.jit
def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean((model(p, x) - y) ** 2))(params)
    updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train(params, opt_state, start: int, stop: int):
    """Steps ``start`` to ``stop - 1``; returns the new parameters and state and the losses."""
    losses = []
    for step in range(start, stop):
        params, opt_state, loss = train_step(params, opt_state, *batch(step))
        losses.append(float(loss))
    return params, opt_state, losses


def save(path: Path, params, opt_state, step: int) -> None:
    # jax.device_get turns every leaf into a numpy array, which pickles anywhere
    with open(path, "wb") as f:
        pickle.dump(jax.device_get({"params": params, "opt_state": opt_state, "step": step}), f)


def load(path: Path):
    with open(path, "rb") as f:
        saved = pickle.load(f)
    to_jax = lambda tree: jax.tree_util.tree_map(jnp.asarray, tree)  # noqa: E731
    return to_jax(saved["params"]), to_jax(saved["opt_state"]), saved["step"]


def main(steps: int = 120, workdir: str | Path | None = None) -> dict[str, dict]:
    """Train ``steps`` steps straight through, then again with a save and a resume half way;
    returns both runs' parameters and optimizer states, ``{"uninterrupted": {"params": ...,
    "opt_state": ...}, "resumed": {...}}``."""
    params = init_params(jax.random.PRNGKey(0))
    whole_params, whole_state, losses = train(params, OPTIMIZER.init(params), 0, steps)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(workdir or tmp) / "checkpoint.pkl"
        half_params, half_state, _ = train(params, OPTIMIZER.init(params), 0, steps // 2)
        save(checkpoint, half_params, half_state, steps // 2)
        del half_params, half_state  # from here on, only the file

        params, opt_state, start = load(checkpoint)
        resumed_params, resumed_state, _ = train(params, opt_state, start, steps)

    same = jax.tree_util.tree_map(
        lambda a, b: bool(np.array_equal(a, b)), whole_params, resumed_params
    )
    assert all(jax.tree_util.tree_leaves(same)), "the resumed run ended elsewhere"
    print(f"loss {losses[0]:.3f} at the first step, {losses[-1]:.3f} at step {steps}")
    return {
        "uninterrupted": {"params": whole_params, "opt_state": whole_state},
        "resumed": {"params": resumed_params, "opt_state": resumed_state},
    }


if __name__ == "__main__":
    main()
    print("resumed run equals the uninterrupted one")
