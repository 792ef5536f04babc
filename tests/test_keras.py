"""dynabound.keras against the PyTorch optimizers, on Keras' TensorFlow, JAX and PyTorch
backends (each one that is installed).

Keras fixes its backend at import, so the Keras side runs in one subprocess per backend
(tests/keras_runs.py; all start together, once per session, also under pytest-xdist)
and this process compares what they report with the PyTorch classes.

Parity runs feed both the same gradient sequence for 1000 steps (per-element scales over
1e-6..1, so elements sit below, inside and above the bounds; weight decay feeds the
parameters back into the gradient). Errors are max|a - b| / max|b| per tensor, as in
tests/test_optax.py. Both sides compute the same operations in the same order, so they
differ by roundings only: the step's scalars (bias correction, bounds), which PyTorch
forms in float64 and Keras in the parameters' dtype, and the FMAs each compiler may form.
The observed errors are at most 2.4e-7 in float32 (two roundings of the largest
parameter) and 5.5e-16 in float64, on each backend; TOL leaves room for other compilers
and CPUs, and is still far below what a wrong bound, bias correction or decay would give
(>= 1e-4).
"""

from __future__ import annotations

import fcntl
import functools
import importlib.util
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("keras") is None:
    # Not pytest.importorskip("keras"): importing Keras here would fix its backend for
    # this process (TensorFlow, when none is chosen), and the tests need two.
    pytest.skip("needs keras (the [keras] extra)", allow_module_level=True)

import torch  # noqa: E402

import dynabound  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import auto_final_lr_reference as auto  # noqa: E402
import keras_runs as runs  # noqa: E402
from option_sets import cases  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("jax", "torch", "tensorflow")
INSTALLED = [b for b in BACKENDS if importlib.util.find_spec(b) is not None]
TOL = {"float32": 1e-6, "float64": 1e-14}
PARAMS, GRADS = runs.initial(), runs.gradients()


def _env() -> dict[str, str]:
    """This checkout's dynabound first, installed or not."""
    path = [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path)))


def _run_backends(directory: Path) -> dict[str, Path | str]:
    """Run keras_runs.py on every backend at once; the pickle's path, or the failure."""
    env = _env()
    # The models are tiny: extra threads only spin, which costs ten times the CPU time.
    env["OMP_NUM_THREADS"] = "1"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"  # TensorFlow's start-up notices
    script = str(Path(runs.__file__))
    jobs = {}
    for backend in INSTALLED:
        env["KERAS_BACKEND"] = backend
        jobs[backend] = subprocess.Popen(
            [sys.executable, script, backend, str(directory / f"{backend}.pkl")],
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    results: dict[str, Path | str] = {}
    for backend, job in jobs.items():
        try:
            output, _ = job.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            job.kill()
            output, _ = job.communicate()
        path = directory / f"{backend}.pkl"
        ok = job.returncode == 0 and path.exists()
        results[backend] = path if ok else f"exit {job.returncode}:\n{output[-6000:]}"
    return results


@pytest.fixture(scope="session")
def keras_results(tmp_path_factory) -> dict[str, Path | str]:
    # Under xdist every worker has its own basetemp below a shared parent: the first worker
    # to get here runs the backends, the others wait on the lock and read its pickles.
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    directory = base / "keras_runs"
    directory.mkdir(exist_ok=True)
    with open(directory / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = directory / "done.pkl"
        if done.exists():
            return pickle.loads(done.read_bytes())
        results = _run_backends(directory)
        done.write_bytes(pickle.dumps(results))
        return results


@pytest.fixture(params=BACKENDS)
def backend_run(request, keras_results) -> dict:
    if request.param not in INSTALLED:
        # a skip in the summary, not a backend quietly left out
        pytest.skip(f"needs {request.param}")
    result = keras_results[request.param]
    if isinstance(result, str):
        pytest.fail(f"keras_runs.py on {request.param} failed: {result}", pytrace=False)
    with open(result, "rb") as f:
        return pickle.load(f)


def _rel_err(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(a[k] - b[k])) / np.max(np.abs(b[k]))) for k in b)


def _run_torch(
    cls_name, kwargs, dtype, steps=runs.STEPS, schedule=None, groups=None, data=(PARAMS, GRADS)
):
    """The PyTorch class's single-tensor path (the specification of the update)."""
    params, gradients = data
    tensors = {
        k: torch.tensor(v, dtype=getattr(torch, dtype), requires_grad=True)
        for k, v in params.items()
    }
    grads = {k: torch.tensor(v[:steps], dtype=getattr(torch, dtype)) for k, v in gradients.items()}
    params = groups(tensors) if groups else list(tensors.values())
    opt = getattr(dynabound, cls_name)(params, foreach=False, **runs.to_torch(kwargs))
    scheduler = schedule(opt) if callable(schedule) else None
    for t in range(steps):
        if schedule == "by_hand" and t == runs.BY_HAND_STEP:
            for group in opt.param_groups:
                group["lr"] = runs.BY_HAND_LR
        for k, p in tensors.items():
            p.grad = grads[k][t]
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return {k: p.detach().numpy() for k, p in tensors.items()}


