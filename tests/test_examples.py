"""The scripts in examples/ run, and each resumed run equals its uninterrupted one.

Each example trains a tiny model twice: straight through, and with a checkpoint half way and
a resume from it in fresh objects. Here both runs must end with the same parameters and
optimizer state, bit for bit. The examples' settings make that a real test: gamma is large,
so the bounds have closed in on final_lr before the checkpoint, and the learning rate decays
across it; a resume that rebuilt final_lr from the decayed lr, or lost the moments or the
step count, would end elsewhere.

The frameworks are not dependencies: an example whose framework is missing skips.
"""

from __future__ import annotations

import importlib.util
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(autouse=True)
def one_thread():
    # models this small gain nothing from a second thread, and on a loaded machine each op
    # would wait for it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_example(name: str, *needs: str):
    for module in needs:
        pytest.importorskip(module)
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_same_training_state(a_model, a_opt, b_model, b_opt, initial: dict, steps: int):
    """Same parameters (all moved from ``initial``) and optimizer state; every step counter
    at ``steps``; the lr decayed below the base_lr that final_lr refers to."""
    a_params, b_params = dict(a_model.named_parameters()), dict(b_model.named_parameters())
    assert a_params.keys() == b_params.keys() == initial.keys()
    for name, p in a_params.items():
        assert not torch.equal(p.detach(), initial[name]), f"{name} never moved"
        assert torch.equal(p.detach(), b_params[name].detach()), name
    a_state, b_state = a_opt.state_dict(), b_opt.state_dict()
    assert a_state["param_groups"] == b_state["param_groups"]
    assert a_state["state"].keys() == b_state["state"].keys()
    assert len(a_state["state"]) == len(a_params)
    for index, state in a_state["state"].items():
        assert state.keys() == b_state["state"][index].keys()
        for key, value in state.items():
            assert torch.equal(value, b_state["state"][index][key]), (index, key)
            if key == "step":
                assert value.item() == steps
    for group in b_state["param_groups"]:
        # the run really decayed lr, so resuming had to keep base_lr apart from it
        assert group["base_lr"] == b_opt.defaults["lr"] and group["lr"] < group["base_lr"]


@pytest.mark.parametrize("how", ["optimizers", "optimizer_cls_and_kwargs"])
def test_huggingface_trainer(tmp_path, how):
    # Trainer needs accelerate, which transformers does not pull in
    example = load_example("huggingface_trainer", "transformers", "accelerate")
    initial = {n: p.detach().clone() for n, p in example.make_model().named_parameters()}
    runs = example.main(steps=12, workdir=tmp_path, how=how)
    whole, resumed = runs["uninterrupted"], runs["resumed"]
    assert whole.state.global_step == resumed.state.global_step == 12
    # the checkpoint falls inside an epoch (8 batches each), so resuming skipped batches
    assert (tmp_path / "interrupted" / "checkpoint-6" / "optimizer.pt").exists()
    a_opt, b_opt = whole.optimizer.optimizer, resumed.optimizer.optimizer
    assert type(a_opt) is type(b_opt) is example.AdaBound
    if how == "optimizer_cls_and_kwargs":
        # Trainer's own groups: no weight decay for biases and LayerNorm
        assert sorted(g["weight_decay"] for g in b_opt.param_groups) == [0.0, 0.01]
    assert_same_training_state(whole.model, a_opt, resumed.model, b_opt, initial, steps=12)


def test_lightning_module(tmp_path):
    example = load_example("lightning_module", "lightning")
    example.pl.seed_everything(0, verbose=False)
    initial = {n: p.detach().clone() for n, p in example.Regression().named_parameters()}
    runs = example.main(steps=12, workdir=tmp_path)
    whole, resumed = runs["uninterrupted"], runs["resumed"]
    assert whole.global_step == resumed.global_step == 12
    a_opt, b_opt = whole.optimizers[0], resumed.optimizers[0]
    assert_same_training_state(
        whole.lightning_module, a_opt, resumed.lightning_module, b_opt, initial, steps=12
    )
    # StepLR(step_size=3, gamma=0.8), stepped every batch: four decays in 12 steps
    assert math.isclose(b_opt.param_groups[0]["lr"], b_opt.defaults["lr"] * 0.8**4)


