"""dynabound.optax against the PyTorch optimizers, and its behaviour as an optax citizen.

Parity runs feed both frameworks the same gradient sequence (per-element scales spread
over 1e-6..1, so elements sit below, inside and above the bounds) for 1000 steps; weight
decay feeds the parameters back into the gradient. Errors are measured per leaf as
max|a - b| / max|b|: float32 runs accumulate one rounding of |p| per step, so element-wise
ratios of near-zero parameters say nothing about the optimizer. That accumulation is also
why the parameters stay O(1): when they wander several times their initial size, two
float32 transcriptions of the same formula (PyTorch and NumPy) already differ by ~1e-6.
"""

from __future__ import annotations

import functools
import inspect
import subprocess
import sys
import typing

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
torch = pytest.importorskip("torch")

import auto_final_lr_reference as auto  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from option_sets import cases  # noqa: E402

import dynabound  # noqa: E402
from dynabound import optax as dbo  # noqa: E402

# jax >= 0.4.36 has jax.enable_x64; older releases only the experimental one.
_enable_x64 = jax.enable_x64 if hasattr(jax, "enable_x64") else jax.experimental.enable_x64

STEPS = 1000
SHAPES = {"b": (6,), "w": (6, 5)}  # dict order == jax's sorted-key order
TOL = {"float32": 1e-6, "float64": 1e-12}


