"""The Keras side of tests/test_keras.py, run on one backend in a process of its own.

Keras fixes its backend when it is first imported (``KERAS_BACKEND``), so each backend
runs this file as a script: ``python keras_runs.py BACKEND OUT.pkl``. It trains, saves,
loads and builds the optimizers and pickles what it saw (parameters, accuracies, error
messages, configs); the tests compare that with the PyTorch optimizers in the pytest
process. Importing this module (for the shared cases and data) does not import Keras.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pickle
import sys
import tempfile
from pathlib import Path
from typing import Any

import auto_final_lr_reference as auto
import numpy as np

STEPS = 1000
SHAPES = {"b": (6,), "w": (6, 5)}

# Keras-spelled keyword arguments; to_torch() gives the PyTorch class's.
CUSTOM = dict(final_lr=0.05, gamma=1e-2, epsilon=1e-6)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "adabound": ("AdaBound", {}),
    "amsbound": ("AMSBound", {}),
    "adaboundw": ("AdaBoundW", dict(weight_decay=0.01)),
    "amsboundw": ("AMSBoundW", dict(weight_decay=0.01)),
    "adabound_l2": ("AdaBound", dict(weight_decay=0.05)),
    "amsbound_l2": ("AMSBound", dict(weight_decay=0.05)),
    "amsboundw_unscaled": ("AMSBoundW", dict(weight_decay=1e-4, unscaled_decay=True)),
    "custom": ("AdaBound", dict(learning_rate=3e-3, beta_1=0.8, beta_2=0.99, **CUSTOM)),
    "paper": ("AdaBound", dict(bounds="paper")),
}
FLOAT64_CASES = ("adabound", "amsbound_l2", "adaboundw", "amsboundw")

# Each schedule as Keras spells it and as PyTorch does (a scheduler, or group["lr"] set
# by hand at step 500 as optimizer.learning_rate is in Keras).
SCHEDULES: dict[str, tuple[str, dict[str, Any]]] = {
    "step": ("AMSBound", dict(weight_decay=0.01)),
    "exponential": ("AdaBoundW", dict(weight_decay=0.01)),
    "by_hand": ("AdaBound", {}),
}
BY_HAND_STEP, BY_HAND_LR = 500, 1e-4

# Hyperparameters that must be refused, and what the message must say.
INVALID: dict[str, tuple[dict[str, Any], str]] = {
    "lr": (dict(learning_rate=-0.1), r"Invalid learning rate: -0\.1"),
    "final_lr": (dict(final_lr=-0.1), r"Invalid final learning rate: -0\.1"),
    "zero_final_lr": (
        dict(final_lr=0.0),
        r"Invalid final learning rate: 0\.0 \(must be > 0: both bounds are proportional to it, "
        "so 0 clips every step's rate to 0 and no parameter ever moves",
    ),
    "gamma": (dict(gamma=0.0), r"Invalid gamma \(convergence speed\): 0\.0 \(must be > 0\)"),
    "beta_1": (dict(beta_1=1.0), r"Invalid beta_1 parameter: 1\.0"),
    "beta_2": (dict(beta_2=-0.1), r"Invalid beta_2 parameter: -0\.1"),
    "epsilon": (dict(epsilon=-1e-8), r"Invalid epsilon value: -1e-08"),
    "weight_decay": (dict(weight_decay=-1e-4), r"Invalid weight_decay value: -0\.0001"),
    "base_lr": (dict(base_learning_rate=0.0), r"Invalid base_learning_rate: 0\.0 \(must be > 0"),
    "bounds": (dict(bounds="tight"), r"bounds must be 'reference' or 'paper'"),
    "zero_lr": (dict(learning_rate=0.0), r"pass base_learning_rate"),
    "warmup": ("warmup", r"pass base_learning_rate"),
}


# Sparse gradients (an embedding table "e" whose gradient has a few rows, beside a dense
# "w"): each case runs once with the backend's sparse gradients and once with the dense
# ones they stand for, and the two must agree bit for bit.
SPARSE_STEPS, SPARSE_ROWS, SPARSE_SHAPES = 30, 6, {"e": (10, 4), "w": (6, 5)}
SPARSE_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "adabound": ("AdaBound", {}),
    "amsbound": ("AMSBound", {}),
    "adaboundw": ("AdaBoundW", dict(weight_decay=0.01)),
    "amsbound_l2": ("AMSBound", dict(weight_decay=0.05)),
    "amsboundw_unscaled": ("AMSBoundW", dict(weight_decay=1e-3, unscaled_decay=True)),
    "paper": ("AdaBound", dict(bounds="paper")),
    # Keras-side options, applied to the gradient before the step
    "clipnorm": ("AdaBound", dict(clipnorm=0.5)),
    "clipvalue": ("AMSBound", dict(clipvalue=0.3)),
    "global_clipnorm": ("AdaBoundW", dict(weight_decay=0.01, global_clipnorm=0.5)),
    "accumulation": ("AMSBound", dict(weight_decay=0.05, gradient_accumulation_steps=3)),
    "accumulation_clipnorm": ("AdaBoundW", dict(gradient_accumulation_steps=2, clipnorm=0.5)),
    "loss_scale_factor": ("AdaBound", dict(loss_scale_factor=8.0)),
    "loss_scale_optimizer": ("AMSBoundW", dict(weight_decay=0.01)),  # wrapped, see _sparse
}
# The cases whose step is the PyTorch class's fed the dense gradients.
SPARSE_TORCH_CASES = ("adabound", "amsbound", "adaboundw", "amsbound_l2", "amsboundw_unscaled")
# Also run compiled with XLA (TensorFlow, JAX), which may fuse the densification into the
# step and round differently: there they agree to float rounding, not bit for bit.
SPARSE_XLA_CASES = ("amsbound_l2", "accumulation_clipnorm", "loss_scale_optimizer")


def sparse_gradients(seed: int = 2) -> dict[str, Any]:
    """Per step, the rows of "e" that have a gradient (one of them twice, as a token seen
    twice in a batch; Keras and PyTorch sum duplicates) with their values, and the dense
    gradients: "e" summed in NumPy, "w" as drawn, all float32. With at most two entries
    per row, any summation order gives the same float32 sum, so the dense gradients are
    exactly what any backend's densification gives. Four or more of the ten rows have no
    gradient at each step."""
    rng = np.random.default_rng(seed)
    rows = SPARSE_SHAPES["e"][0]
    indices, values = [], []
    dense = {k: np.zeros((SPARSE_STEPS, *s), "float32") for k, s in SPARSE_SHAPES.items()}
    for t in range(SPARSE_STEPS):
        distinct = rng.choice(rows, SPARSE_ROWS - 1, replace=False)
        index = rng.permutation(np.append(distinct, distinct[0]))
        value = rng.standard_normal((SPARSE_ROWS, SPARSE_SHAPES["e"][1]))
        value = (value * 10.0 ** rng.uniform(-4, 0, size=value.shape)).astype("float32")
        np.add.at(dense["e"][t], index, value)
        indices.append(index)
        values.append(value)
    dense["w"] = (rng.standard_normal(dense["w"].shape) * 0.1).astype("float32")
    return {"indices": np.array(indices), "values": np.array(values), "dense": dense}


def sparse_initial() -> dict[str, np.ndarray]:
    params = initial()
    params["e"] = np.random.default_rng(3).standard_normal(SPARSE_SHAPES["e"])
    return {k: params[k].astype("float32") for k in SPARSE_SHAPES}


def to_torch(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The PyTorch class's keyword arguments for Keras-spelled ones."""
    out = dict(kwargs)
    renames = {"learning_rate": "lr", "epsilon": "eps", "base_learning_rate": "base_lr"}
    for keras_name, torch_name in renames.items():
        if keras_name in out:
            out[torch_name] = out.pop(keras_name)
    if "beta_1" in out or "beta_2" in out:
        out["betas"] = (out.pop("beta_1", 0.9), out.pop("beta_2", 0.999))
    return out