@functools.cache
def _expected(case: str, dtype: str) -> dict:
    cls, kwargs = runs.CASES[case]
    return _run_torch(cls, kwargs, dtype)


PARITY = [(c, "float32") for c in runs.CASES] + [(c, "float64") for c in runs.FLOAT64_CASES]


def test_gradients_hit_both_bounds_and_the_band_between():
    """The parity runs mean something only if the clamp is active both ways and not always."""
    for g in GRADS.values():
        t = np.arange(1, runs.STEPS + 1).reshape(-1, *([1] * (g.ndim - 1)))
        v = np.zeros_like(g)
        for i in range(runs.STEPS):
            v[i] = 0.999 * v[i - 1] + 0.001 * g[i] ** 2 if i else 0.001 * g[i] ** 2
        rate = np.sqrt(1 - 0.999**t) / (1 - 0.9**t) / (np.sqrt(v) + 1e-8)
        below, above = rate < 100 * (1e-3 * t) / (1e-3 * t + 1), rate > 100 * (1 + 1e3 / t)
        for region in (below, above, ~below & ~above):
            assert 0.1 < region.mean() < 0.9


@pytest.mark.parametrize("case, dtype", PARITY, ids=[f"{c}-{d}" for c, d in PARITY])
def test_parity_with_torch(backend_run, case, dtype):
    expected = _expected(case, dtype)
    got = backend_run["parity", case, dtype]
    assert got["w"].dtype == np.dtype(dtype)
    # The run must have moved the parameters, or agreement would prove nothing.
    assert _rel_err(PARAMS, expected) > 1e-3
    assert _rel_err(got, expected) <= TOL[dtype]


@pytest.mark.parametrize(("name", "options"), cases("keras"))
def test_every_option_set_matches_torch(backend_run, name, options):
    """The registry's option sets (tests/option_sets.py), in float32."""
    got = backend_run["registry", name]
    assert not isinstance(got, str), got
    cls, kwargs = runs.to_keras(options)
    expected = _run_torch(cls, kwargs, "float32", steps=runs.REGISTRY_STEPS)
    assert _rel_err(got, expected) <= TOL["float32"]


TORCH_SCHEDULES = {
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=300, gamma=0.1),
    "exponential": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 ** (t / 100)),
    "by_hand": "by_hand",  # group["lr"] set at BY_HAND_STEP
}


@pytest.mark.parametrize("name", list(runs.SCHEDULES))
def test_schedules_scale_the_bounds_like_torch_schedulers(backend_run, name):
    """A Keras schedule (or optimizer.learning_rate set by hand) scales the Adam step and
    both bounds as a PyTorch scheduler scaling group["lr"] does: elements sit at both
    bounds in these runs, so bounds left at final_lr would differ by far more than TOL."""
    cls, kwargs = runs.SCHEDULES[name]
    expected = _run_torch(cls, kwargs, "float32", schedule=TORCH_SCHEDULES[name])
    assert _rel_err(expected, _expected("adabound", "float32")) > 1e-3
    assert _rel_err(backend_run["schedule", name], expected) <= TOL["float32"]


def test_exclude_from_weight_decay_matches_a_torch_group_without_decay(backend_run):
    def groups(tensors):
        return [{"params": [tensors["b"]], "weight_decay": 0.0}, {"params": [tensors["w"]]}]

    expected = _run_torch("AdaBoundW", dict(weight_decay=0.1), "float32", 100, groups=groups)
    decayed = _run_torch("AdaBoundW", dict(weight_decay=0.1), "float32", 100)
    assert _rel_err({"b": decayed["b"]}, {"b": expected["b"]}) > 1e-3
    assert _rel_err(backend_run["exclusion"], expected) <= TOL["float32"]


SPARSE_TYPES = {"tensorflow": "IndexedSlices", "jax": "BCOO", "torch": "torch.sparse_coo"}


def _state_rel_err(a: list, b: list) -> float:
    """As _rel_err, over optimizer variables (some are zeros: accumulators, counters)."""
    return max(
        float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) or 1.0))
        for x, y in zip(a, b, strict=True)
        if y.size
    )