def _gradients(steps: int, shapes: dict, seed: int = 0, complex_: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        scale = 10.0 ** rng.uniform(-6, 0, size=shape)
        g = rng.standard_normal((steps, *shape)) * scale
        if complex_:
            g = g + 1j * rng.standard_normal((steps, *shape)) * scale[::-1]
        out[name] = g
    return out


def _initial(shapes: dict, seed: int = 1, complex_: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    out = {k: rng.standard_normal(s) for k, s in shapes.items()}
    if complex_:
        out = {k: v + 1j * rng.standard_normal(v.shape) for k, v in out.items()}
    return out


def _run_torch(cls, kwargs, params, grads, dtype, schedule=None):
    tensors = {k: torch.tensor(v, dtype=dtype, requires_grad=True) for k, v in params.items()}
    grads = {k: torch.tensor(v, dtype=dtype) for k, v in grads.items()}
    opt = cls(list(tensors.values()), **kwargs)
    sched = schedule(opt) if schedule is not None else None
    for t in range(len(grads[next(iter(grads))])):
        for k, p in tensors.items():
            p.grad = grads[k][t]
        opt.step()
        if sched is not None:
            sched.step()
    return {k: p.detach().numpy() for k, p in tensors.items()}


def _run_optax(tx, params, grads, dtype):
    """All steps in one jitted scan: compiled once, fast enough for 1000 steps."""

    @jax.jit
    def run(p, gs):
        def body(carry, g):
            p, s = carry
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(body, (p, tx.init(p)), gs)
        return p

    p = {k: jnp.asarray(v, dtype) for k, v in params.items()}
    out = run(p, {k: jnp.asarray(v, dtype) for k, v in grads.items()})
    return {k: np.asarray(v) for k, v in out.items()}


def _rel_err(a: dict, b: dict) -> float:
    return max(np.max(np.abs(a[k] - b[k])) / np.max(np.abs(b[k])) for k in b)


def _step_lr(opt):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=300, gamma=0.1)


def _piecewise(lr):
    return optax.piecewise_constant_schedule(lr, {300: 0.1, 600: 0.1, 900: 0.1})


CUSTOM = dict(final_lr=0.05, gamma=1e-2, eps=1e-6)
CASES = {
    "adabound": (dynabound.AdaBound, {}, lambda: dbo.adabound(1e-3), None),
    "amsbound": (dynabound.AMSBound, {}, lambda: dbo.amsbound(1e-3), None),
    "custom": (
        dynabound.AdaBound,
        dict(lr=3e-3, betas=(0.8, 0.99), **CUSTOM),
        lambda: dbo.adabound(3e-3, b1=0.8, b2=0.99, **CUSTOM),
        None,
    ),
    "l2": (
        dynabound.AdaBound,
        dict(weight_decay=0.05),
        lambda: dbo.adabound(1e-3, weight_decay=0.05),
        None,
    ),
    "adaboundw": (
        dynabound.AdaBoundW,
        dict(weight_decay=0.01),
        lambda: dbo.adaboundw(1e-3, weight_decay=0.01),
        None,
    ),
    "amsboundw_unscaled": (
        dynabound.AMSBoundW,
        dict(weight_decay=1e-4, unscaled_decay=True),
        lambda: dbo.amsboundw(1e-3, weight_decay=1e-4, unscaled_decay=True),
        None,
    ),
    "paper": (
        dynabound.AdaBound,
        dict(bounds="paper"),
        lambda: dbo.adabound(1e-3, bounds="paper"),
        None,
    ),
    "step_schedule": (
        dynabound.AMSBound,
        dict(weight_decay=0.01),
        lambda: dbo.amsbound(_piecewise(1e-3), weight_decay=0.01, base_learning_rate=1e-3),
        _step_lr,
    ),
    # The base learning rate taken from the schedule at count 0, as torch takes it from lr.
    "step_schedule_default_base": (
        dynabound.AMSBound,
        dict(weight_decay=0.01),
        lambda: dbo.amsbound(_piecewise(1e-3), weight_decay=0.01),
        _step_lr,
    ),
}


GRADS, PARAMS = _gradients(STEPS, SHAPES), _initial(SHAPES)


@functools.cache
def _expected(case: str, dtype: str) -> dict:
    cls, kwargs, _, schedule = CASES[case]
    return _run_torch(cls, kwargs, PARAMS, GRADS, getattr(torch, dtype), schedule)


def test_gradients_hit_both_bounds_and_the_band_between():
    """The parity runs mean something only if the clamp is active both ways and not always."""
    for g in GRADS.values():
        t = np.arange(1, STEPS + 1).reshape(-1, *([1] * (g.ndim - 1)))
        v = np.zeros_like(g)
        for i in range(STEPS):
            v[i] = 0.999 * v[i - 1] + 0.001 * g[i] ** 2 if i else 0.001 * g[i] ** 2
        rate = np.sqrt(1 - 0.999**t) / (1 - 0.9**t) / (np.sqrt(v) + 1e-8)
        below, above = rate < 100 * (1e-3 * t) / (1e-3 * t + 1), rate > 100 * (1 + 1e3 / t)
        for region in (below, above, ~below & ~above):
            assert 0.1 < region.mean() < 0.9


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_torch(case, dtype):
    expected = _expected(case, dtype)
    with _enable_x64(dtype == "float64"):
        got = _run_optax(CASES[case][2](), PARAMS, GRADS, getattr(jnp, dtype))
    assert got["w"].dtype == np.dtype(dtype)
    # The run must have moved the parameters, or agreement would prove nothing.
    assert _rel_err(PARAMS, expected) > 1e-3
    assert _rel_err(got, expected) <= TOL[dtype]


def _optax_for(options: dict) -> optax.GradientTransformation:
    """The dynabound.optax optimizer for keyword arguments of dynabound.AdaBound. Options it
    has no counterpart for are passed on as they are, so that they fail."""
    options = dict(options)
    lr = options.pop("lr", 1e-3)
    if "betas" in options:
        options["b1"], options["b2"] = options.pop("betas")
    if "base_lr" in options:
        options["base_learning_rate"] = options.pop("base_lr")
    if options.pop("decoupled_weight_decay", False):
        return dbo.adaboundw(lr, **options)
    return dbo.adabound(lr, **options)


@pytest.mark.parametrize(("name", "options"), cases("optax"))
def test_every_option_set_matches_torch(name, options):
    """The registry's option sets (tests/option_sets.py), 300 steps in float64."""
    steps = 300
    grads = {k: g[:steps] for k, g in GRADS.items()}
    expected = _run_torch(dynabound.AdaBound, options, PARAMS, grads, torch.float64)
    with _enable_x64(True):
        got = _run_optax(_optax_for(options), PARAMS, grads, jnp.float64)
    assert _rel_err(got, expected) <= TOL["float64"]


# inject_hyperparams with the base learning rate given, and left to its default.
BASES = {"given": dict(base_learning_rate=1e-3), "default": {}}


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_inject_hyperparams_follows_schedule_like_torch(dtype, base):
    """inject_hyperparams rebuilds the chain with the current lr each step; the bounds
    must still scale with lr / base_lr rather than be re-derived from the current lr."""
    # In float32 injected betas would be rounded (1 - b2 off by 1e-5): keep them static.
    static = ("b1", "b2") if dtype == "float32" else ()
    with _enable_x64(dtype == "float64"):
        tx = optax.inject_hyperparams(dbo.amsbound, static_args=static)(
            learning_rate=_piecewise(1e-3), weight_decay=0.01, **BASES[base]
        )
        got = _run_optax(tx, PARAMS, GRADS, getattr(jnp, dtype))
    assert _rel_err(got, _expected("step_schedule", dtype)) <= TOL[dtype]


@pytest.mark.parametrize("base", list(BASES))
def test_inject_hyperparams_lr_set_by_hand_like_torch_group_lr(base):
    """The recipe of docs/api/optax.md: change state.hyperparams['learning_rate'] between
    jitted steps, as a PyTorch loop changes group['lr']; the bounds follow it through the
    base learning rate, given or kept in the state since init."""
    with _enable_x64(True):
        tx = optax.inject_hyperparams(dbo.amsbound)(
            learning_rate=1e-3, weight_decay=0.01, **BASES[base]
        )

        @jax.jit
        def step(p, s, g):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        p = {k: jnp.asarray(v, jnp.float64) for k, v in PARAMS.items()}
        s = tx.init(p)
        for t in range(STEPS):
            if t and t % 300 == 0:  # where _step_lr's StepLR decays the torch run
                s.hyperparams["learning_rate"] = s.hyperparams["learning_rate"] * 0.1
            p, s = step(p, s, {k: jnp.asarray(g[t], jnp.float64) for k, g in GRADS.items()})
        got = {k: np.asarray(v) for k, v in p.items()}
    assert _rel_err(got, _expected("step_schedule", "float64")) <= TOL["float64"]


def test_bounds_do_not_follow_a_rederived_base_lr():
    """Control for the test above: a base lr taken from the current lr gives other bounds."""

    def rederived(learning_rate, weight_decay):
        return dbo.amsbound(
            learning_rate, weight_decay=weight_decay, base_learning_rate=learning_rate
        )

    with _enable_x64(True):
        tx = optax.inject_hyperparams(rederived)(learning_rate=_piecewise(1e-3), weight_decay=0.01)
        got = _run_optax(tx, PARAMS, GRADS, jnp.float64)
    assert _rel_err(got, _expected("step_schedule", "float64")) > 1e-3


def _core_state(state):
    """The ScaleByAdaBoundState inside an optimizer's state (injected or not)."""
    states = [
        x
        for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, dbo.ScaleByAdaBoundState))
        if isinstance(x, dbo.ScaleByAdaBoundState)
    ]
    assert len(states) == 1
    return states[0]