def to_keras(options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The dynabound.keras class and Keras-spelled keyword arguments for keyword arguments
    of dynabound.AdaBound. Options Keras has no counterpart for are passed on as they are,
    so that they fail."""
    out = dict(options)
    renames = {"lr": "learning_rate", "eps": "epsilon", "base_lr": "base_learning_rate"}
    for torch_name, keras_name in renames.items():
        if torch_name in out:
            out[keras_name] = out.pop(torch_name)
    if "betas" in out:
        out["beta_1"], out["beta_2"] = out.pop("betas")
    return "AdaBound", out


# The option sets of the registry (tests/option_sets.py), steps of each run.
REGISTRY_STEPS = 300


def _registry(runner, dbk, out) -> None:
    """Every option set of the registry in float32: the run, or why it failed."""
    from option_sets import EVERY_OPTION

    params = initial()
    grads = {k: g[:REGISTRY_STEPS] for k, g in gradients().items()}
    for name, options in EVERY_OPTION.items():
        cls, kwargs = to_keras(options)
        try:
            optimizer = getattr(dbk, cls)(**kwargs)
            out["registry", name] = runner.run(optimizer, params, grads, "float32")
        except Exception as exc:  # an option this backend does not implement
            out["registry", name] = f"{type(exc).__name__}: {exc}"


def gradients(steps: int = STEPS, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-element scales spread over 1e-6..1: elements sit below, inside and above the
    bounds (the sequence of tests/test_optax.py)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in SHAPES.items():
        scale = 10.0 ** rng.uniform(-6, 0, size=shape)
        out[name] = rng.standard_normal((steps, *shape)) * scale
    return out


def initial(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s) for k, s in SHAPES.items()}


def digits() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    # Shuffled: the file's last few hundred digits come from other writers than the rest.
    order = np.random.default_rng(0).permutation(len(x))
    x, y = (x[order] / 16.0).astype("float32"), y[order]
    return x[:1500], y[:1500], x[1500:], y[1500:]


class _Runner:
    """Applies a gradient sequence with a Keras optimizer: on JAX one jitted scan over
    ``stateless_apply`` (compiled once), elsewhere ``optimizer.apply`` step by step."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def run(self, opt, params, grads, dtype, split=None):
        import keras

        names = list(params)
        variables = [keras.Variable(params[k].astype(dtype), name=k) for k in names]
        opt.build(variables)
        sequence = [grads[k].astype(dtype) for k in names]
        cut = split[0] if split else len(sequence[0])
        self._apply(opt, variables, [g[:cut] for g in sequence])
        if split:
            split[1](opt)
            self._apply(opt, variables, [g[cut:] for g in sequence])
        return {k: keras.ops.convert_to_numpy(v) for k, v in zip(names, variables, strict=True)}

    def _apply(self, opt, variables, sequence):
        import keras

        if self.backend == "jax":
            import jax

            @jax.jit
            def scan(trainable, state, gs):
                def body(carry, g):
                    return opt.stateless_apply(carry[1], list(g), carry[0]), None

                return jax.lax.scan(body, (trainable, state), gs)[0]

            trainable, state = scan(
                [v.value for v in variables], [v.value for v in opt.variables], sequence
            )
            for v, value in zip(variables + opt.variables, trainable + state, strict=True):
                v.assign(value)
            return
        sequence = [keras.ops.convert_to_tensor(g) for g in sequence]
        if self.backend == "tensorflow":
            import tensorflow as tf

            # One compiled loop, as model.fit compiles its step (eagerly, a step is ~100
            # small ops one by one and the runs take minutes).
            @tf.function(jit_compile=True)
            def loop(gs):
                for t in tf.range(tf.shape(gs[0])[0]):
                    opt.apply([g[t] for g in gs], variables)

            loop(sequence)
            return
        if self.backend == "torch":
            import torch

            with torch.no_grad():
                for t in range(sequence[0].shape[0]):
                    opt.apply([g[t] for g in sequence], variables)
        else:
            for t in range(sequence[0].shape[0]):
                opt.apply([g[t] for g in sequence], variables)


def _schedule(name: str):
    import keras

    schedules = keras.optimizers.schedules
    if name == "step":  # StepLR(step_size=300, gamma=0.1)
        return schedules.PiecewiseConstantDecay([299, 599, 899], [1e-3, 1e-4, 1e-5, 1e-6])
    if name == "exponential":  # LambdaLR(lambda t: 0.5 ** (t / 100))
        return schedules.ExponentialDecay(1e-3, decay_steps=100, decay_rate=0.5)
    return 1e-3


def _parity(runner, dbk, out) -> None:
    import keras

    params, grads = initial(), gradients()
    for case, (cls, kwargs) in CASES.items():
        out["parity", case, "float32"] = runner.run(
            getattr(dbk, cls)(**kwargs), params, grads, "float32"
        )
    for name, (cls, kwargs) in SCHEDULES.items():
        opt = getattr(dbk, cls)(learning_rate=_schedule(name), **kwargs)
        split = None
        if name == "by_hand":

            def split_fn(o):
                o.learning_rate = BY_HAND_LR

            split = (BY_HAND_STEP, split_fn)
        out["schedule", name] = runner.run(opt, params, grads, "float32", split)
    with _float64(runner.backend):
        keras.config.set_floatx("float64")
        try:
            for case in FLOAT64_CASES:
                cls, kwargs = CASES[case]
                out["parity", case, "float64"] = runner.run(
                    getattr(dbk, cls)(**kwargs), params, grads, "float64"
                )
        finally:
            keras.config.set_floatx("float32")


class _float64:
    def __init__(self, backend: str) -> None:
        self.backend = backend

    def __enter__(self):
        if self.backend == "jax":
            import jax

            self.previous = jax.config.jax_enable_x64
            jax.config.update("jax_enable_x64", True)

    def __exit__(self, *exc):
        if self.backend == "jax":
            import jax

            jax.config.update("jax_enable_x64", self.previous)


# final_lr="auto", compared step by step with the PyTorch classes
# (tests/auto_final_lr_reference.py): (class, Keras-spelled arguments, dtype, gradients).
AUTO_CASES: dict[str, tuple[str, dict[str, Any], str, str]] = {
    "adabound": ("AdaBound", dict(gamma=auto.GAMMA), "float32", "noisy"),
    "adabound_float64": ("AdaBound", dict(gamma=auto.GAMMA), "float64", "noisy"),
    "amsbound_l2": ("AMSBound", dict(gamma=auto.GAMMA, weight_decay=0.05), "float32", "noisy"),
    "adaboundw": ("AdaBoundW", dict(gamma=auto.GAMMA, weight_decay=0.5), "float32", "noisy"),
    # fixed when it has settled, long before the cap of ceil(1/gamma) = 1000 steps
    "settles": ("AdaBound", {}, "float32", "steady"),
}
AUTO_SAVED_AT = 50  # the resumed run: optimizer saved and rebuilt mid-estimation
# Keras spellings of what must be refused with final_lr="auto".
AUTO_INVALID = {
    "paper": dict(bounds="paper"),
    "bound_function": dict(bounds=lambda t: (0.0, 1.0)),
    "spelling": dict(final_lr="Auto"),
}


def auto_gradients(kind: str) -> dict[str, np.ndarray]:
    """The "noisy" gradients have scales over 1e-6..1 (steps whose Adam step does not
    descend give no sample); the "steady" ones one direction with 1% noise, whose
    samples settle."""
    if kind == "noisy":
        return gradients(auto.STEPS, seed=5)
    rng = np.random.default_rng(6)
    return {
        k: (1.0 + 0.01 * rng.standard_normal((auto.STEPS, *s))) * rng.uniform(0.1, 1.0, size=s)
        for k, s in SHAPES.items()
    }


class _AutoRunner:
    """Applies a gradient sequence step by step, reading the optimizer's final_lr_in_use
    before each step and final_lr_fixed after it: on JAX through a jitted stateless_apply,
    on TensorFlow through a tf.function, on PyTorch through apply."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def run(self, make, grads, dtype, resume_at=None) -> dict[str, Any]:
        import keras

        names = list(SHAPES)
        params = initial()
        variables = [keras.Variable(params[k].astype(dtype), name=k) for k in names]
        opt = make()
        opt.build(variables)
        step = self._step_function(opt, variables)
        used, trajectory, fixed = [], [], []
        for t in range(len(grads[names[0]])):
            if t == resume_at:
                opt = self._rebuilt(opt, variables)
                step = self._step_function(opt, variables)
            used.append(float(keras.ops.convert_to_numpy(opt.final_lr_in_use)))
            step([keras.ops.convert_to_tensor(grads[k][t].astype(dtype)) for k in names])
            fixed.append(opt.final_lr_fixed)
            trajectory.append(
                {k: keras.ops.convert_to_numpy(v) for k, v in zip(names, variables, strict=True)}
            )
        return {"used": np.array(used), "trajectory": trajectory, "fixed": fixed}

    @staticmethod
    def _rebuilt(opt, variables):
        """A new optimizer from ``opt``'s config and saved variables, as a loaded model's."""
        store: dict[str, Any] = {}
        opt.save_own_variables(store)
        again = type(opt).from_config(json.loads(json.dumps(opt.get_config())))
        again.build(variables)
        again.load_own_variables(store)
        return again

    def _step_function(self, opt, variables):
        if self.backend == "jax":
            import jax

            apply = jax.jit(opt.stateless_apply)

            def step(g):
                trainable, state = apply(
                    [v.value for v in opt.variables], g, [v.value for v in variables]
                )
                for v, value in zip(variables + opt.variables, trainable + state, strict=True):
                    v.assign(value)

            return step
        if self.backend == "tensorflow":
            import tensorflow as tf

            return tf.function(lambda g: opt.apply(g, variables))
        import torch

        def step(g):
            with torch.no_grad():
                opt.apply(g, variables)

        return step


def _auto(backend, dbk, out) -> None:
    import keras

    runner = _AutoRunner(backend)
    for case, (cls, kwargs, dtype, kind) in AUTO_CASES.items():
        grads = auto_gradients(kind)

        def make(cls=cls, kwargs=kwargs):
            return getattr(dbk, cls)(final_lr="auto", **kwargs)

        with _float64(backend) if dtype == "float64" else contextlib.nullcontext():
            keras.config.set_floatx(dtype)
            try:
                out["auto", case] = runner.run(make, grads, dtype)
                if case == "adabound":
                    out["auto", "resumed"] = runner.run(make, grads, dtype, AUTO_SAVED_AT)
            finally:
                keras.config.set_floatx("float32")
    for name, kwargs in AUTO_INVALID.items():
        kwargs = {"final_lr": "auto", **kwargs}
        try:
            dbk.AdaBound(**kwargs)
        except ValueError as e:
            out["auto_error", name] = str(e)
        else:
            out["auto_error", name] = None
    out["auto_number_in_use"] = dbk.AdaBound(final_lr=0.05).final_lr_in_use


def _exclusion(runner, dbk, out) -> None:
    """exclude_from_weight_decay: "b" gets no decay, "w" the decoupled one."""
    params, grads = initial(), {k: g[:100] for k, g in gradients().items()}
    opt = dbk.AdaBoundW(weight_decay=0.1)
    opt.exclude_from_weight_decay(var_names=["b"])
    out["exclusion"] = runner.run(opt, params, grads, "float32")


class _SparseRunner:
    """Applies sparse_gradients() with the backend's own sparse type for "e" or with the
    dense gradients. TensorFlow: IndexedSlices, in a tf.function step; JAX: a BCOO array
    through stateless_apply, as model.fit calls it; both compiled with XLA when ``xla``,
    as model.fit compiles its step. PyTorch: an uncoalesced sparse COO tensor, as
    torch.nn.Embedding(sparse=True) makes."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.data = sparse_gradients()

    def run(self, opt, sparse: bool, xla: bool = False) -> dict[str, Any]:
        import keras

        names = list(SPARSE_SHAPES)
        params = sparse_initial()
        variables = [keras.Variable(params[k], name=k) for k in names]
        opt.build(variables)
        dense = self.data["dense"]
        for t in range(SPARSE_STEPS):
            w = dense["w"][t]
            if sparse:
                index, e = self.data["indices"][t], self.data["values"][t]
            else:
                index, e = None, dense["e"][t]
            self._step(opt, variables, index, e, w, xla)
        state = [keras.ops.convert_to_numpy(v) for v in opt.variables]
        weights = {k: keras.ops.convert_to_numpy(v) for k, v in zip(names, variables, strict=True)}
        return {"weights": weights, "state": state, "type": self.gradient_type}

    def _step(self, opt, variables, index, e, w, xla) -> None:
        backend = self.backend
        shape = SPARSE_SHAPES["e"]
        if backend == "tensorflow":
            import tensorflow as tf

            if not hasattr(opt, "_test_step"):

                @tf.function(jit_compile=xla)
                def step(index, e, w):
                    if index is not None:
                        e = tf.IndexedSlices(e, index, tf.constant(shape, "int64"))
                    self.gradient_type = type(e).__name__
                    opt.apply([e, w], variables)

                opt._test_step = step
            opt._test_step(None if index is None else tf.constant(index), e, w)
        elif backend == "jax":
            import jax
            import jax.experimental.sparse as jax_sparse

            if index is not None:
                e = jax_sparse.BCOO((e, index.reshape(-1, 1)), shape=shape)
            self.gradient_type = type(e).__name__
            if not hasattr(opt, "_test_step"):
                opt._test_step = jax.jit(opt.stateless_apply) if xla else opt.stateless_apply
            trainable, state = opt._test_step(
                [v.value for v in opt.variables], [e, w], [v.value for v in variables]
            )
            for v, value in zip(variables + opt.variables, trainable + state, strict=True):
                v.assign(value)
        else:
            import torch

            e = torch.tensor(e)
            if index is not None:
                e = torch.sparse_coo_tensor(torch.tensor(index).reshape(1, -1), e, shape)
                assert not e.is_coalesced()
            self.gradient_type = str(e.layout)
            with torch.no_grad():
                opt.apply([e, torch.tensor(w)], variables)


def _sparse(backend, dbk, out) -> None:
    import keras

    runner = _SparseRunner(backend)
    for case, (cls, kwargs) in SPARSE_CASES.items():
        if case == "loss_scale_optimizer" and backend == "torch":
            # Keras' LossScaleOptimizer checks the gradients with isfinite, which PyTorch
            # has no sparse kernel for, before the inner optimizer sees them.
            continue
        if backend == "jax":
            compiled = (True,)  # op by op, the JAX runs would take minutes
        elif backend == "tensorflow" and case in SPARSE_XLA_CASES:
            compiled = (False, True)
        else:
            compiled = (False,)
        for xla in compiled:
            for sparse in (True, False):
                opt = getattr(dbk, cls)(**kwargs)
                if case == "loss_scale_optimizer":
                    opt = keras.optimizers.LossScaleOptimizer(opt, initial_scale=8.0)
                out["sparse", case, xla, sparse] = runner.run(opt, sparse, xla)


def _embedding_fit(backend, dbk, out) -> None:
    """model.fit of a model that starts with an embedding, with clipnorm (on TensorFlow
    both once crashed on IndexedSlices). Keras' Embedding has sparse gradients on
    TensorFlow only; on PyTorch the table is a torch.nn.Embedding(sparse=True) in a
    TorchModuleWrapper, whose gradients are sparse tensors."""
    import keras

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 50, size=(256, 5))
    y = (x % 7 == 0).sum(axis=1, keepdims=True).astype("float32")
    if backend == "torch":
        import torch

        table = keras.layers.TorchModuleWrapper(torch.nn.Embedding(50, 8, sparse=True))
    else:
        table = keras.layers.Embedding(50, 8)
    model = keras.Sequential(
        [keras.Input((5,), dtype="int32"), table, keras.layers.Flatten(), keras.layers.Dense(1)]
    )
    model.compile(optimizer=dbk.AdaBound(learning_rate=1e-2, clipnorm=1.0), loss="mse")
    before = float(model.evaluate(x, y, verbose=0))
    model.fit(x, y, epochs=3, batch_size=32, verbose=0)
    out["embedding", "loss"] = (before, float(model.evaluate(x, y, verbose=0)))
    out["embedding", "sparse"] = _embedding_gradient_is_sparse(backend, model, x, y)


