"""AdaBound, AMSBound, AdaBoundW and AMSBoundW as Keras 3 optimizers.

The update is the one of :class:`dynabound.AdaBound`, written with ``keras.ops`` only, so
it runs on the TensorFlow, JAX and PyTorch backends (set ``KERAS_BACKEND`` before importing
Keras), inside ``model.fit``, under ``jit`` and through ``stateless_apply``:

.. code-block:: text

    g = g + weight_decay * p                      (AdaBound, AMSBound: L2 in the gradient)
    p = p * (1 - lr * weight_decay)               (AdaBoundW, AMSBoundW: decoupled decay)
    m = beta_1*m + (1-beta_1)*g ;  v = beta_2*v + (1-beta_2)*g*g ;  u = max(u, v) or v
    rate = lr * clip(sqrt(1-beta_2^t)/(1-beta_1^t) / (sqrt(u)+epsilon), rho*lower(t),
                     rho*upper(t)),   rho = final_lr / base_learning_rate
    p = p - rate * m

``lower(t) = 1 - 1/(gamma*t+1)`` and ``upper(t) = 1 + 1/(gamma*t)``. This is the authors'
``final = final_lr * lr / base_lr`` written without dividing by lr: the learning rate
(a float, a ``keras.optimizers.schedules.LearningRateSchedule``, or a value set later with
``optimizer.learning_rate = ...`` as ``ReduceLROnPlateau`` does) scales the Adam step and
both bounds together, as a PyTorch scheduler scaling ``group["lr"]`` does.

Sparse gradients (``tf.IndexedSlices`` from an ``Embedding`` or any gather on TensorFlow,
``jax.experimental.sparse`` arrays handed to ``apply`` on JAX, sparse tensors from a
wrapped ``torch.nn.Embedding(sparse=True)`` on PyTorch) are made dense, duplicate indices
summed, when they enter ``apply``: before loss-scale division, gradient accumulation,
clipping and the step, so the update is the dense update fed that gradient, bit for bit
(where XLA compiles the step, as ``model.fit`` does on TensorFlow and JAX, it may fuse the
densification into the step and round a moment differently in its last bit). Updating
only the rows in the slices (as a "lazy" Adam does) would not be exact: the moments decay
every element each step, so a row absent from the slices has g = 0 but its m and v still
decay and its parameters still move by ``rate * m``. The dense gradient costs one
temporary the size of the variable, as the step's own temporaries do.

Import this module before ``keras.models.load_model`` of a model saved with one of these
optimizers: the classes are registered with Keras as ``dynabound>AdaBound`` and so on.

``final_lr="auto"`` estimates the SGD rate from the Adam phase's own steps, by the rule of
:mod:`dynabound.final_lr`, over all the variables the optimizer updates (one PyTorch param
group): each step projects the unclipped Adam step onto the gradient, the samples are
averaged with ``beta_2`` (bias-corrected), and the estimate bounds the following steps
until it is fixed. The estimate lives in optimizer variables, so it is saved and restored
with the model; :attr:`AdaBound.final_lr_in_use` reads the rate in use.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from . import final_lr as final_lr_rule

try:
    import keras
    import numpy as np
    from keras import ops
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "dynabound.keras needs Keras 3, which the [keras] extra installs: in a dynabound "
        'checkout, python -m pip install ".[keras]" (dynabound is not on PyPI)'
    ) from exc

__all__ = ["AdaBound", "AMSBound", "AdaBoundW", "AMSBoundW"]

_BOUNDS = ("reference", "paper")
_HALF = ("float16", "bfloat16")


def _work_dtype(dtype: Any) -> str:
    """The dtype a variable is updated in: its own, at least float32."""
    dtype = keras.backend.standardize_dtype(dtype)
    return "float32" if dtype in _HALF else dtype


def _log(b: float) -> float:
    # log(0) = -inf makes 1 - b**t exactly 1 (through expm1(-inf) = -1), as torch has it.
    return math.log(b) if b > 0 else -math.inf


def _initial_learning_rate(learning_rate: Any) -> float | None:
    """The learning rate at step 0, or None when it cannot be read at construction."""
    try:
        if isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
            value = learning_rate(0)
        elif callable(learning_rate):
            value = learning_rate()
        else:
            value = learning_rate
        if isinstance(value, numbers.Real):
            # Not through a tensor: TensorFlow makes Python floats float32, which would
            # leave the base 5e-8 off 1e-3 in float64.
            return float(value)
        return float(ops.convert_to_numpy(value))
    except Exception:  # a callable that only works inside a step: ask for the base
        return None


def _dense(gradient: Any) -> Any:
    """A sparse gradient as the dense tensor it stands for (duplicate indices summed);
    a dense one (or None) as it is."""
    if gradient is None:
        return None
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf  # Keras' backend has imported it already

        # keras.ops.convert_to_tensor(sparse=False) leaves IndexedSlices sparse.
        if isinstance(gradient, tf.IndexedSlices):
            return tf.convert_to_tensor(gradient)
    elif backend == "torch":
        # Keras' torch backend passes sparse tensors through convert_to_tensor as they are;
        # read the layout without importing torch here.
        if str(getattr(gradient, "layout", "torch.strided")) != "torch.strided":
            return gradient.to_dense()
        return gradient
    # tf.SparseTensor, jax.experimental.sparse arrays
    return ops.convert_to_tensor(gradient, sparse=False)


@keras.saving.register_keras_serializable(package="dynabound")
class AdaBound(keras.optimizers.Optimizer):
    """AdaBound / AMSBound (Luo et al., ICLR 2019) for Keras 3: Adam with per-element rates
    clipped to bounds that converge to ``final_lr``, so training moves from Adam to SGD.

    With the defaults the update equals :class:`dynabound.AdaBound` (the authors' AdaBound
    0.0.5) fed the same gradients, to float rounding. When ``gamma*t`` is large the bounds
    meet and the step is momentum SGD with rate ``final_lr * (1 - beta_1)`` and momentum
    ``beta_1``; with ``gamma=1e-3`` the band is within 2x of ``final_lr`` after about 1000
    steps (optimizer steps, not epochs, set the pace).

    Args:
        learning_rate: the Adam-phase rate: a float, a
            ``keras.optimizers.schedules.LearningRateSchedule`` or a callable without
            arguments. A schedule (or a rate set later through ``optimizer.learning_rate``)
            scales both bounds too, by ``learning_rate / base_learning_rate``.
        final_lr: the SGD rate both bounds converge to, meant at
            ``learning_rate == base_learning_rate``; ``"auto"`` estimates it from the
            Adam phase (``"reference"`` bounds only; see :attr:`final_lr_in_use`).
        gamma: convergence speed of the bounds (> 0).
        beta_1, beta_2: decay rates of the first and second moments (PyTorch's
            ``betas``), in [0, 1).
        epsilon: added to ``sqrt(v)``. Defaults to 1e-8 as in PyTorch and the authors'
            code (Keras' Adam uses 1e-7).
        weight_decay: for ``AdaBound``/``AMSBound`` an L2 term ``weight_decay * p`` added
            to the gradient (PyTorch's ``weight_decay``); with
            ``decoupled_weight_decay`` (``AdaBoundW``/``AMSBoundW``) the decoupled decay
            ``p *= 1 - learning_rate * weight_decay`` before the step. Either way it is
            applied here, once: Keras' own decay (``p -= p * wd * lr`` for every
            optimizer given a ``weight_decay``) is switched off. Variables excluded with
            ``exclude_from_weight_decay`` get neither.
        amsbound: use the running maximum of the second moment (AMSBound).
        decoupled_weight_decay: decay the parameters instead of adding an L2 term.
        unscaled_decay: with decoupled decay, the authors' unreleased AdaBoundW convention
            ``p -= weight_decay * p`` (not scaled by the learning rate; nothing moves at a
            learning rate of 0).
        bounds: ``"reference"`` (the authors' code) or ``"paper"`` (Algorithm 2 of the
            paper: no bias correction, no epsilon, bounds
            ``final_lr * (1 -/+ 1/((1-beta_2) t (+1)))``, rate divided by ``sqrt(t)``).
        base_learning_rate: the learning rate that ``final_lr`` refers to (PyTorch's
            ``base_lr``). Defaults to the learning rate at step 0 (the schedule's initial
            value); pass it when that is 0 (warm-up) or when resuming with a learning
            rate that has already decayed. Kept in ``get_config`` and, as an optimizer
            variable, in saved models and weights, so a loaded optimizer continues
            exactly.
        **kwargs: Keras' optimizer options (``clipnorm``, ``clipvalue``,
            ``global_clipnorm``, ``use_ema``, ``ema_momentum``, ``ema_overwrite_frequency``,
            ``loss_scale_factor``, ``gradient_accumulation_steps``, ``name``).

    The step count ``t`` is the optimizer's ``iterations`` (plus one), shared by all
    variables. Variables in float16 or bfloat16 are updated in float32 and stored in their
    own dtype. In float64 (``keras.config.set_floatx("float64")``, and
    ``jax_enable_x64`` on JAX) the learning rate is held in float64 too; otherwise Keras
    keeps it in float32.
    """

    def __init__(
        self,
        learning_rate: Any = 1e-3,
        final_lr: float | str = 0.1,
        gamma: float = 1e-3,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-8,
        weight_decay: float | None = 0.0,
        amsbound: bool = False,
        *,
        decoupled_weight_decay: bool = False,
        unscaled_decay: bool = False,
        bounds: str = "reference",
        base_learning_rate: float | None = None,
        **kwargs: Any,
    ) -> None:
        name = type(self).__name__
        weight_decay = 0.0 if weight_decay is None else weight_decay
        if isinstance(learning_rate, numbers.Real) and not isinstance(learning_rate, bool):
            learning_rate = float(learning_rate)
            if not learning_rate >= 0:
                raise ValueError(f"{name}: Invalid learning rate: {learning_rate} (must be >= 0)")
        auto = isinstance(final_lr, str)
        if auto and final_lr != final_lr_rule.AUTO:
            raise ValueError(f"{name}: final_lr must be a number or 'auto', got {final_lr!r}")
        if auto and callable(bounds):
            raise ValueError(f"{name}: {final_lr_rule.AUTO_WITH_BOUND_FUNCTION}")
        if auto and bounds == "paper":
            raise ValueError(f"{name}: {final_lr_rule.AUTO_WITH_PAPER_BOUNDS}")
        # The estimate's range is checked where it is made.
        number = 1.0 if auto else float(final_lr)
        checks = [
            (number >= 0, f"Invalid final learning rate: {final_lr} (must be > 0)"),
            (
                number != 0,
                f"Invalid final learning rate: {final_lr} (must be > 0: both bounds are "
                "proportional to it, so 0 clips every step's rate to 0 and no parameter ever "
                "moves)",
            ),
            (gamma > 0, f"Invalid gamma (convergence speed): {gamma} (must be > 0)"),
            (0.0 <= beta_1 < 1.0, f"Invalid beta_1 parameter: {beta_1} (must be in [0, 1))"),
            (0.0 <= beta_2 < 1.0, f"Invalid beta_2 parameter: {beta_2} (must be in [0, 1))"),
            (epsilon >= 0, f"Invalid epsilon value: {epsilon} (must be >= 0)"),
            (weight_decay >= 0, f"Invalid weight_decay value: {weight_decay} (must be >= 0)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{name}: {message}")
        if bounds not in _BOUNDS:
            raise ValueError(f"{name}: bounds must be 'reference' or 'paper', got {bounds!r}")
        if base_learning_rate is None:
            base_learning_rate = _initial_learning_rate(learning_rate)
            if base_learning_rate is None or not base_learning_rate > 0:
                # lr = 0 at step 0 (warm-up) is a valid rate but cannot stand in for the
                # rate final_lr refers to; name the argument that fixes it.
                raise ValueError(
                    f"{name}: Invalid base_learning_rate: it defaults to the learning rate "
                    f"at step 0, which is {base_learning_rate}, and must be > 0; it is the "
                    "learning rate at which final_lr applies: pass base_learning_rate "
                    "explicitly (e.g. the peak of a warm-up schedule, base_learning_rate=1e-3)"
                )
        elif not base_learning_rate > 0:
            raise ValueError(
                f"{name}: Invalid base_learning_rate: {base_learning_rate} (must be > 0; it is "
                "the learning rate at which final_lr applies)"
            )
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, **kwargs)
        self.final_lr = final_lr if auto else float(final_lr)
        self.gamma = float(gamma)
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)
        self.amsbound = bool(amsbound)
        self.decoupled_weight_decay = bool(decoupled_weight_decay)
        self.unscaled_decay = bool(unscaled_decay)
        self.bounds = bounds
        # A variable, not only a config entry: optimizer weights restored into an
        # optimizer built with an already-decayed learning rate bring the base back too.
        self._base_learning_rate = self.add_variable(
            shape=(),
            # A NumPy float64: TensorFlow would round a Python float through float32.
            initializer=keras.initializers.Constant(np.float64(base_learning_rate)),
            dtype=keras.backend.floatx(),
            aggregation="only_first_replica",
            name="base_learning_rate",
        )
        # final_lr="auto": the step's two sums, gathered by update_step while
        # _backend_update_step runs it over the variables.
        self._projection: list | None = None
        if auto:
            self._add_estimation_variables()

    def _add_estimation_variables(self) -> None:
        """The record of :func:`dynabound.final_lr.new_estimation` as optimizer variables
        (saved with the model): the estimate (0 before the first sample), the uncorrected
        average, how many samples it holds, the calm samples in a row, the estimating
        steps, and whether the estimate is fixed (0 or 1)."""
        floats = ("estimate", "average")
        self._estimation = {
            field: self.add_variable(
                shape=(),
                dtype=keras.backend.floatx() if field in floats else "int32",
                aggregation="only_first_replica",
                name=f"final_lr_{field}",
            )
            for field in (*floats, "samples", "calm", "steps", "fixed")
        }

    @property
    def final_lr_in_use(self) -> Any:
        """The ``final_lr`` the next step uses: the number given, or with
        ``final_lr="auto"`` the estimate so far (fixed or not) as a scalar tensor, NaN
        before the first sample (the steps are Adam's then, unclipped). A per-step history
        is not kept: log this value (for example from a callback) to follow it."""
        if self.final_lr != final_lr_rule.AUTO:
            return self.final_lr
        estimate = ops.convert_to_tensor(self._estimation["estimate"])
        has_estimate = ops.convert_to_tensor(self._estimation["samples"]) > 0
        return ops.where(has_estimate, estimate, ops.full_like(estimate, math.nan))

    @property
    def final_lr_fixed(self) -> bool:
        """Whether the ``final_lr="auto"`` estimate is fixed (True for a number)."""
        if self.final_lr != final_lr_rule.AUTO:
            return True
        return bool(ops.convert_to_numpy(self._estimation["fixed"]))

    @property
    def base_learning_rate(self) -> Any:
        """The learning rate at which ``final_lr`` applies (an optimizer variable)."""
        return self._base_learning_rate

    def build(self, var_list: list) -> None:
        if self.built:
            return
        super().build(var_list)
        self._momentums, self._velocities = self.add_optimizer_variables(
            var_list, ["momentum", "velocity"]
        )
        if self.amsbound:
            self._velocity_hats = self.add_optimizer_variables(var_list, "velocity_hat")

    def apply(self, grads: Any, trainable_variables: Any = None) -> None:
        # Every way in (apply_gradients, stateless_apply, LossScaleOptimizer, model.fit)
        # passes here, before Keras divides by the loss scale, accumulates and clips.
        return super().apply([_dense(g) for g in grads], trainable_variables)

    def _apply_weight_decay(self, variables: list) -> None:
        # Keras would decay every variable here (p -= p*wd*lr) before update_step; the decay
        # (L2 or decoupled) belongs to update_step, so it is applied exactly once.
        return

    def _backend_update_step(self, grads: Any, trainable_variables: Any, learning_rate: Any):
        if self.final_lr != final_lr_rule.AUTO:
            return super()._backend_update_step(grads, trainable_variables, learning_rate)
        # update_step adds each variable's sums to the list; the sample is the whole step's.
        self._projection = []
        try:
            super()._backend_update_step(grads, trainable_variables, learning_rate)
            sums = self._projection
        finally:
            self._projection = None
        if sums:
            self._add_sample(sum(s[0] for s in sums), sum(s[1] for s in sums))

    def _add_sample(self, squares: Any, along: Any) -> None:
        """:func:`dynabound.final_lr.record_sample` in tensors, with selects instead of
        branches (the step may be traced): one step's ``sum(d*d)`` and ``sum(d*g)``
        added to the estimate, which no longer changes once it is fixed."""
        record = {k: ops.convert_to_tensor(v) for k, v in self._estimation.items()}
        estimating = record["fixed"] == 0
        one = ops.ones_like(along)
        # Per unit of lr the Adam step takes squares/along; final_lr is meant at the base.
        base = ops.cast(self._base_learning_rate, along.dtype)
        sample = base * squares / ops.where(along > 0, along, one)
        valid = ops.logical_and(
            ops.logical_and(estimating, along > 0),
            ops.logical_and(ops.isfinite(sample), sample > 0),
        )
        samples = record["samples"] + ops.cast(valid, "int32")
        # The average's weights and its bias correction from one beta, the rounded one: with
        # 1 - beta rounded on its own, the weights would no longer add up to the correction
        # (1e-5 relative apart in float32 with beta = 0.999). 1 - beta**n through expm1,
        # which keeps its digits at small n.
        # Through NumPy: TensorFlow would round a Python float through float32.
        dtype = keras.backend.standardize_dtype(along.dtype)
        keep = ops.convert_to_tensor(np.asarray(self.beta_2, dtype))
        average = ops.where(
            valid, record["average"] * keep + sample * (1 - keep), record["average"]
        )
        correction = -ops.expm1(ops.cast(samples, along.dtype) * ops.log(keep))
        estimate = ops.where(valid, average / ops.where(valid, correction, one), record["estimate"])
        change = ops.abs(estimate - record["estimate"])
        calm_step = ops.logical_and(
            record["samples"] > 0, change < estimate * final_lr_rule.SETTLE_TOLERANCE
        )
        calm = ops.where(
            valid,
            ops.where(calm_step, record["calm"] + 1, ops.zeros_like(record["calm"])),
            record["calm"],
        )
        steps = record["steps"] + ops.cast(estimating, "int32")
        cap = final_lr_rule.estimation_cap(self.gamma)
        settled = ops.logical_or(calm >= final_lr_rule.SETTLE_PATIENCE, steps >= cap)
        fixing = ops.logical_and(ops.logical_and(estimating, samples > 0), settled)
        fixed = ops.where(fixing, ops.ones_like(record["fixed"]), record["fixed"])
        new = dict(
            estimate=estimate, average=average, samples=samples, calm=calm, steps=steps,
            fixed=fixed,
        )  # fmt: skip
        for field, value in new.items():
            self.assign(self._estimation[field], value)

    def _coefficients(self, dtype: str) -> tuple[Any, Any, Any, Any, bool]:
        """(numerator, lower, upper, scale, eps_used) of this step, in ``dtype``.

        The bias corrections use expm1 and the bounds avoid cancellation
        (``1 - 1/(x+1) = x/(x+1)``): in float32 the naive forms lose up to 5 digits at
        small t (1 - 0.999**1), and torch forms these scalars in float64.
        """
        t = ops.cast(self.iterations + 1, dtype)
        # Native operators, not keras.ops binary ops: those promote float64 to float32 on
        # the torch backend.
        auto = self.final_lr == final_lr_rule.AUTO
        final_lr = ops.cast(self._estimation["estimate"], dtype) if auto else self.final_lr
        rho = final_lr / ops.cast(self._base_learning_rate, dtype)
        paper = self.bounds == "paper"
        x = t * ((1 - self.beta_2) if paper else self.gamma)
        lower = rho * (x / (x + 1))
        upper = rho * (1 + 1 / x)
        if auto:
            # Before the first sample there is no final to bound by: the step is Adam's.
            # The largest finite value, not inf: an inf bound times a zero moment is NaN.
            has_estimate = ops.convert_to_tensor(self._estimation["samples"]) > 0
            lower = ops.where(has_estimate, lower, ops.zeros_like(lower))
            upper = ops.where(has_estimate, upper, ops.full_like(upper, float(np.finfo(dtype).max)))
        if paper:
            return None, lower, upper, 1 / ops.sqrt(t), False
        bc1 = -ops.expm1(t * _log(self.beta_1))
        bc2 = -ops.expm1(t * _log(self.beta_2))
        return ops.sqrt(bc2) / bc1, lower, upper, None, True

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        stored = variable.dtype
        work = _work_dtype(stored)
        index = self._get_variable_index(variable)
        m_var, v_var = self._momentums[index], self._velocities[index]
        p = ops.cast(variable, work)
        g = ops.cast(gradient, work)
        m = ops.cast(m_var, work)
        v = ops.cast(v_var, work)
        lr = ops.cast(learning_rate, work)
        wd = self.weight_decay
        if wd and self._use_weight_decay(variable):
            if not self.decoupled_weight_decay:
                g = g + p * wd
            else:
                if self.unscaled_decay:
                    # lr == 0 (warm-up, a step that must move nothing) leaves p alone.
                    factor = 1 - ops.cast(ops.not_equal(lr, 0), work) * wd
                else:
                    factor = 1 - lr * wd
                # p * factor rounded on its own, as PyTorch's p.mul_(factor): its rounding
                # error has a steady sign while p moves slowly, so skipping it (p - p*wd*lr,
                # or XLA fusing p*factor - rate*m into one FMA) drifts by ~5e-6 in float32
                # over 1000 steps. A clip to the finite range, a no-op for finite values,
                # keeps XLA from fusing.
                finite = float(np.finfo(work).max)
                p = ops.clip(p * factor, -finite, finite)
        # The operation order of PyTorch's single-tensor path, for float-rounding parity.
        m = m * self.beta_1 + g * (1 - self.beta_1)
        v = v * self.beta_2 + (1 - self.beta_2) * g * g
        self.assign(m_var, ops.cast(m, m_var.dtype))
        self.assign(v_var, ops.cast(v, v_var.dtype))
        u = v
        if self.amsbound:
            v_hat_var = self._velocity_hats[index]
            v_hat = ops.cast(v_hat_var, work)
            # Not ops.maximum: on the torch backend it returns float32 for float64 inputs.
            # A NaN in v propagates, as in torch.maximum.
            u = ops.where(v_hat >= v, v_hat, v)
            self.assign(v_hat_var, ops.cast(u, v_hat_var.dtype))
        numerator, lower, upper, scale, eps_used = self._coefficients(work)
        denom = ops.sqrt(u)
        if eps_used:
            denom = denom + self.epsilon
        rate = 1 / denom
        if numerator is not None:
            rate = rate * numerator
        if self._projection is not None:
            # The unclipped Adam step per unit of lr, projected on the gradient it used.
            step = rate * m
            dtype = self._estimation["estimate"].dtype
            self._projection.append(
                (ops.cast(ops.sum(step * step), dtype), ops.cast(ops.sum(step * g), dtype))
            )
        multiplier = lr if scale is None else lr * scale
        rate = ops.clip(rate, lower, upper) * multiplier
        self.assign(variable, ops.cast(p - rate * m, stored))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "final_lr": self.final_lr,
                "gamma": self.gamma,
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "amsbound": self.amsbound,
                "decoupled_weight_decay": self.decoupled_weight_decay,
                "unscaled_decay": self.unscaled_decay,
                "bounds": self.bounds,
                "base_learning_rate": float(ops.convert_to_numpy(self._base_learning_rate)),
            }
        )
        return config


@keras.saving.register_keras_serializable(package="dynabound")
class AMSBound(AdaBound):
    """AMSBound: :class:`AdaBound` with ``amsbound=True`` (running max of the second
    moment)."""

    def __init__(self, learning_rate: Any = 1e-3, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("amsbound", True)
        super().__init__(learning_rate, *args, **kwargs)


@keras.saving.register_keras_serializable(package="dynabound")
class AdaBoundW(AdaBound):
    """AdaBound with decoupled weight decay: ``p *= 1 - learning_rate * weight_decay``
    before each step (:class:`dynabound.AdaBoundW`). ``unscaled_decay=True`` gives the
    authors' unreleased convention ``p -= weight_decay * p``."""

    def __init__(self, learning_rate: Any = 1e-3, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("decoupled_weight_decay", True)
        super().__init__(learning_rate, *args, **kwargs)


@keras.saving.register_keras_serializable(package="dynabound")
class AMSBoundW(AdaBoundW):
    """AMSBound with decoupled weight decay (see :class:`AdaBoundW`)."""

    def __init__(self, learning_rate: Any = 1e-3, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("amsbound", True)
        super().__init__(learning_rate, *args, **kwargs)