def test_base_learning_rate_is_the_rate_at_step_zero_kept_in_the_state():
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.full(3, 0.5)}
    for tx in (
        dbo.adabound(_piecewise(2e-3)),
        dbo.adaboundw(optax.linear_schedule(2e-3, 1e-5, 10), weight_decay=0.1),
        optax.inject_hyperparams(dbo.amsbound)(learning_rate=2e-3),
        optax.inject_hyperparams(dbo.amsboundw)(learning_rate=optax.linear_schedule(2e-3, 0, 5)),
    ):
        state = tx.init(params)
        assert float(_core_state(state).base_learning_rate) == pytest.approx(2e-3, rel=1e-7)
        for _ in range(6):  # past the schedules' changes: the base stays
            _, state = jax.jit(tx.update)(grads, state, params)
        assert float(_core_state(state).base_learning_rate) == pytest.approx(2e-3, rel=1e-7)
    # The lr-free core on its own has no learning rate to keep.
    assert dbo.scale_by_adabound().init(params).base_learning_rate is None


def test_default_base_equals_the_explicit_one_bit_for_bit():
    # A schedule's value at count 0 is a float32 array: 1e-3 becomes 0.0010000000475.
    for make, base in (
        (
            lambda **kw: dbo.amsboundw(_piecewise(1e-3), weight_decay=0.01, **kw),
            float(_piecewise(1e-3)(0)),
        ),
        (lambda **kw: dbo.adabound(3e-3, final_lr=0.05, **kw), 3e-3),
    ):
        implicit = _run_optax(make(), PARAMS, GRADS, jnp.float32)
        explicit = _run_optax(make(base_learning_rate=base), PARAMS, GRADS, jnp.float32)
        for k in PARAMS:
            np.testing.assert_array_equal(implicit[k], explicit[k])


@pytest.mark.parametrize("factory", [dbo.adabound, dbo.amsbound, dbo.adaboundw, dbo.amsboundw])
def test_a_rate_starting_at_zero_asks_for_the_base(factory):
    warmup = optax.linear_schedule(0.0, 1e-3, 100)
    with pytest.raises(ValueError, match=r"learning_rate\(0\) is 0\.0 and no base_learning_rate"):
        factory(warmup)
    factory(warmup, base_learning_rate=1e-3)  # the advice works
    injected = optax.inject_hyperparams(factory)(learning_rate=0.0)
    with pytest.raises(ValueError, match="learning_rate is 0.0 and no base_learning_rate"):
        injected.init({"w": jnp.zeros(3)})