def _embedding_gradient_is_sparse(backend, model, x, y) -> bool:
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x[:32]) - y[:32]) ** 2)
        grad = tape.gradient(loss, model.trainable_variables[0])
        return isinstance(grad, tf.IndexedSlices)
    if backend == "torch":
        # the wrapped module keeps the gradient of model.fit's last step
        return bool(model.layers[0].module.weight.grad.is_sparse)
    return False  # jax.grad differentiates the gather into a dense gradient


def _model(keras, seed: int = 0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)]
    )
    return model


def _compile(keras, model, opt) -> None:
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=opt, loss=loss, metrics=["accuracy"])


def _fit(dbk, out) -> None:
    import keras

    x, y, x_test, y_test = digits()
    for name, opt in [
        ("adabound", dbk.AdaBound(learning_rate=3e-3, final_lr=0.1)),
        ("adam", keras.optimizers.Adam(learning_rate=3e-3)),
        # final_lr="auto" inside model.fit's compiled step, fixed at the cap (step 100)
        ("auto", dbk.AdaBound(learning_rate=3e-3, final_lr="auto", gamma=0.02)),
    ]:
        model = _model(keras)
        _compile(keras, model, opt)
        model.fit(x, y, epochs=6, batch_size=32, verbose=0)
        out["fit", name] = float(model.evaluate(x_test, y_test, verbose=0)[1])
        out["fit", name, "steps"] = int(keras.ops.convert_to_numpy(opt.iterations))
        if name == "auto":
            out["fit", name, "final_lr"] = float(keras.ops.convert_to_numpy(opt.final_lr_in_use))
            out["fit", name, "fixed"] = opt.final_lr_fixed


