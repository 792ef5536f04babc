"""AdaBound and AMSBound for JAX, as optax gradient transformations.

``scale_by_adabound`` is the lr-free core: it returns

    scale * clamp(numerator / (sqrt(u) + eps), rho * lower(t), rho * upper(t)) * m

so that chaining it with ``optax.scale_by_learning_rate(lr)`` gives exactly the PyTorch
update ``p -= lr * rate * m`` of :class:`dynabound.AdaBound`. ``rho = final_lr / base_lr``
stays fixed while the learning rate changes: a learning-rate schedule scales the Adam step
and both bounds together, as in the authors' code. The base learning rate defaults to the
learning rate at step 0 (a schedule's value at count 0) and is kept in the optimizer
state from ``init`` on, so it survives ``optax.inject_hyperparams``, which rebuilds the
optimizer with the current learning rate every step (see :func:`adabound`).

Decoupled weight decay (:func:`adaboundw`) is :func:`add_decoupled_weight_decay` after
the learning rate, equal to PyTorch's ``p *= 1 - lr * wd`` before the step.

Complex parameters are treated as pairs of real numbers (like ``torch.view_as_real``):
the second moment and the clamp act on the real and imaginary parts separately.
State arrays and updates have the dtype of the parameters; half-precision leaves are
computed in float32 and stored in their own dtype.

``final_lr="auto"`` (``final_lr_ratio="auto"`` for :func:`scale_by_adabound`) estimates the
SGD rate from the Adam phase's own steps, by the rule of :mod:`dynabound.final_lr`: each
update projects the unclipped Adam step of the whole tree onto the gradient, the samples
are averaged with ``b2`` (bias-corrected), and the estimate bounds the following updates
until it is fixed. The estimate lives in the state (:class:`FinalLrEstimate`, arrays
only, so the update stays jittable and traces once); :func:`final_lr_in_use` reads the
rate in use from any optimizer state that holds one.
"""

# No `from __future__ import annotations`: optax reads the public signatures (a
# `learning_rate` annotated optax.ScalarOrSchedule accepts schedules), so they must stay
# objects, not strings.
import math
import numbers
from typing import Any, NamedTuple, cast

from . import final_lr as final_lr_rule

try:
    import jax
    import jax.numpy as jnp
    import optax
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "dynabound.optax needs jax and optax, which the [jax] extra installs: in a dynabound "
        'checkout, python -m pip install ".[jax]" (dynabound is not on PyPI)'
    ) from exc

__all__ = [
    "DecoupledWeightDecayState",
    "FinalLrEstimate",
    "ScaleByAdaBoundState",
    "adabound",
    "adaboundw",
    "add_decoupled_weight_decay",
    "amsbound",
    "amsboundw",
    "final_lr_in_use",
    "scale_by_adabound",
]

# optax < 0.2.3 only has the int32-specific name.
_safe_increment = getattr(optax, "safe_increment", None) or optax.safe_int32_increment

_BOUNDS = ("reference", "paper")
# Why final_lr = 0 is refused rather than trained with: nothing would ever move.
_POSITIVE_FINAL_LR = (
    "> 0: both bounds are proportional to it, so 0 clips every step's rate to 0 "
    "and no parameter ever moves"
)


class FinalLrEstimate(NamedTuple):
    """The estimate of ``final_lr="auto"``, in the state of :func:`scale_by_adabound`.

    The fields of :func:`dynabound.final_lr.new_estimation`, as arrays. Values are ratios
    ``final_lr / base_learning_rate`` (``final_lr_ratio``); :func:`final_lr_in_use` turns
    them into a ``final_lr``.

    * ``estimate``: the bias-corrected average of the samples, the ratio the next update
      uses (0 before the first sample: until then the updates are Adam's, unclipped);
    * ``average``, ``samples``: the uncorrected exponential average (``b2``) and how many
      samples it holds;
    * ``calm``: how many consecutive samples changed the estimate by less than
      :data:`~dynabound.final_lr.SETTLE_TOLERANCE` (relative);
    * ``steps``: updates taken while estimating; ``fixed``: whether the estimate is fixed.

    The PyTorch classes also keep a per-step history; a jitted state cannot grow, so here
    the state holds the current estimate only: log :func:`final_lr_in_use` each step for
    the sequence.
    """

    estimate: jax.Array
    average: jax.Array
    samples: jax.Array
    calm: jax.Array
    steps: jax.Array
    fixed: jax.Array


