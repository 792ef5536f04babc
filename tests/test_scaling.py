"""dynabound.scale_batch_size: the square root rule for Adam, its extension to AdaBound."""

from __future__ import annotations

import inspect
import math
import re

import pytest
import torch

import dynabound
from dynabound import scale_batch_size
from dynabound.bounds import paper_bounds, reference_bounds
from dynabound.experiments.config import build_config

ADAM = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
BOUNDED = {**ADAM, "final_lr": 0.1, "gamma": 1e-3}


def test_adam_follows_the_square_root_rule():
    out = scale_batch_size(ADAM, 128, 512, method="adam")
    assert out["lr"] == pytest.approx(2e-3)
    assert out["beta1"] == pytest.approx(1 - 4 * 0.1)
    assert out["beta2"] == pytest.approx(1 - 4 * 0.001)
    assert out["eps"] == pytest.approx(0.5e-8)
    down = scale_batch_size(ADAM, 128, 32, method="amsgrad")
    assert (down["lr"], down["beta1"], down["beta2"], down["eps"]) == pytest.approx(
        (0.5e-3, 0.975, 0.99975, 2e-8)
    )


def test_bounded_methods_scale_the_sgd_phase_linearly():
    out = scale_batch_size(BOUNDED, 128, 512, method="adabound")
    assert out["lr"] == pytest.approx(2e-3)
    assert out["final_lr"] == pytest.approx(0.4)
    assert out["gamma"] == pytest.approx(4e-3)
    # final_lr / lr, the ratio the bounds are stored as, grows by sqrt(kappa).
    assert out["final_lr"] / out["lr"] == pytest.approx(2 * 0.1 / 1e-3)


@pytest.mark.parametrize("to_batch", [16, 32, 512, 1024])
def test_bounds_close_after_the_same_number_of_samples(to_batch):
    out = scale_batch_size(BOUNDED, 128, to_batch, method="amsbound")
    kappa = to_batch / 128
    for samples in (128 * 1024, 128 * 10_000, 128 * 100_000):
        lower, upper = reference_bounds(samples / 128, 0.1, 1e-3)
        scaled = reference_bounds(samples / to_batch, out["final_lr"], out["gamma"])
        assert scaled == pytest.approx((kappa * lower, kappa * upper), rel=1e-12)
    # The paper's bounds close with (1 - beta2) * step, which the rule keeps per sample.
    lower, upper = paper_bounds(1000.0, 0.1, 0.999)
    scaled = paper_bounds(1000.0 / kappa, out["final_lr"], out["beta2"])
    assert scaled == pytest.approx((kappa * lower, kappa * upper), rel=1e-9)


@pytest.mark.parametrize("method", ["adam", "adamw", "adabound", "adaboundw"])
def test_kappa_one_gives_back_the_same_values(method):
    given = dict(BOUNDED if "bound" in method else ADAM, weight_decay=0.05)
    out = scale_batch_size(given, 64, 64, method=method)
    assert out == given and out is not given


def test_composition_equals_the_direct_scaling():
    for method, given in (("adam", ADAM), ("adaboundw", {**BOUNDED, "weight_decay": 0.05})):
        for a, b, c in ((128, 32, 512), (128, 512, 32), (256, 64, 16)):
            twice = scale_batch_size(
                scale_batch_size(given, a, b, method=method), b, c, method=method
            )
            once = scale_batch_size(given, a, c, method=method)
            assert twice.keys() == once.keys()
            for key in once:
                assert twice[key] == pytest.approx(once[key], rel=1e-12, abs=1e-15), key


def test_betas_keep_their_spelling_and_missing_values_take_the_defaults():
    out = scale_batch_size({"lr": 1e-3, "betas": (0.9, 0.99)}, 1, 2, method="adam")
    assert list(out) == ["lr", "betas", "eps"]
    assert out["betas"] == pytest.approx((0.8, 0.98)) and isinstance(out["betas"], tuple)
    bare = scale_batch_size({"method": "AdaBound"}, 1, 4)
    assert bare["method"] == "AdaBound"
    assert bare["final_lr"] == pytest.approx(0.4) and bare["gamma"] == pytest.approx(4e-3)
    assert bare["beta1"] == pytest.approx(0.6) and bare["beta2"] == pytest.approx(0.996)
    assert bare["lr"] == pytest.approx(2e-3) and bare["eps"] == pytest.approx(5e-9)
    passthrough = scale_batch_size(
        {**BOUNDED, "bounds": "paper", "box": (-1, 1)}, 1, 2, method="adabound"
    )
    assert passthrough["bounds"] == "paper" and passthrough["box"] == (-1, 1)