def _optimizer_state(opt) -> list[np.ndarray]:
    import keras

    return [keras.ops.convert_to_numpy(v) for v in opt.variables]


def _resume(dbk, out, tmp: Path) -> None:
    """Training interrupted by saving and loading equals training straight through.

    The learning rate is decayed by hand (as ReduceLROnPlateau does) before the save, so a
    load that lost base_learning_rate would take the decayed rate as the base.
    """
    import keras

    x, y, _, _ = digits()
    x, y = x[:600], y[:600]
    initial_weights = _model(keras).get_weights()

    def fresh(opt):
        model = _model(keras)
        model.set_weights(initial_weights)
        _compile(keras, model, opt)
        return model

    def first_half(model):
        model.fit(x, y, epochs=1, batch_size=60, shuffle=False, verbose=0)
        model.optimizer.learning_rate = 1e-4
        model.fit(x, y, epochs=1, batch_size=60, shuffle=False, verbose=0)

    def second_half(model):
        model.fit(x, y, epochs=2, batch_size=60, shuffle=False, verbose=0)

    def opt():
        return dbk.AMSBoundW(learning_rate=1e-3, final_lr=0.1, weight_decay=1e-2)

    straight = fresh(opt())
    first_half(straight)
    second_half(straight)
    out["resume", "straight"] = (straight.get_weights(), _optimizer_state(straight.optimizer))

    saved = fresh(opt())
    first_half(saved)
    saved.save(tmp / "model.keras")
    saved.save_weights(tmp / "model.weights.h5")
    loaded = keras.models.load_model(tmp / "model.keras")
    out["resume", "loaded_type"] = type(loaded.optimizer).__name__
    out["resume", "loaded_config"] = loaded.optimizer.get_config()
    second_half(loaded)
    out["resume", "loaded"] = (loaded.get_weights(), _optimizer_state(loaded.optimizer))

    # Weights only, into an optimizer built with the decayed rate: its default base would be
    # 1e-4, the saved variable brings back 1e-3.
    rebuilt = fresh(dbk.AMSBoundW(learning_rate=1e-4, final_lr=0.1, weight_decay=1e-2))
    rebuilt.optimizer.build(rebuilt.trainable_variables)
    rebuilt.load_weights(tmp / "model.weights.h5")
    out["resume", "rebuilt_base"] = float(
        keras.ops.convert_to_numpy(rebuilt.optimizer.base_learning_rate)
    )
    second_half(rebuilt)
    out["resume", "rebuilt"] = (rebuilt.get_weights(), _optimizer_state(rebuilt.optimizer))