@pytest.mark.parametrize("case", list(runs.SPARSE_CASES))
def test_sparse_gradients_give_the_dense_update(backend_run, case):
    """Sparse gradients (one row twice, most rows absent each step) and the dense gradients
    they stand for give the same weights and optimizer state, through Keras' clipping,
    accumulation and loss scaling too: bit for bit, or to float rounding where XLA compiled
    the step (it may fuse the densification into the step)."""
    runs_of_case = {k[2]: k for k in backend_run if k[:2] == ("sparse", case) and k[3]}
    if not runs_of_case:
        pytest.skip("Keras' LossScaleOptimizer cannot check sparse gradients on PyTorch")
    initial = runs.sparse_initial()
    for xla, key in runs_of_case.items():
        sparse, dense = backend_run[key], backend_run[key[:3] + (False,)]
        assert sparse["type"] == SPARSE_TYPES[backend_run["backend"]]
        assert dense["type"] not in SPARSE_TYPES.values()
        assert _rel_err(initial, dense["weights"]) > 1e-3
        assert len(sparse["state"]) == len(dense["state"]) > 4
        if xla:
            assert _rel_err(sparse["weights"], dense["weights"]) <= TOL["float32"]
            assert _state_rel_err(sparse["state"], dense["state"]) <= TOL["float32"]
        else:
            assert all(np.array_equal(sparse["weights"][k], dense["weights"][k]) for k in initial)
            assert _equal(sparse["state"], dense["state"])


@pytest.mark.parametrize("case", runs.SPARSE_TORCH_CASES)
def test_sparse_gradients_match_torch(backend_run, case):
    cls, kwargs = runs.SPARSE_CASES[case]
    data = (runs.sparse_initial(), runs.sparse_gradients()["dense"])
    expected = _run_torch(cls, kwargs, "float32", runs.SPARSE_STEPS, data=data)
    got = next(backend_run[k] for k in backend_run if k[:2] == ("sparse", case) and k[3])
    assert _rel_err(got["weights"], expected) <= TOL["float32"]


def test_embedding_model_trains(backend_run):
    """model.fit with an embedding and clipnorm, Keras' own regression case for sparse
    gradients. TensorFlow's Embedding and a wrapped torch.nn.Embedding(sparse=True) have
    sparse gradients; JAX differentiates the gather into a dense one."""
    before, after = backend_run["embedding", "loss"]
    assert after < 0.5 * before
    assert backend_run["embedding", "sparse"] == (backend_run["backend"] != "jax")


def _needs_digits(backend_run) -> None:
    if not backend_run["sklearn"]:
        pytest.skip("needs scikit-learn (its digits data set)")


def test_fit_on_digits(backend_run):
    """model.fit on scikit-learn's digits (1500 train, 297 test, 6 epochs): about 96%,
    with Keras' Adam at the same learning rate alongside."""
    _needs_digits(backend_run)
    assert backend_run["fit", "adabound", "steps"] == 6 * 47
    accuracy, adam = backend_run["fit", "adabound"], backend_run["fit", "adam"]
    assert accuracy >= 0.93
    assert accuracy >= adam - 0.03
    # final_lr="auto" in model.fit's compiled step: estimated, fixed, and training well.
    assert backend_run["fit", "auto", "fixed"]
    assert 0 < backend_run["fit", "auto", "final_lr"] < 1
    assert backend_run["fit", "auto"] >= adam - 0.03