def test_defaults_match_the_constructors():
    adam = inspect.signature(torch.optim.Adam).parameters
    bound = inspect.signature(dynabound.AdaBound).parameters
    out = scale_batch_size({}, 1, 1, method="adabound")
    assert out["lr"] == adam["lr"].default == bound["lr"].default
    assert (out["beta1"], out["beta2"]) == adam["betas"].default == bound["betas"].default
    assert out["eps"] == adam["eps"].default == bound["eps"].default
    assert (out["final_lr"], out["gamma"]) == (bound["final_lr"].default, bound["gamma"].default)
    adamw = scale_batch_size({}, 1, 1, method="adamw")
    assert (
        adamw["weight_decay"]
        == inspect.signature(torch.optim.AdamW).parameters["weight_decay"].default
    )


def test_weight_decay_keeps_the_decay_per_sample():
    coupled = scale_batch_size({**ADAM, "weight_decay": 5e-4}, 100, 400, method="adam")
    assert coupled["weight_decay"] == 5e-4
    decoupled = scale_batch_size({**ADAM, "weight_decay": 0.05}, 100, 400, method="adamw")
    assert decoupled["lr"] * decoupled["weight_decay"] == pytest.approx(4 * 1e-3 * 0.05)
    flagged = scale_batch_size(
        {**BOUNDED, "weight_decay": 0.05, "decoupled_weight_decay": True},
        100,
        400,
        method="adabound",
    )
    assert flagged["weight_decay"] == pytest.approx(0.1)
    unscaled = scale_batch_size(
        {**BOUNDED, "weight_decay": 1e-4, "unscaled_decay": True}, 100, 400, method="adaboundw"
    )
    assert unscaled["weight_decay"] == pytest.approx(4e-4)


def test_the_scaled_values_build_an_optimizer():
    out = scale_batch_size({"lr": 1e-3, "betas": (0.9, 0.999)}, 128, 1280, method="adabound")
    assert out["betas"][0] == pytest.approx(0.0, abs=1e-12)
    opt = dynabound.AdaBound([torch.zeros(2, requires_grad=True)], **out)
    assert opt.param_groups[0]["final_lr"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: scale_batch_size(ADAM, 128, 2048, method="adam"), "below 0"),
        (lambda: scale_batch_size({"beta1": 0.99, "beta2": 0.9}, 1, 11, method="adam"), "beta2"),
        (lambda: scale_batch_size(ADAM, 0, 128, method="adam"), "from_batch"),
        (lambda: scale_batch_size(ADAM, 128, -1, method="adam"), "to_batch"),
        (lambda: scale_batch_size(ADAM, 128, 2.5, method="adam"), "to_batch"),
        (lambda: scale_batch_size(ADAM, True, 2, method="adam"), "from_batch"),
        (lambda: scale_batch_size(ADAM, 128, 256), "say which optimizer"),
        (lambda: scale_batch_size(ADAM, 128, 256, method="sgdm"), "no batch-size scaling"),
        (lambda: scale_batch_size({"method": "adam"}, 1, 2, method="adabound"), "disagrees"),
        (
            lambda: scale_batch_size({"betas": (0.9, 0.9), "beta1": 0.9}, 1, 2, method="adam"),
            "not both",
        ),
        (lambda: scale_batch_size({"beta1": 1.0}, 1, 2, method="adam"), "[0, 1)"),
    ],
)
def test_errors(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_the_largest_kappa_is_named_in_the_error():
    with pytest.raises(ValueError, match=r"at most 1 / \(1 - beta1\) = 10"):
        scale_batch_size(ADAM, 1, 11, method="adam")
    assert math.isclose(scale_batch_size(ADAM, 1, 10, method="adam")["beta1"], 0, abs_tol=1e-12)


def test_the_harness_scales_presets_to_the_batch_size():
    config = build_config("mnist", "adabound", batch_size=512, scale_from_batch=128)
    assert config["hparams"]["lr"] == pytest.approx(2e-3)
    assert config["hparams"]["final_lr"] == pytest.approx(0.4)
    assert config["tuned_hparams"]["final_lr"] == 0.1 and config["scale_from_batch"] == 128
    given = build_config("mnist", "adam", hparams={"lr": 4e-3}, batch_size=32, scale_from_batch=128)
    assert given["hparams"]["lr"] == pytest.approx(2e-3)
    plain = build_config("mnist", "adam", batch_size=512)
    assert "scale_from_batch" not in plain and plain["hparams"]["lr"] == 1e-3
    with pytest.raises(ValueError, match="no batch-size scaling rule for sgdm"):
        build_config("mnist", "sgdm", batch_size=512, scale_from_batch=128)