def _counting_jit(fn):
    """jax.jit(fn) and a list that grows by one each time fn is traced."""
    traces = []

    def traced(*args):
        traces.append(None)
        return fn(*args)

    return jax.jit(traced), traces


def test_jit_traces_the_step_once():
    for tx in (
        dbo.amsbound(_piecewise(1e-3), base_learning_rate=1e-3),
        optax.inject_hyperparams(dbo.adaboundw)(
            learning_rate=_piecewise(1e-3), base_learning_rate=1e-3, weight_decay=1e-2
        ),
        optax.inject_hyperparams(dbo.adaboundw)(learning_rate=_piecewise(1e-3), weight_decay=1e-2),
    ):

        def step(p, s, g, tx=tx):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        f, traces = _counting_jit(step)
        p = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
        s = tx.init(p)
        for i in range(5):
            p, s = f(p, s, jax.tree.map(lambda x, i=i: jnp.full_like(x, i - 2.0), p))
        assert len(traces) == 1
    core_state = s.inner_state[0]
    assert isinstance(core_state, dbo.ScaleByAdaBoundState)
    assert core_state.count.dtype == jnp.int32 and int(core_state.count) == 5


def test_multisteps_matches_torch_on_averaged_gradients():
    k, steps = 3, 100
    micro, params = _gradients(k * steps, SHAPES, seed=3), _initial(SHAPES)
    mean = {n: g.reshape(steps, k, *g.shape[1:]).mean(axis=1) for n, g in micro.items()}
    expected = _run_torch(dynabound.AMSBound, {}, params, mean, torch.float32)
    tx = optax.MultiSteps(dbo.amsbound(1e-3), every_k_schedule=k)
    p = {n: jnp.asarray(v, jnp.float32) for n, v in params.items()}
    s = tx.init(p)
    update, traces = _counting_jit(tx.update)
    for t in range(k * steps):
        u, s = update({n: jnp.asarray(g[t], jnp.float32) for n, g in micro.items()}, s, p)
        if t % k != k - 1:  # no update until k micro-batches are in
            assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(u))
        p = optax.apply_updates(p, u)
    assert len(traces) == 1
    assert _rel_err({n: np.asarray(v) for n, v in p.items()}, expected) <= 1e-6


@pytest.mark.parametrize("dtype", ["complex64", "complex128"])
def test_complex_parameters_match_torch(dtype):
    """Real and imaginary parts are separate coordinates, as torch's view_as_real."""
    grads = _gradients(STEPS, SHAPES, seed=4, complex_=True)
    params = _initial(SHAPES, complex_=True)
    expected = _run_torch(
        dynabound.AMSBoundW, dict(weight_decay=0.1), params, grads, getattr(torch, dtype)
    )
    with _enable_x64(dtype == "complex128"):
        got = _run_optax(dbo.amsboundw(1e-3, weight_decay=0.1), params, grads, getattr(jnp, dtype))
        # The same run on the real view (last axis: real, imaginary part).
        as_real = {k: np.stack([v.real, v.imag], -1) for k, v in params.items()}
        g_real = {k: np.stack([v.real, v.imag], -1) for k, v in grads.items()}
        real_dtype = jnp.float32 if dtype == "complex64" else jnp.float64
        real = _run_optax(dbo.amsboundw(1e-3, weight_decay=0.1), as_real, g_real, real_dtype)
    tol = TOL["float32" if dtype == "complex64" else "float64"]
    assert got["w"].dtype == np.dtype(dtype)
    assert _rel_err(got, expected) <= tol
    got_as_real = {k: np.stack([v.real, v.imag], -1) for k, v in got.items()}
    assert _rel_err(got_as_real, real) <= tol