class ScaleByAdaBoundState(NamedTuple):
    """State of :func:`scale_by_adabound`.

    ``count`` is the number of updates applied so far (int32), ``mu`` and ``nu`` the first
    and second moments (``nu`` of a complex leaf holds the moments of the real and
    imaginary parts in its real and imaginary parts), ``nu_max`` the running maximum of
    ``nu`` with AMSBound and ``None`` otherwise. ``base_learning_rate`` is the learning
    rate ``final_lr`` refers to, kept by the optimizers (:func:`adabound` and the others)
    from ``init`` on; ``None`` in the state of :func:`scale_by_adabound` used on its own.
    ``final_lr_estimate`` is the :class:`FinalLrEstimate` of ``final_lr="auto"``, ``None``
    with a number.
    """

    count: jax.Array  # type: ignore[assignment]  # optax's name for it; shadows tuple.count
    mu: optax.Updates
    nu: optax.Updates
    nu_max: optax.Updates | None
    base_learning_rate: jax.Array | None = None
    final_lr_estimate: FinalLrEstimate | None = None


def _concrete(value: Any) -> float | None:
    """The value as a float, or None while it is traced (inside jit, hyperparameters
    injected by ``optax.inject_hyperparams`` are tracers and were validated at init)."""
    try:
        return float(value)
    except jax.errors.ConcretizationTypeError:
        return None


def _check(name: str, value: Any, ok: Any, requirement: str) -> None:
    v = _concrete(value)
    if v is not None and not ok(v):
        raise ValueError(f"Invalid {name}: {value!r} (must be {requirement})")