def _errors(dbk, out) -> None:
    import keras

    for name, (kwargs, _) in INVALID.items():
        if kwargs == "warmup":
            kwargs = dict(
                learning_rate=keras.optimizers.schedules.CosineDecay(
                    0.0, 1000, warmup_target=1e-3, warmup_steps=100
                )
            )
        try:
            dbk.AdaBound(**kwargs)
        except ValueError as e:
            out["error", name] = str(e)
        else:
            out["error", name] = None


def _configs(dbk, out) -> None:
    import keras

    schedule = keras.optimizers.schedules.ExponentialDecay(3e-3, 100, 0.5)
    made = {
        "AdaBound": dbk.AdaBound(
            learning_rate=3e-3,
            final_lr=0.05,
            gamma=1e-2,
            beta_1=0.8,
            beta_2=0.99,
            epsilon=1e-6,
            weight_decay=1e-4,
            bounds="paper",
            clipnorm=1.0,
        ),
        "AMSBound": dbk.AMSBound(learning_rate=schedule, base_learning_rate=2e-3),
        "AdaBoundW": dbk.AdaBoundW(weight_decay=1e-2, unscaled_decay=True),
        "AMSBoundW": dbk.AMSBoundW(learning_rate=0.0, base_learning_rate=1e-3),
    }
    for name, opt in made.items():
        config = json.loads(json.dumps(opt.get_config()))
        # from_config replaces a serialized schedule in the dict it is given by the object.
        again = type(opt).from_config(json.loads(json.dumps(config))).get_config()
        revived = keras.optimizers.deserialize(
            json.loads(json.dumps(keras.optimizers.serialize(opt)))
        )
        out["config", name] = {
            "config": config,
            "round_trip": again,
            "revived_type": type(revived).__name__,
            "revived": revived.get_config(),
        }


def main(backend: str, path: str) -> None:
    os.environ["KERAS_BACKEND"] = backend
    import keras

    from dynabound import keras as dbk

    assert keras.backend.backend() == backend, keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        # A tf.function per optimizer is the point here, not a retracing to warn about.
        tf.get_logger().setLevel("ERROR")
    out: dict[Any, Any] = {"backend": backend}
    runner = _Runner(backend)
    _parity(runner, dbk, out)
    _auto(backend, dbk, out)
    _registry(runner, dbk, out)
    _exclusion(runner, dbk, out)
    _sparse(backend, dbk, out)
    _embedding_fit(backend, dbk, out)
    _errors(dbk, out)
    _configs(dbk, out)
    out["sklearn"] = importlib.util.find_spec("sklearn") is not None
    if out["sklearn"]:  # the digits data set ships with scikit-learn
        _fit(dbk, out)
        with tempfile.TemporaryDirectory() as tmp:
            _resume(dbk, out, Path(tmp))
    with open(path, "wb") as f:
        pickle.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