def test_optax_loop(tmp_path):
    example = load_example("optax_loop", "jax", "optax")
    jax, np = example.jax, example.np
    runs = example.main(steps=120, workdir=tmp_path)
    assert (tmp_path / "checkpoint.pkl").exists()
    whole, resumed = runs["uninterrupted"], runs["resumed"]
    initial = example.init_params(jax.random.PRNGKey(0))
    for a, b, start in zip(
        jax.tree_util.tree_leaves(whole["params"]),
        jax.tree_util.tree_leaves(resumed["params"]),
        jax.tree_util.tree_leaves(initial),
        strict=True,
    ):
        assert np.array_equal(a, b) and not np.array_equal(a, start)
    a_state, b_state = (jax.tree_util.tree_leaves(r["opt_state"]) for r in (whole, resumed))
    assert len(a_state) == len(b_state) > 0
    assert all(np.array_equal(a, b) for a, b in zip(a_state, b_state, strict=True))
    assert jax.tree_util.tree_structure(whole["opt_state"]) == jax.tree_util.tree_structure(
        resumed["opt_state"]
    )
    # the step counts of AdaBound's core and of the schedule both went on from the file
    counts = [int(s.count) for s in resumed["opt_state"] if "count" in getattr(s, "_fields", ())]
    assert counts == [120, 120], resumed["opt_state"]


# Runs in a process of its own: Keras fixes its backend for good when it is first imported.
# Saves what the test compares: weights (also of a fresh model) and optimizer variables.
KERAS_RUN = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import keras_model
from keras import ops
runs = keras_model.main(epochs=4, workdir=sys.argv[2])
runs["initial"] = keras_model.make_model()
arrays = {}
for run, model in runs.items():
    for i, v in enumerate(model.weights):
        arrays[f"{run}/weights/{i}"] = ops.convert_to_numpy(v)
    for i, v in enumerate(model.optimizer.variables if run != "initial" else []):
        # slot names follow the layers' names, which differ between the two models
        name = v.name if v.name in ("iteration", "base_learning_rate") else "slot"
        arrays[f"{run}/optimizer/{i}/{name}"] = ops.convert_to_numpy(v)
    arrays[f"{run}/learning_rate"] = ops.convert_to_numpy(model.optimizer.learning_rate)
np.savez(sys.argv[3], **arrays)
"""


@pytest.mark.parametrize("backend", ["torch", "jax", "tensorflow"])
def test_keras_model(tmp_path, backend):
    if importlib.util.find_spec("keras") is None:
        # not importorskip: importing Keras here would fix its backend for this process
        pytest.skip("needs keras")
    if importlib.util.find_spec("dynabound.keras") is None:
        pytest.skip("needs dynabound.keras")
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"needs {backend}")
    out = tmp_path / "arrays.npz"
    env = dict(os.environ, OMP_NUM_THREADS="1", KERAS_BACKEND=backend)  # see one_thread
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"  # TensorFlow's start-up notices
    result = subprocess.run(
        [sys.executable, "-c", KERAS_RUN, str(EXAMPLES), str(tmp_path), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "half.keras").exists()
    arrays = dict(np.load(out))
    whole, resumed = (
        sorted(k.partition("/")[2] for k in arrays if k.startswith(run + "/"))
        for run in ("uninterrupted", "resumed")
    )
    assert whole == resumed and len(whole) > 10
    for key in whole:
        a, b = arrays["uninterrupted/" + key], arrays["resumed/" + key]
        assert np.array_equal(a, b), key
        if key.startswith("weights/"):
            assert not np.array_equal(a, arrays["initial/" + key]), f"{key} never moved"
        if key.endswith("/iteration"):
            assert a == 4 * 8  # 4 epochs of 8 batches
        if key.endswith("/base_learning_rate"):
            # the schedule decayed the rate, so the file had to bring the base back
            assert a == np.float32(1e-2) > arrays["resumed/learning_rate"]
    assert any(k.endswith("/base_learning_rate") for k in whole)
    assert any(k.endswith("/iteration") for k in whole)


def test_runs_as_a_script(capsys):
    # one example's __main__ block; the others' are alike, and their main() is tested above
    pytest.importorskip("lightning")
    runpy.run_path(str(EXAMPLES / "lightning_module.py"), run_name="__main__")
    assert "resumed run equals the uninterrupted one" in capsys.readouterr().out