def _equal(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_saved_and_loaded_model_continues_exactly(backend_run):
    """Two epochs, the learning rate cut by hand, save to .keras, load, two more epochs:
    bit for bit the weights and optimizer state of four epochs in one go."""
    _needs_digits(backend_run)
    weights, state = backend_run["resume", "straight"]
    loaded_weights, loaded_state = backend_run["resume", "loaded"]
    assert backend_run["resume", "loaded_type"] == "AMSBoundW"
    config = backend_run["resume", "loaded_config"]
    assert config["learning_rate"] == pytest.approx(1e-4)
    assert config["base_learning_rate"] == pytest.approx(1e-3)
    assert _equal(loaded_weights, weights)
    assert _equal(loaded_state, state)


def test_loaded_weights_restore_the_base_learning_rate(backend_run):
    """Optimizer weights loaded into an optimizer built with the decayed rate bring back
    the base the bounds refer to (its default would be the decayed rate)."""
    _needs_digits(backend_run)
    assert backend_run["resume", "rebuilt_base"] == pytest.approx(1e-3)
    weights, state = backend_run["resume", "straight"]
    rebuilt_weights, rebuilt_state = backend_run["resume", "rebuilt"]
    assert _equal(rebuilt_weights, weights)
    assert _equal(rebuilt_state, state)


@functools.cache
def _expected_auto(case: str) -> tuple:
    cls, kwargs, dtype, kind = runs.AUTO_CASES[case]
    grads = runs.auto_gradients(kind)
    return auto.torch_run(getattr(dynabound, cls), runs.to_torch(kwargs), PARAMS, grads, dtype)


@pytest.mark.parametrize("case", list(runs.AUTO_CASES))
def test_auto_final_lr_follows_torch_step_by_step(backend_run, case):
    """final_lr="auto": the final_lr each step used and the parameters after it, as in
    PyTorch's AdaBound(final_lr="auto", foreach=False) (tests/auto_final_lr_reference.py):
    estimated over both variables, fixed at the cap (gamma=0.02: step 100) or, for
    "settles", once settled; the runs go on with the fixed value."""
    expected = _expected_auto(case)
    record = expected[2]["final_lr_auto"]
    if case == "settles":
        assert 100 < record["fixed_at"] < auto.STEPS  # 100 calm samples; the cap is 1000
    else:
        assert record["fixed_at"] == 100
    got = backend_run["auto", case]
    assert got["trajectory"][-1]["w"].dtype == np.dtype(runs.AUTO_CASES[case][2])
    auto.assert_runs_agree(
        expected, got["used"], got["trajectory"], got["fixed"], runs.AUTO_CASES[case][2], PARAMS
    )


def test_auto_final_lr_continues_from_saved_variables(backend_run):
    """An optimizer rebuilt from the config and saved variables mid-estimation (step 50)
    continues the estimate exactly: the same steps as one run straight through."""
    straight, resumed = backend_run["auto", "adabound"], backend_run["auto", "resumed"]
    np.testing.assert_array_equal(resumed["used"], straight["used"])
    assert resumed["fixed"] == straight["fixed"]
    for a, b in zip(resumed["trajectory"], straight["trajectory"], strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in b)


def test_auto_final_lr_refusals_match_torch(backend_run):
    bad = dynabound.AdaBound([torch.zeros(1, requires_grad=True)], final_lr=0.1)
    for name, kwargs in runs.AUTO_INVALID.items():
        message = backend_run["auto_error", name]
        assert message is not None, f"{name}: no ValueError"
        with pytest.raises(ValueError) as info:
            torch_kwargs = {"final_lr": "auto", **runs.to_torch(kwargs)}
            bad.add_param_group({"params": [torch.zeros(1, requires_grad=True)], **torch_kwargs})
        # The same reason, after the class name: "AdaBound: ..."
        assert message == f"AdaBound: {str(info.value).removeprefix('AdaBound: ')}"
    assert backend_run["auto_number_in_use"] == 0.05


# The PyTorch class raises the same message for these.
SHARED_MESSAGES = ("lr", "final_lr", "zero_final_lr", "gamma", "epsilon", "weight_decay")


@pytest.mark.parametrize("name", list(runs.INVALID))
def test_invalid_hyperparameters(backend_run, name):
    kwargs, pattern = runs.INVALID[name]
    message = backend_run["error", name]
    assert message is not None, f"{name}: no ValueError"
    assert message.startswith("AdaBound: ")
    assert re.search(pattern, message), message
    if name in SHARED_MESSAGES:
        with pytest.raises(ValueError, match=pattern):
            dynabound.AdaBound([torch.zeros(1, requires_grad=True)], **runs.to_torch(kwargs))


def test_config_round_trip(backend_run):
    for name in ("AdaBound", "AMSBound", "AdaBoundW", "AMSBoundW"):
        entry = backend_run["config", name]
        config = entry["config"]
        assert entry["round_trip"] == config
        assert entry["revived_type"] == name
        assert entry["revived"] == config
        assert config["amsbound"] == name.startswith("AMS")
        assert config["decoupled_weight_decay"] == name.endswith("W")
    custom = backend_run["config", "AdaBound"]["config"]
    expected = dict(
        learning_rate=pytest.approx(3e-3), final_lr=0.05, gamma=1e-2, beta_1=0.8, beta_2=0.99,
        epsilon=1e-6, weight_decay=1e-4, bounds="paper", clipnorm=1.0,
        base_learning_rate=pytest.approx(3e-3),
    )  # fmt: skip
    assert {k: custom[k] for k in expected} == expected
    scheduled = backend_run["config", "AMSBound"]["config"]
    assert scheduled["learning_rate"]["class_name"] == "ExponentialDecay"
    assert scheduled["base_learning_rate"] == pytest.approx(2e-3)
    assert backend_run["config", "AdaBoundW"]["config"]["unscaled_decay"] is True
    zero = backend_run["config", "AMSBoundW"]["config"]
    assert zero["learning_rate"] == 0.0 and zero["base_learning_rate"] == pytest.approx(1e-3)


def test_importing_dynabound_does_not_import_keras():
    code = (
        "import sys\n"
        "import dynabound\n"
        "assert 'keras' not in sys.modules\n"
        "sys.modules['keras'] = None\n"  # makes `import keras` fail like a missing package
        "try:\n"
        "    import dynabound.keras\n"
        "except ImportError as e:\n"
        "    assert 'python -m pip install \".[keras]\"' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('dynabound.keras imported without keras')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=_env())
