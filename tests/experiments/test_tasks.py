"""Each task trains one tiny epoch on fixtures in the real on-disk formats; presets and
optimizers; the convex counterexample reproduces Reddi et al.'s finding."""

from __future__ import annotations

import math

import pytest
import torch

from dynabound import AdaBound, AMSBound
from dynabound.experiments.optimizers import OPTIMIZERS, build_optimizer, is_dynabound
from dynabound.experiments.presets import preset
from dynabound.experiments.runner import build_config, train
from dynabound.experiments.tasks import TASKS
from dynabound.experiments.tasks.convex import ConvexTask, parse_sequence

from .fixtures import write_cifar10_archive, write_corpus, write_mnist


def _one_epoch(task: str, optim: str, data_dir, tmp_path, **kwargs) -> dict:
    config = build_config(task, optim, epochs=1, data_dir=data_dir, device="cpu", **kwargs)
    result = train(config, tmp_path / "run", quiet=True, figures=False)
    assert result.epochs_done == 1 and (tmp_path / "run" / "checkpoint.pt").is_file()
    return result.metrics[0]


def test_mnist_epoch_on_idx_fixture(tmp_path):
    write_mnist(tmp_path / "data" / "mnist", n_train=20, n_test=6)
    m = _one_epoch(
        "mnist", "adabound", tmp_path / "data", tmp_path, batch_size=8, task_args={"hidden": 16}
    )
    assert m["steps"] == 3 and 0 <= m["test_acc"] <= 100 and math.isfinite(m["train_loss"])
    assert m["bounds"]["step"] == 3
    assert [r["step"] for r in m["bounds_by_step"]] == [1, 2]  # powers of two, then per epoch


def test_cifar10_epoch_on_pickle_fixture(tmp_path):
    write_cifar10_archive(tmp_path / "data", per_batch=2, n_test=3)
    m = _one_epoch(
        "cifar10",
        "sgdm",
        tmp_path / "data",
        tmp_path,
        batch_size=10,
        task_args={"model": "resnet18"},
    )
    assert m["steps"] == 1 and math.isfinite(m["test_loss"])
    assert (tmp_path / "data" / "cifar-10-batches-py" / "test_batch").is_file()