def test_mixed_dtype_pytree_keeps_dtypes():
    params = {
        "bf16": np.linspace(-1, 1, 6).reshape(2, 3).astype(jnp.bfloat16),
        "f16": np.ones(4, np.float16),
        "f32": {"scalar": np.float32(0.5), "m": np.zeros((2, 2, 2), np.float32)},
        "c64": np.asarray([1 + 2j, -3j], np.complex64),
    }
    tx = dbo.adaboundw(1e-2, weight_decay=0.1, amsbound=True)

    @jax.jit
    def run(p):
        s = tx.init(p)
        for _ in range(3):
            g = jax.tree.map(lambda x: (x + 2).astype(x.dtype), p)
            u, s = tx.update(g, s, p)
            p = optax.apply_updates(p, u)
        return p, s, u

    p, state, updates = jax.device_get(run(jax.device_put(params)))
    core = state[0]
    for tree in (p, updates, core.mu, core.nu, core.nu_max):
        assert jax.tree.map(lambda x: x.dtype, tree) == jax.tree.map(lambda x: x.dtype, params)
        assert jax.tree.map(np.shape, tree) == jax.tree.map(np.shape, params)
    assert all(np.isfinite(np.asarray(x, np.complex64)).all() for x in jax.tree.leaves(p))
    assert np.all(p["f32"]["m"] != 0) and np.all(p["bf16"] != params["bf16"])


def test_decoupled_decay_mask():
    params = {"b": np.ones(3), "w": np.full((2, 2), 2.0)}
    zeros = {k: np.zeros((4, *v.shape)) for k, v in params.items()}  # only the decay acts
    tx = dbo.adaboundw(0.1, weight_decay=0.5, mask={"b": False, "w": True})
    got = _run_optax(tx, params, zeros, jnp.float32)
    np.testing.assert_array_equal(got["b"], params["b"])
    np.testing.assert_allclose(got["w"], 2.0 * 0.95**4, rtol=1e-6)