def _validate_core(b1: Any, b2: Any, eps: Any, gamma: Any) -> None:
    _check("b1", b1, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
    _check("b2", b2, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
    _check("eps", eps, lambda v: v >= 0.0, ">= 0")
    _check("gamma", gamma, lambda v: v > 0.0, "> 0")


def _log(b: Any) -> Any:
    # log(0) = -inf makes 1 - b**t exactly 1, the limit torch computes for b == 0.
    if isinstance(b, numbers.Real):
        value = float(b)
        return math.log(value) if value > 0 else -math.inf
    return jnp.log(b)


def _coefficients(count, *, b1, b2, eps, rho, gamma, bounds, dtype):
    """Per-step scalars (numerator, lower, upper, scale, eps) in ``dtype``.

    The bias corrections use expm1 and the bound multipliers are written without
    cancellation (``1 - 1/(x+1) = x/(x+1)``): without 64-bit JAX they are computed in
    float32, and the naive forms lose up to 5 digits at small t (1 - 0.999**1).
    """
    t = count.astype(dtype)
    x = (1 - b2) * t if bounds == "paper" else gamma * t
    lower = rho * (x / (x + 1))
    upper = rho * (1 + 1 / x)
    if bounds == "paper":
        return jnp.ones((), dtype), lower, upper, 1 / jnp.sqrt(t), jnp.zeros((), dtype)
    bc1 = -jnp.expm1(t * jnp.asarray(_log(b1), dtype))
    bc2 = -jnp.expm1(t * jnp.asarray(_log(b2), dtype))
    return jnp.sqrt(bc2) / bc1, lower, upper, None, jnp.asarray(eps, dtype)


def _as_real(x: jax.Array) -> jax.Array:
    return jnp.stack([x.real, x.imag], axis=-1) if jnp.iscomplexobj(x) else x


def _like(r: jax.Array, ref: jax.Array) -> jax.Array:
    out = jax.lax.complex(r[..., 0], r[..., 1]) if jnp.iscomplexobj(ref) else r
    return out.astype(ref.dtype)


def _work_dtype(dtype: Any) -> Any:
    """Real dtype to compute a leaf in: its own (complex: its parts'), at least float32."""
    return jnp.promote_types(jnp.finfo(dtype).dtype, jnp.float32)


def scale_by_adabound(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    final_lr_ratio: float | str = 100.0,
    gamma: float = 1e-3,
    amsbound: bool = False,
    bounds: str = "reference",
) -> optax.GradientTransformation:
    """Rescale updates by AdaBound's clipped adaptive rate, before the learning rate.

    Args:
      b1, b2: decay rates of the first and second moments, in [0, 1).
      eps: added to ``sqrt(u)`` (``"reference"`` bounds only).
      final_lr_ratio: ``final_lr / base_lr`` (rho): the rate the bounds converge to,
        relative to the learning rate; ``"auto"`` estimates it from the updates
        (:class:`FinalLrEstimate`, ``"reference"`` bounds only).
      gamma: convergence speed of the reference bounds, ``> 0``.
      amsbound: use the running maximum of the second moment (AMSBound).
      bounds: ``"reference"`` (the authors' released code: bias-corrected Adam step, bounds
        ``rho * (1 -/+ 1/(gamma t (+1)))``) or ``"paper"`` (Algorithm 2: no bias correction,
        no eps, bounds ``rho * (1 -/+ 1/((1-b2) t (+1)))``, rate divided by ``sqrt(t)``).

    Returns:
      A transformation whose output, multiplied by ``-lr`` (``scale_by_learning_rate``),
      is the AdaBound step.
    """
    auto = _is_auto("final_lr_ratio", final_lr_ratio)
    if not auto:
        _check("final_lr_ratio", final_lr_ratio, lambda v: v > 0.0, _POSITIVE_FINAL_LR)
    return _scale_by_adabound(
        None if auto else lambda state: final_lr_ratio, None,
        b1=b1, b2=b2, eps=eps, gamma=gamma, amsbound=amsbound, bounds=bounds,
    )  # fmt: skip


def _is_auto(name: str, value: Any) -> bool:
    """Whether ``value`` asks for the estimated rate; any other string is refused."""
    if isinstance(value, str):
        if value != final_lr_rule.AUTO:
            raise ValueError(f"{name} must be a number or 'auto', got {value!r}")
        return True
    return False


def _new_estimate(dtype: Any) -> FinalLrEstimate:
    zero, count = jnp.zeros([], dtype), jnp.zeros([], jnp.int32)
    return FinalLrEstimate(zero, zero, count, count, count, jnp.zeros([], bool))


def _add_sample(
    record: FinalLrEstimate, squares: Any, along: Any, beta: Any, cap: Any
) -> FinalLrEstimate:
    """:func:`dynabound.final_lr.record_sample` with arrays and selects instead of branches:
    one update's sums ``squares = sum(d*d)`` and ``along = sum(d*g)`` added to ``record``
    (nothing changes once it is fixed)."""
    dtype = record.average.dtype
    estimating = ~record.fixed
    sample = squares / jnp.where(along > 0, along, 1)
    valid = estimating & (along > 0) & jnp.isfinite(sample) & (sample > 0)
    samples = record.samples + valid.astype(jnp.int32)
    # The average's weights and its bias correction from one beta, the rounded one: with
    # 1 - beta rounded on its own, the weights would no longer add up to the correction
    # (1e-5 relative apart in float32 with beta = 0.999). 1 - beta**n through expm1,
    # which keeps its digits at small n.
    keep = jnp.asarray(beta, dtype)
    average = jnp.where(valid, keep * record.average + (1 - keep) * sample, record.average)
    correction = -jnp.expm1(samples.astype(dtype) * _log(keep))
    estimate = jnp.where(valid, average / jnp.where(valid, correction, 1), record.estimate)
    change = jnp.abs(estimate - record.estimate)
    calm_step = (record.samples > 0) & (change < final_lr_rule.SETTLE_TOLERANCE * estimate)
    calm = jnp.where(valid, jnp.where(calm_step, record.calm + 1, 0), record.calm)
    steps = record.steps + estimating.astype(jnp.int32)
    settled = (calm >= final_lr_rule.SETTLE_PATIENCE) | (steps >= cap)
    fixed = record.fixed | (estimating & (samples > 0) & settled)
    return FinalLrEstimate(estimate, average, samples, calm, steps, fixed)


def final_lr_in_use(state: Any) -> jax.Array:
    """The ``final_lr`` the next update of ``final_lr="auto"`` uses: the estimate so far
    (fixed or not) times the base learning rate, or NaN before the first sample (the
    updates are Adam's then, unclipped).

    ``state`` is any optimizer state that holds one :class:`ScaleByAdaBoundState` with a
    :class:`FinalLrEstimate` (a chain, ``inject_hyperparams``, ``MultiSteps``...; pass the
    part that holds it when there are several). For :func:`scale_by_adabound` used on its
    own, which knows no learning rate, the value is the estimated ``final_lr_ratio``.
    Works inside ``jit``: log it with the loss to follow the estimate step by step.
    """
    found = [
        x
        for x in jax.tree_util.tree_leaves(
            state, is_leaf=lambda x: isinstance(x, ScaleByAdaBoundState)
        )
        if isinstance(x, ScaleByAdaBoundState) and x.final_lr_estimate is not None
    ]
    if len(found) != 1:
        raise ValueError(
            f"final_lr_in_use needs a state with one final_lr='auto' estimate, found "
            f"{len(found)}: pass the part of the state that holds the one you want"
        )
    core = found[0]
    record = cast(FinalLrEstimate, core.final_lr_estimate)  # found holds only these
    value = record.estimate
    if core.base_learning_rate is not None:
        value = value * core.base_learning_rate.astype(value.dtype)
    return jnp.where(record.samples > 0, value, jnp.nan)


def _float_dtype() -> Any:
    """float64 when JAX runs with 64-bit types enabled, float32 otherwise."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def _scale_by_adabound(
    ratio: Any,
    initial_base: Any,
    *,
    b1: Any,
    b2: Any,
    eps: Any,
    gamma: Any,
    amsbound: bool,
    bounds: str,
) -> optax.GradientTransformation:
    """:func:`scale_by_adabound` with rho taken from ``ratio(state)``, or estimated
    (``final_lr="auto"``) when ``ratio`` is None; ``initial_base()``, unless None, is the
    base learning rate that ``init`` keeps in the state."""
    auto = ratio is None
    if auto and callable(bounds):
        raise ValueError(final_lr_rule.AUTO_WITH_BOUND_FUNCTION)
    if auto and bounds == "paper":
        raise ValueError(final_lr_rule.AUTO_WITH_PAPER_BOUNDS)
    _validate_core(b1, b2, eps, gamma)
    if bounds not in _BOUNDS:
        raise ValueError(f"bounds must be 'reference' or 'paper', got {bounds!r}")
    if auto:
        # In double, as the PyTorch classes count: in float32, 1/0.02 is 50.000001.
        known = _concrete(gamma)
        cap: Any
        if known is not None:
            cap = final_lr_rule.estimation_cap(known)
        else:  # injected by inject_hyperparams
            cap = jnp.maximum(final_lr_rule.SETTLE_PATIENCE, jnp.ceil(1 / gamma))

    def init_fn(params: optax.Params) -> ScaleByAdaBoundState:
        base = None if initial_base is None else jnp.asarray(initial_base(), _float_dtype())
        return ScaleByAdaBoundState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree_util.tree_map(jnp.zeros_like, params),
            nu=jax.tree_util.tree_map(jnp.zeros_like, params),
            nu_max=jax.tree_util.tree_map(jnp.zeros_like, params) if amsbound else None,
            base_learning_rate=base,
            final_lr_estimate=_new_estimate(_float_dtype()) if auto else None,
        )

    def update_fn(updates, state, params=None):
        del params
        count = _safe_increment(state.count)
        dtype = _float_dtype()
        record = state.final_lr_estimate
        numerator, lower, upper, scale, eps_ = _coefficients(
            count,
            b1=b1,
            b2=b2,
            eps=eps,
            rho=record.estimate if auto else ratio(state),
            gamma=gamma,
            bounds=bounds,
            dtype=dtype,
        )
        if auto:
            # Before the first sample there is no final to bound by: the update is Adam's.
            # The largest finite value, not inf: an inf bound times a zero moment is NaN.
            has_estimate = record.samples > 0
            lower = jnp.where(has_estimate, lower, 0)
            upper = jnp.where(has_estimate, upper, jnp.finfo(dtype).max)

        def leaf(g, m, v, v_max=None):
            ref = m
            # Half-precision leaves compute in float32 and only store in their dtype, as
            # PyTorch's opmath does; b1 = 0.9 as a bfloat16 scalar would be 0.898.
            work = _work_dtype(ref.dtype)
            g, m, v = (_as_real(x.astype(ref.dtype)).astype(work) for x in (g, m, v))
            c = lambda s: jnp.asarray(s, dtype).astype(work)  # noqa: E731
            m = c(b1) * m + c(1 - b1) * g
            v = c(b2) * v + c(1 - b2) * (g * g)
            u = v
            if v_max is not None:
                u = v_max = jnp.maximum(_as_real(v_max).astype(work), v)
            # reciprocal-then-multiply, in the order of the PyTorch kernels.
            rate = (1 / (jnp.sqrt(u) + c(eps_))) * c(numerator)
            if auto:
                # The unclipped Adam step per unit of lr, projected on the gradient it used.
                step = (rate * m).astype(dtype)
                sums = (jnp.sum(step * step), jnp.sum(step * g.astype(dtype)))
            rate = jnp.clip(rate, c(lower), c(upper))
            if scale is not None:
                rate = rate * c(scale)
            out = (rate * m, m, v) + ((v_max,) if v_max is not None else ())
            out = tuple(_like(x, ref) for x in out)
            return out + sums if auto else out

        trees = (updates, state.mu, state.nu) + ((state.nu_max,) if amsbound else ())
        results = jax.tree_util.tree_map(leaf, *trees)
        treedef = jax.tree_util.tree_structure(updates)
        outputs = len(trees) + (2 if auto else 0)
        parts = jax.tree_util.tree_transpose(
            treedef, jax.tree_util.tree_structure((0,) * outputs), results
        )
        if auto:
            squares, along = (sum(jax.tree_util.tree_leaves(x)) for x in parts[-2:])
            record = _add_sample(record, squares, along, b2, cap)
        return parts[0], ScaleByAdaBoundState(
            count=count,
            mu=parts[1],
            nu=parts[2],
            nu_max=parts[3] if amsbound else None,
            base_learning_rate=state.base_learning_rate,
            final_lr_estimate=record,
        )

    return optax.GradientTransformation(init_fn, update_fn)


def _initial_value(learning_rate: Any) -> Any:
    """The learning rate at step 0: a schedule's value at count 0, else the rate itself."""
    if callable(learning_rate):
        return learning_rate(jnp.zeros([], jnp.int32))
    return learning_rate


def _require_positive_base(value: Any, learning_rate: Any) -> None:
    """Refuse a base learning rate defaulted from a step-0 learning rate of 0 (warm-up): a
    valid rate, but not one that final_lr can refer to. Traced values pass unchecked."""
    v = _concrete(value)
    if v is not None and not v > 0:
        at_zero = "learning_rate(0)" if callable(learning_rate) else "learning_rate"
        raise ValueError(
            f"{at_zero} is {v!r} and no base_learning_rate was given: final_lr applies at "
            "learning_rate == base_learning_rate, which defaults to the learning rate at "
            "step 0 and must be > 0. Pass base_learning_rate explicitly when the learning "
            "rate starts at 0: the rate final_lr refers to, e.g. learning_rate=0.0, "
            "base_learning_rate=1e-3 (or the peak of a warm-up schedule)."
        )


def _adabound_core(
    learning_rate: Any, base_learning_rate: Any, final_lr: Any, **core: Any
) -> optax.GradientTransformation:
    """scale_by_adabound with rho = final_lr / base, the base kept in the state.

    A base given, or one known at construction (a Python number learning rate, or a
    schedule's concrete value at count 0), fixes rho here, in double precision like the
    PyTorch classes. Otherwise the learning rate is an array, as inside
    ``optax.inject_hyperparams``, which rebuilds the optimizer from the current (possibly
    decayed) rate every step: then the base is the rate seen by ``init`` and rho is formed
    from the state at each update.
    """
    if base_learning_rate is None:
        if isinstance(learning_rate, numbers.Real) and not isinstance(learning_rate, bool):
            base_learning_rate = learning_rate
        elif callable(learning_rate):
            base_learning_rate = _concrete(_initial_value(learning_rate))
        if base_learning_rate is not None:
            _require_positive_base(base_learning_rate, learning_rate)
    auto = isinstance(final_lr, str)  # "auto", checked by _alias
    if base_learning_rate is None:

        def initial_base() -> Any:
            value = _initial_value(learning_rate)
            _require_positive_base(value, learning_rate)
            return value

        return _scale_by_adabound(
            None if auto else lambda state: final_lr / state.base_learning_rate,
            initial_base,
            **core,
        )
    _check(
        "base_learning_rate",
        base_learning_rate,
        lambda v: v > 0.0,
        "> 0; it is the learning rate at which final_lr applies, e.g. base_learning_rate=1e-3",
    )
    if auto:
        return _scale_by_adabound(None, lambda: base_learning_rate, **core)
    ratio = final_lr / base_learning_rate
    return _scale_by_adabound(lambda state: ratio, lambda: base_learning_rate, **core)


class DecoupledWeightDecayState(NamedTuple):
    """State of :func:`add_decoupled_weight_decay`: updates applied so far (int32)."""

    count: jax.Array  # type: ignore[assignment]  # optax's name for it; shadows tuple.count


def add_decoupled_weight_decay(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float,
    unscaled: bool = False,
    mask: Any = None,
) -> optax.GradientTransformation:
    """Decay the parameters by ``f = 1 - learning_rate * weight_decay`` per step.

    Place it after ``scale_by_learning_rate``: it adds ``p * f - p``, so applying the update
    is PyTorch's ``p *= f`` followed by the step. It reproduces that in-place multiply's
    roundings (``f`` rounded to the parameter dtype, at least float32, then ``p * f``): in
    float32 each is a small error of steady sign, and an exact ``lr * wd * p`` drifts from
    PyTorch by ~1e-5 over 1000 steps. ``unscaled=True`` uses ``f = 1 - weight_decay`` (the
    authors' ``p -= wd * p``). ``mask`` is as in ``optax.add_decayed_weights``.
    """

    def init_fn(params: optax.Params) -> DecoupledWeightDecayState:
        del params
        return DecoupledWeightDecayState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("add_decoupled_weight_decay needs the params in update()")
        new_state = DecoupledWeightDecayState(count=_safe_increment(state.count))
        if isinstance(weight_decay, numbers.Real) and weight_decay == 0:
            return updates, new_state
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        # With Python floats 1 - decay is formed in double, like the PyTorch scalar. The
        # unscaled convention ignores lr, except that lr == 0 (warm-up, checkpoint loading)
        # must still leave the parameters alone.
        decay = weight_decay * (lr != 0) if unscaled else lr * weight_decay
        factor = jnp.asarray(1 - decay, jax.dtypes.canonicalize_dtype(jnp.float64))

        def leaf(u, p):
            # fl(p * f) - p (exact) rather than (f - 1) * p: it keeps the rounding of
            # PyTorch's in-place p.mul_(f), which has a steady sign while p moves slowly and
            # adds up to ~1e-5 in float32 over 1000 steps. XLA would fuse p * f - p into one
            # FMA and skip that rounding; a max with the lowest float (a no-op for finite
            # values) sits between them so it cannot.
            work = _work_dtype(p.dtype)
            p = _as_real(p).astype(work)
            pf = jnp.maximum(p * factor.astype(work), jnp.finfo(work).min)
            d = pf - p
            if jnp.iscomplexobj(u):
                d = jax.lax.complex(d[..., 0], d[..., 1])
            return u + d.astype(u.dtype)

        return jax.tree_util.tree_map(leaf, updates, params), new_state

    transform = optax.GradientTransformation(init_fn, update_fn)
    return transform if mask is None else optax.masked(transform, mask)


def _alias(
    learning_rate: optax.ScalarOrSchedule,
    base_learning_rate: Any,
    final_lr: Any,
    weight_decay: Any,
    decoupled: bool,
    unscaled_decay: bool = False,
    mask: Any = None,
    **core: Any,
) -> optax.GradientTransformation:
    if not callable(learning_rate):
        _check("learning_rate", learning_rate, lambda v: v >= 0.0, ">= 0")
    if not _is_auto("final_lr", final_lr):
        _check("final_lr", final_lr, lambda v: v > 0.0, _POSITIVE_FINAL_LR)
    _check("weight_decay", weight_decay, lambda v: v >= 0.0, ">= 0")
    adabound_core = _adabound_core(learning_rate, base_learning_rate, final_lr, **core)
    lr = optax.scale_by_learning_rate(learning_rate)
    if decoupled:
        decay = add_decoupled_weight_decay(learning_rate, weight_decay, unscaled_decay, mask)
        return optax.chain(adabound_core, lr, decay)
    # Coupled L2: g + wd * p enters the moments, as grad.add(p, alpha=wd) in PyTorch.
    # add_decayed_weights skips a Python 0.0 itself; an injected (array) weight decay keeps
    # its place, so the state structure never depends on its value.
    return optax.chain(optax.add_decayed_weights(weight_decay), adabound_core, lr)


def adabound(
    learning_rate: optax.ScalarOrSchedule,
    final_lr: float | str = 0.1,
    gamma: float = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsbound: bool = False,
    base_learning_rate: float | None = None,
    *,
    bounds: str = "reference",
) -> optax.GradientTransformation:
    """AdaBound (Luo et al., 2019), equal to ``dynabound.AdaBound`` with the same settings.

    ``final_lr`` is the SGD rate the bounds converge to at ``learning_rate ==
    base_learning_rate``; the bounds scale with ``learning_rate / base_learning_rate``, so a
    decaying schedule decays them too. ``final_lr="auto"`` estimates it from the Adam
    phase (:mod:`dynabound.final_lr`, ``"reference"`` bounds only), over all the leaves
    this optimizer updates, as the PyTorch classes do per param group: read the rate in use
    with :func:`final_lr_in_use`. ``weight_decay`` is an L2 term added to the gradient
    (see :func:`adaboundw` for decoupled decay).

    ``base_learning_rate`` defaults to the learning rate at step 0 (a schedule's value at
    count 0) and is kept in the optimizer state from ``init`` on (``base_learning_rate`` of
    :class:`ScaleByAdaBoundState`), so ``optax.inject_hyperparams``, which rebuilds the
    optimizer from the current learning rate every step, keeps the bounds scaling with the
    rate instead of re-deriving them from it. Pass it when the rate starts at 0 (warm-up)
    or when resuming with a rate that has already decayed. Injected hyperparameters are
    rounded to the parameters' dtype (in float32, ``b2 = 0.999`` becomes 0.99900001 and
    ``1 - b2`` is off by 1e-5); mark them static to keep them Python floats::

        opt = optax.inject_hyperparams(adabound, static_args=("b1", "b2"))(
            learning_rate=schedule
        )
    """
    return _alias(
        learning_rate, base_learning_rate, final_lr, weight_decay, False,
        b1=b1, b2=b2, eps=eps, gamma=gamma, amsbound=amsbound, bounds=bounds,
    )  # fmt: skip


def amsbound(
    learning_rate: optax.ScalarOrSchedule,
    final_lr: float | str = 0.1,
    gamma: float = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    base_learning_rate: float | None = None,
    *,
    bounds: str = "reference",
) -> optax.GradientTransformation:
    """AMSBound: :func:`adabound` with the running maximum of the second moment."""
    return _alias(
        learning_rate, base_learning_rate, final_lr, weight_decay, False,
        b1=b1, b2=b2, eps=eps, gamma=gamma, amsbound=True, bounds=bounds,
    )  # fmt: skip


def adaboundw(
    learning_rate: optax.ScalarOrSchedule,
    final_lr: float | str = 0.1,
    gamma: float = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsbound: bool = False,
    base_learning_rate: float | None = None,
    *,
    bounds: str = "reference",
    unscaled_decay: bool = False,
    mask: Any = None,
) -> optax.GradientTransformation:
    """AdaBound with decoupled (AdamW-style) weight decay, equal to ``dynabound.AdaBoundW``:
    each step is ``p *= 1 - lr * weight_decay`` followed by the AdaBound step.

    ``unscaled_decay=True`` gives the authors' unreleased convention ``p -= weight_decay * p``
    (not scaled by the learning rate). ``mask`` selects the leaves to decay, as in
    ``optax.adamw`` (with ``inject_hyperparams``, list it in ``static_args``).
    """
    return _alias(
        learning_rate, base_learning_rate, final_lr, weight_decay, True, unscaled_decay, mask,
        b1=b1, b2=b2, eps=eps, gamma=gamma, amsbound=amsbound, bounds=bounds,
    )  # fmt: skip


def amsboundw(
    learning_rate: optax.ScalarOrSchedule,
    final_lr: float | str = 0.1,
    gamma: float = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    base_learning_rate: float | None = None,
    *,
    bounds: str = "reference",
    unscaled_decay: bool = False,
    mask: Any = None,
) -> optax.GradientTransformation:
    """AMSBound with decoupled weight decay, equal to ``dynabound.AMSBoundW``."""
    return _alias(
        learning_rate, base_learning_rate, final_lr, weight_decay, True, unscaled_decay, mask,
        b1=b1, b2=b2, eps=eps, gamma=gamma, amsbound=True, bounds=bounds,
    )  # fmt: skip