def test_cifar10_presets_follow_the_paper():
    assert preset("cifar10", "adam", model="resnet34")["beta1"] == 0.99
    assert preset("cifar10", "adam", model="densenet121")["beta1"] == 0.9
    assert preset("cifar10", "sgdm") == {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
    bound = preset("cifar10", "amsbound")
    assert (bound["lr"], bound["final_lr"], bound["gamma"], bound["weight_decay"]) == (
        1e-3,
        0.1,
        1e-3,
        5e-4,
    )
    config = build_config("cifar10", "sgdm")
    assert (config["epochs"], config["batch_size"], config["milestones"]) == (200, 128, [150])


def test_ptb_epoch_on_text_fixture(tmp_path):
    write_corpus(tmp_path / "data" / "ptb")
    m = _one_epoch(
        "ptb",
        "adam",
        tmp_path / "data",
        tmp_path,
        batch_size=2,
        task_args={"layers": 3, "embed": 6, "hidden": 6, "bptt": 4, "eval_batch_size": 2},
    )
    assert {"train_ppl", "valid_ppl", "test_ppl"} <= set(m)
    vocab = 11  # the fixture's distinct training words and <eos>
    assert 1 < m["test_ppl"] < 3 * vocab


def test_ptb_accepts_other_corpus_names(tmp_path):
    write_corpus(tmp_path / "wiki", naming="{split}.txt")
    m = _one_epoch(
        "ptb",
        "sgdm",
        tmp_path / "wiki",
        tmp_path,
        batch_size=2,
        task_args={"embed": 4, "hidden": 4, "bptt": 4, "eval_batch_size": 1},
    )
    assert math.isfinite(m["valid_ppl"])


def test_digits_epoch_uses_the_data_shipped_with_sklearn(tmp_path):
    m = _one_epoch("digits", "amsgrad", None, tmp_path, task_args={"hidden": 16})
    assert m["steps"] == math.ceil(1347 / 32) and m["test_acc"] > 30


def test_convex_counterexample_adam_fails_the_bounded_methods_do_not(tmp_path):
    finals = {}
    for optim in ConvexTask.optimizers:
        config = build_config(
            "convex", optim, epochs=2, device="cpu", task_args={"steps_per_epoch": 400}
        )
        metrics = train(config, tmp_path / optim, quiet=True, figures=False).metrics
        finals[optim] = metrics[-1]
        assert len(metrics[0]["trace_x"]) == len(metrics[0]["trace_t"]) <= 200
    assert finals["adam"]["x"] > 0.95  # the worst point of [-1, 1]
    for optim in ("amsgrad", "adabound", "amsbound"):
        assert finals[optim]["x"] < -0.9, optim
        assert finals[optim]["avg_regret"] < 0.25 * finals["adam"]["avg_regret"], optim


def test_convex_problem_sets_betas_and_overrides_win():
    theorem = build_config("convex", "adam")["hparams"]
    assert (theorem["beta1"], theorem["beta2"]) == (0.0, 0.1)
    synthetic = build_config("convex", "adabound", task_args={"problem": "synthetic"})
    assert synthetic["hparams"]["bounds"] == "paper" and synthetic["hparams"]["box"] == [-1, 1]
    assert synthetic["hparams"]["beta2"] == 0.99 and synthetic["hparams"]["final_lr"] == 1e-3
    assert build_config("convex", "amsbound")["hparams"]["final_lr"] == 0.5
    chosen = build_config("convex", "adam", hparams={"beta2": 0.5})["hparams"]
    assert chosen["beta2"] == 0.5


def test_convex_gradients_follow_the_definition():
    task = ConvexTask({"task_args": {"problem": "synthetic"}}, torch.device("cpu"), None)
    g = task.gradients(1, 203)
    assert g[0] == 1010 and g[101] == 1010 and g[202] == 1010
    assert torch.all(g[1:101] == -10) and g.sum() == 3 * 1010 - 200 * 10


def test_convex_sequence_states_any_periodic_problem():
    theorem = ConvexTask({"task_args": {}}, torch.device("cpu"), None)
    same = ConvexTask({"task_args": {"sequence": "3, -1*2"}}, torch.device("cpu"), None)
    assert torch.equal(theorem.gradients(5, 30), same.gradients(5, 30))
    g = parse_sequence("-100,2,0*8")
    assert g.tolist() == [-100.0, 2.0] + [0.0] * 8
    for bad in ("1,x", "1*0", "0*3", "1,inf", ""):
        with pytest.raises(ValueError, match="sequence"):
            parse_sequence(bad)


def test_every_optimizer_builds_and_rejects_foreign_hyperparameters():
    for name in OPTIMIZERS:
        p = torch.nn.Parameter(torch.ones(3))
        opt = build_optimizer(name, [p], {"lr": 0.01})
        p.grad = torch.ones(3)
        opt.step()
        assert p.detach().lt(1).all(), name
        assert is_dynabound(name) == isinstance(opt, AdaBound)
    amsbound = build_optimizer(
        "amsbound", [torch.nn.Parameter(torch.ones(1))], {"beta1": 0.8, "final_lr": 0.2}
    )
    assert isinstance(amsbound, AMSBound)
    group = amsbound.param_groups[0]
    assert group["betas"] == (0.8, 0.999) and group["final_lr"] == 0.2 and group["amsbound"]
    with pytest.raises(ValueError, match="does not take final_lr"):
        build_optimizer("adam", [torch.nn.Parameter(torch.ones(1))], {"final_lr": 0.1})
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer("lion", [torch.nn.Parameter(torch.ones(1))], {})
    with pytest.raises(ValueError, match="does not take"):
        preset("mnist", "sgdm", {"gamma": 1e-3})


def test_registry_covers_the_paper_tasks():
    assert set(TASKS) == {"convex", "digits", "mnist", "cifar10", "ptb"}
    for task in TASKS.values():
        assert set(task.optimizers) <= set(OPTIMIZERS)
        assert {"epochs", "batch_size", "milestones", "lr_decay"} <= set(task.defaults)