@pytest.mark.parametrize("unscaled", [False, True])
def test_zero_learning_rate_moves_nothing(unscaled):
    """Warm-up and checkpoint loading step with lr = 0 and expect the parameters kept."""
    tx = dbo.amsboundw(0.0, weight_decay=0.1, base_learning_rate=1e-3, unscaled_decay=unscaled)
    got = _run_optax(tx, PARAMS, {k: g[:3] for k, g in GRADS.items()}, jnp.float32)
    for k in PARAMS:
        np.testing.assert_array_equal(got[k], PARAMS[k].astype(np.float32))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(learning_rate=-1e-3), "learning_rate"),
        (dict(learning_rate=1e-3, base_learning_rate=0.0), "base_learning_rate"),
        (dict(learning_rate=1e-3, final_lr=-0.1), "final_lr"),
        (
            dict(learning_rate=1e-3, final_lr=0.0),
            r"Invalid final_lr: 0\.0 \(must be > 0: .* 0 clips every step's rate to 0 and no "
            "parameter ever moves",
        ),
        (dict(learning_rate=1e-3, gamma=0.0), "gamma"),
        (dict(learning_rate=1e-3, b1=1.0), "b1"),
        (dict(learning_rate=1e-3, b2=-0.1), "b2"),
        (dict(learning_rate=1e-3, eps=-1e-8), "eps"),
        (dict(learning_rate=1e-3, weight_decay=-1e-2), "weight_decay"),
        (dict(learning_rate=1e-3, bounds="tight"), "bounds"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dbo.adabound(**kwargs)


@pytest.mark.parametrize("factory", [dbo.adabound, dbo.amsbound, dbo.adaboundw, dbo.amsboundw])
def test_zero_learning_rate_without_base_says_what_to_pass(factory):
    # The base defaults to learning_rate, so a bare lr = 0 must not be reported as an
    # invalid base_learning_rate the caller never passed; the message names the fix.
    with pytest.raises(ValueError) as info:
        factory(learning_rate=0.0)
    message = str(info.value)
    assert not message.startswith("Invalid base_learning_rate")
    assert "learning_rate is 0.0 and no base_learning_rate was given" in message
    assert "Pass base_learning_rate explicitly" in message
    assert "base_learning_rate=1e-3" in message
    factory(learning_rate=0.0, base_learning_rate=1e-3)  # the advice works


def test_explicit_nonpositive_base_learning_rate_is_invalid():
    with pytest.raises(ValueError, match=r"Invalid base_learning_rate: 0\.0 \(must be > 0; it is"):
        dbo.adabound(learning_rate=1e-3, base_learning_rate=0.0)
    with pytest.raises(ValueError, match=r"Invalid base_learning_rate: -0\.001"):
        dbo.adabound(learning_rate=0.0, base_learning_rate=-1e-3)


def test_scale_by_adabound_validation_and_lr_free_output():
    with pytest.raises(ValueError, match="final_lr_ratio"):
        dbo.scale_by_adabound(final_lr_ratio=-1.0)
    with pytest.raises(
        ValueError, match=r"final_lr_ratio: 0\.0 \(must be > 0: .* no parameter ever moves"
    ):
        dbo.scale_by_adabound(final_lr_ratio=0.0)
    # At t = 1: m = 0.1 g, sqrt(v) = sqrt(1e-3) |g|, numerator sqrt(1e-3) / 0.1, and the
    # rate is clamped into rho * [gamma / (gamma + 1), 1 + 1 / gamma]; no lr applied.
    tx = dbo.scale_by_adabound(final_lr_ratio=100.0)
    g = np.asarray([2.0, -0.5, 1e-7])
    u, s = tx.update(jnp.asarray(g, jnp.float32), tx.init(jnp.zeros(3)))
    rate = (np.sqrt(1e-3) / 0.1) / (np.sqrt(1e-3) * np.abs(g) + 1e-8)
    expected = np.clip(rate, 100.0 * 1e-3 / 1.001, 100.0 * 1001) * 0.1 * g
    assert 0.2 < expected[0] / g[0] < 1 and expected[2] / g[2] > 1e3  # inside, clamped
    np.testing.assert_allclose(np.asarray(u), expected, rtol=1e-6)
    assert s.nu_max is None and int(s.count) == 1


def test_importing_dynabound_does_not_need_jax():
    code = (
        "import sys\n"
        "sys.modules['jax'] = None\n"  # makes `import jax` fail like a missing package
        "import dynabound\n"
        "try:\n"
        "    import dynabound.optax\n"
        "except ImportError as e:\n"
        "    assert 'python -m pip install \".[jax]\"' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('dynabound.optax imported without jax')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


FACTORIES = [dbo.adabound, dbo.amsbound, dbo.adaboundw, dbo.amsboundw]


@pytest.mark.parametrize("factory", FACTORIES)
def test_signatures_are_introspectable_and_accept_schedules(factory):
    """optax's own tests decide from the annotation of learning_rate whether an optimizer
    takes schedules; string annotations (postponed evaluation) hide that."""
    lr = inspect.signature(factory).parameters["learning_rate"]
    assert lr.annotation is optax.ScalarOrSchedule
    hints = typing.get_type_hints(factory)
    assert hints["return"] is optax.GradientTransformation
    assert hints["base_learning_rate"] == float | None


@pytest.mark.parametrize("factory", FACTORIES)
def test_constant_schedule_equals_the_constant(factory):
    """optax's schedule test for its own optimizers, with ours: a constant schedule and the
    constant give the same parameters after 10 jitted steps of a parabola."""
    params = {"w": jnp.asarray([1.0, -2.0, 3.0])}

    @functools.partial(jax.jit, static_argnums=0)
    def step(tx, p, s):
        g = jax.grad(lambda q: jnp.sum(q["w"] ** 2))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    runs = []
    for lr in (optax.constant_schedule(1e-1), 1e-1):
        tx = factory(learning_rate=lr, weight_decay=1e-2)
        p, s = params, tx.init(params)
        for _ in range(10):
            p, s = step(tx, p, s)
        runs.append(p["w"])
    assert not np.allclose(runs[1], params["w"])
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-6)


@pytest.mark.parametrize("factory", FACTORIES)
def test_inject_hyperparams_wraps_it_like_optax_optimizers(factory):
    """optax's inject_hyperparams test: jitted init and update of the wrapped optimizer give
    the plain one's updates and state."""
    kwargs = dict(learning_rate=1e-2, final_lr=0.1)
    params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
    grads = [jnp.ones((2, 3)), -jnp.ones((2, 5, 2))]
    plain = factory(**kwargs)
    injected = optax.inject_hyperparams(factory)(**kwargs)
    updates, state = jax.jit(plain.update)(grads, jax.jit(plain.init)(params), params)
    updates_i, state_i = jax.jit(injected.update)(grads, jax.jit(injected.init)(params), params)
    assert jax.tree.structure(state_i.inner_state) == jax.tree.structure(state)
    # optax's tolerances: injected betas are float32 arrays, 1 - b2 is off by 1e-5.
    for a, b in zip(jax.tree.leaves(updates_i), jax.tree.leaves(updates), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3)
    for a, b in zip(jax.tree.leaves(state_i.inner_state), jax.tree.leaves(state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4)
    assert float(_core_state(state_i).base_learning_rate) == np.float32(1e-2)


# final_lr="auto": the estimate, step by step, against the PyTorch classes
# (tests/auto_final_lr_reference.py). Gradient scales over 1e-3..1 give steps whose Adam
# step does not descend (no sample), and rates clipped on both sides.
AUTO_GRADS = _gradients(auto.STEPS, SHAPES, seed=5)
AUTO_CASES = {
    "adabound": (dynabound.AdaBound, {}, dbo.adabound),
    "amsbound_l2": (dynabound.AMSBound, dict(weight_decay=0.05), dbo.amsbound),
    "adaboundw": (dynabound.AdaBoundW, dict(weight_decay=0.5), dbo.adaboundw),
}


def _optax_auto(tx, grads, dtype):
    """The final_lr each step used, the parameters after each, whether the estimate was
    fixed after each, and the last state: one jitted step, traced once."""

    def step(p, s, g):
        used = dbo.final_lr_in_use(s)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, used

    step, traces = _counting_jit(step)
    p = {k: jnp.asarray(v, dtype) for k, v in PARAMS.items()}
    s = tx.init(p)
    used, trajectory, fixed = [], [], []
    for t in range(len(grads["w"])):
        p, s, value = step(p, s, {k: jnp.asarray(g[t], dtype) for k, g in grads.items()})
        used.append(float(value))
        trajectory.append({k: np.asarray(v) for k, v in p.items()})
        fixed.append(bool(_core_state(s).final_lr_estimate.fixed))
    assert len(traces) == 1
    return np.array(used), trajectory, fixed, s


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", list(AUTO_CASES))
def test_auto_final_lr_follows_torch_step_by_step(case, dtype):
    cls, kwargs, factory = AUTO_CASES[case]
    expected = auto.torch_run(cls, dict(kwargs, gamma=auto.GAMMA), PARAMS, AUTO_GRADS, dtype)
    assert expected[2]["final_lr_auto"]["fixed_at"] == 100  # the cap, not settling
    if not kwargs:  # with weight decay, p's pull keeps every step descending
        assert np.isnan(np.array(expected[2]["final_lr_auto"]["history"])[:, 1]).any()
    with _enable_x64(dtype == "float64"):
        tx = factory(1e-3, final_lr="auto", gamma=auto.GAMMA, **kwargs)
        used, trajectory, fixed, _ = _optax_auto(tx, AUTO_GRADS, getattr(jnp, dtype))
    auto.assert_runs_agree(expected, used, trajectory, fixed, dtype, PARAMS)


def test_auto_final_lr_bounds_the_steps():
    """Controls for the test above: the same run with Adam's steps throughout, or with the
    final estimate as a number from the start, ends elsewhere."""
    _, trajectory, _, state = _optax_auto(
        dbo.adabound(1e-3, final_lr="auto", gamma=auto.GAMMA), AUTO_GRADS, jnp.float32
    )
    estimate = float(dbo.final_lr_in_use(state))
    for other in (
        optax.adam(1e-3, eps=1e-8),
        dbo.adabound(1e-3, final_lr=estimate, gamma=auto.GAMMA),
    ):
        got = _run_optax(other, PARAMS, AUTO_GRADS, jnp.float32)
        assert _rel_err(got, trajectory[-1]) > 1e-3


def test_auto_final_lr_settles_like_torch():
    """Gradients of one direction with small noise: the samples agree, and the estimate is
    fixed once SETTLE_PATIENCE samples in a row changed it by less than SETTLE_TOLERANCE,
    long before the cap of ceil(1/gamma) = 1000 steps."""
    rng = np.random.default_rng(6)
    steps = 140
    grads = {
        k: (1.0 + 0.01 * rng.standard_normal((steps, *s))) * rng.uniform(0.1, 1.0, size=s)
        for k, s in SHAPES.items()
    }
    expected = auto.torch_run(dynabound.AdaBound, {}, PARAMS, grads, "float64")
    assert expected[2]["final_lr_auto"]["fixed_at"] < steps < 1000
    with _enable_x64(True):
        used, trajectory, fixed, state = _optax_auto(
            dbo.adabound(1e-3, final_lr="auto"), grads, jnp.float64
        )
    auto.assert_runs_agree(expected, used, trajectory, fixed, "float64", PARAMS)
    assert int(_core_state(state).final_lr_estimate.calm) == 100


def test_auto_final_lr_with_a_schedule_through_inject_hyperparams():
    """A decaying rate (injected, traced) scales the step and the bounds; the estimate is
    referred to the base learning rate, as in the PyTorch class with a StepLR scheduler."""
    schedule = optax.piecewise_constant_schedule(1e-3, {60: 0.1, 120: 0.1})
    expected = auto.torch_run(
        dynabound.AMSBound,
        dict(gamma=auto.GAMMA),
        PARAMS,
        AUTO_GRADS,
        "float64",
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=60, gamma=0.1),
    )
    with _enable_x64(True):
        tx = optax.inject_hyperparams(dbo.amsbound)(
            learning_rate=schedule, final_lr="auto", gamma=auto.GAMMA
        )
        used, trajectory, fixed, _ = _optax_auto(tx, AUTO_GRADS, jnp.float64)
    auto.assert_runs_agree(expected, used, trajectory, fixed, "float64", PARAMS)


def test_auto_final_lr_ratio_of_the_core_alone():
    """scale_by_adabound knows no learning rate: its estimate is final_lr_ratio, the
    optimizer's divided by its base learning rate."""
    lr = 2e-3
    chained = _optax_auto(
        dbo.adabound(lr, final_lr="auto", gamma=auto.GAMMA), AUTO_GRADS, jnp.float32
    )[3]
    core = optax.chain(
        dbo.scale_by_adabound(final_lr_ratio="auto", gamma=auto.GAMMA),
        optax.scale_by_learning_rate(lr),
    )
    alone = _optax_auto(core, AUTO_GRADS, jnp.float32)[3]
    assert _core_state(alone).base_learning_rate is None
    ratio = float(dbo.final_lr_in_use(alone))
    assert ratio * lr == pytest.approx(float(dbo.final_lr_in_use(chained)), rel=1e-6)


def test_final_lr_in_use_needs_one_estimate():
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="found 0"):
        dbo.final_lr_in_use(dbo.adabound(1e-3).init(params))
    two = optax.multi_transform(
        {"a": dbo.adabound(1e-3, final_lr="auto"), "b": dbo.amsbound(1e-3, final_lr="auto")},
        {"w": "a", "v": "b"},
    )
    state = two.init({"w": jnp.ones(3), "v": jnp.ones(2)})
    with pytest.raises(ValueError, match="found 2"):
        dbo.final_lr_in_use(state)
    # Each partition estimates its own, like a param group: pass its part of the state.
    assert np.isnan(dbo.final_lr_in_use(state.inner_states["a"]))


def _torch_refusal(**kwargs) -> str:
    with pytest.raises(ValueError) as info:
        dynabound.AdaBound([torch.zeros(1, requires_grad=True)], final_lr="auto", **kwargs)
    return str(info.value)


def test_auto_final_lr_refusals_match_torch():
    for factory in FACTORIES:
        with pytest.raises(ValueError) as info:
            factory(1e-3, final_lr="auto", bounds="paper")
        assert str(info.value) == _torch_refusal(bounds="paper")
        with pytest.raises(ValueError) as info:
            factory(1e-3, final_lr="auto", bounds=lambda t: (0.0, 1.0))
        assert str(info.value) == _torch_refusal(bounds=lambda t: (0.0, 1.0))
        with pytest.raises(ValueError, match="final_lr must be a number or 'auto', got 'Auto'"):
            factory(1e-3, final_lr="Auto")
    with pytest.raises(ValueError, match="final_lr_ratio must be a number or 'auto'"):
        dbo.scale_by_adabound(final_lr_ratio="sgd")
    with pytest.raises(ValueError, match=r"bounds='paper'"):
        dbo.scale_by_adabound(final_lr_ratio="auto", bounds="paper")


def test_auto_final_lr_under_multisteps_estimates_from_the_averaged_gradients():
    """optax.MultiSteps updates the inner state once per k = 2 micro-batches: the
    estimate sees the averaged gradient, as the PyTorch class fed the averages does."""
    k = 2
    micro = _gradients(k * auto.STEPS, SHAPES, seed=7)
    # MultiSteps' running mean, acc + (g - acc) / n, in its order of roundings: the samples
    # are ratios of sums that may nearly cancel, so another order of the same average
    # moves them by far more than its own rounding.
    mean = {n: g[0::k] + (g[1::k] - g[0::k]) / 2 for n, g in micro.items()}
    expected = auto.torch_run(dynabound.AdaBound, dict(gamma=auto.GAMMA), PARAMS, mean, "float64")
    with _enable_x64(True):
        inner = dbo.adabound(1e-3, final_lr="auto", gamma=auto.GAMMA)
        # MultiSteps accumulates in float32 unless told otherwise, 64-bit JAX or not.
        tx = optax.MultiSteps(inner, k, accumulator_dtype=jnp.float64)
        used, trajectory, fixed, _ = _optax_auto(tx, micro, jnp.float64)
    # Keep what the inner optimizer saw after each whole step.
    auto.assert_runs_agree(
        expected, used[::k], trajectory[k - 1 :: k], fixed[k - 1 :: k], "float64", PARAMS
    )
