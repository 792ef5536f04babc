"""The comparators against independent NumPy models of their papers' equations, their
option checks, and their place in the harness."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from dynabound.experiments import comparators as C
from dynabound.experiments.cli import main
from dynabound.experiments.config import build_config
from dynabound.experiments.optimizers import OPTIMIZERS, build_optimizer, display_name
from tests import oracle_comparators as oracle

STEPS = 50
SHAPES = [(5, 3), (7,), (1,)]


def _gradients(seed: int, scale: float = 1.0) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    # Gradients of uneven size per element, and a few exact zeros (sign(0) = 0 matters).
    grads = []
    for _ in range(STEPS):
        step = [rng.normal(size=s) * rng.uniform(0.01, 3.0, size=s) * scale for s in SHAPES]
        step[0][0, 0] = 0.0
        grads.append(step)
    return grads


def _run_torch(cls, params, grads, **hyper) -> list[list[np.ndarray]]:
    tensors = [torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in params]
    opt = cls(tensors, **hyper)
    out = []
    for step in grads:
        for t, g in zip(tensors, step, strict=True):
            t.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        out.append([t.detach().numpy().copy() for t in tensors])
    return out


CASES = [
    (C.Adan, oracle.adan, dict(lr=1e-2, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.0)),
    (C.Adan, oracle.adan, dict(lr=3e-2, betas=(0.5, 0.7, 0.9), eps=1e-3, weight_decay=0.05)),
    (
        C.AdamSSM,
        oracle.adamssm,
        dict(lr=1e-2, betas=(0.9, 0.999), pole=0.9, zero=0.5, eps=1e-8, weight_decay=0.0),
    ),
    (
        C.AdamSSM,
        oracle.adamssm,
        dict(lr=1e-2, betas=(0.8, 0.95), pole=0.7, zero=-0.3, eps=1e-6, weight_decay=0.01),
    ),
    (C.DeltaGClip, oracle.delta_gclip, dict(lr=0.2, clip_norm=1.0, delta=1e-3, weight_decay=0)),
    (C.DeltaGClip, oracle.delta_gclip, dict(lr=0.1, clip_norm=5.0, delta=0.3, weight_decay=0.1)),
    (C.Signum, oracle.signum, dict(lr=1e-2, momentum=0.9, weight_decay=0.0)),
    (C.Signum, oracle.signum, dict(lr=1e-2, momentum=0.5, weight_decay=0.1)),
]


@pytest.mark.parametrize(("cls", "model", "hyper"), CASES, ids=lambda c: getattr(c, "__name__", ""))
def test_fifty_steps_match_the_numpy_model(cls, model, hyper):
    rng = np.random.default_rng(0)
    params = [rng.normal(size=s) for s in SHAPES]
    # Large and small gradients, so that the clipping rule's three branches are all taken.
    for scale in (1.0, 0.02, 30.0):
        grads = _gradients(1, scale)
        got = _run_torch(cls, params, grads, **hyper)
        want = model(params, grads, **hyper)
        for k, (g_step, w_step) in enumerate(zip(got, want, strict=True)):
            for g, w in zip(g_step, w_step, strict=True):
                np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12, err_msg=f"step {k}")


def test_signsgd_is_signum_without_momentum():
    rng = np.random.default_rng(2)
    params = [rng.normal(size=s) for s in SHAPES]
    grads = _gradients(3)
    got = _run_torch(C.SignSGD, params, grads, lr=1e-2, weight_decay=0.01)
    want = oracle.signum(params, grads, lr=1e-2, momentum=0.0, weight_decay=0.01)
    np.testing.assert_allclose(got[-1][0], want[-1][0], rtol=1e-12)
    # Every element moves by exactly lr, except where the gradient is zero.
    step = got[1][1] - got[0][1]
    assert np.allclose(np.abs(step), 1e-2 * (grads[1][1] + 0.01 * got[0][1] != 0), rtol=1e-9)


def test_gclip_regimes():
    p = torch.zeros(4, requires_grad=True)
    opt = C.DeltaGClip([p], lr=1.0, clip_norm=1.0, delta=0.1)
    for grad, expected_scale in (
        ([0.3, 0, 0, 0], 1.0),
        ([2.0, 0, 0, 0], 0.5),
        ([100, 0, 0, 0], 0.1),
    ):
        p.data.zero_()
        p.grad = torch.tensor(grad, dtype=torch.float32)
        opt.step()
        assert p[0].item() == pytest.approx(-grad[0] * expected_scale)
    p.data.zero_()
    p.grad = torch.zeros(4)
    opt.step()
    assert torch.equal(p.detach(), torch.zeros(4))


def test_adamssm_with_the_zero_on_the_pole_is_adam():
    torch.manual_seed(0)
    a = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = a.detach().clone().requires_grad_()
    ssm = C.AdamSSM([a], lr=1e-2, pole=0.7, zero=0.7)
    adam = torch.optim.Adam([b], lr=1e-2)
    for _ in range(30):
        g = torch.randn(6, dtype=torch.float64)
        a.grad, b.grad = g.clone(), g.clone()
        ssm.step()
        adam.step()
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(1)
    for cls in (C.Adan, C.AdamSSM, C.Signum):
        a = torch.randn(5, requires_grad=True)
        opt = cls([a], lr=1e-2)
        for _ in range(3):
            a.grad = torch.randn(5)
            opt.step()
        b = a.detach().clone().requires_grad_()
        other = cls([b], lr=1e-2)
        other.load_state_dict(copy.deepcopy(opt.state_dict()))
        g = torch.randn(5)
        a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        other.step()
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (C.Adan, dict(lr=0), "lr must be positive"),
        (C.Adan, dict(betas=(0.9, 0.9)), "three betas"),
        (C.Adan, dict(betas=(0.9, 1.0, 0.9)), "beta2 must lie in [0, 1)"),
        (C.Adan, dict(eps=-1), "eps must be 0 or more"),
        (C.Adan, dict(weight_decay=-0.1), "weight_decay must be 0 or more"),
        (C.AdamSSM, dict(betas=(1.2, 0.9)), "beta1 must lie in [0, 1)"),
        (C.AdamSSM, dict(pole=1.0), "pole must lie in [0, 1)"),
        (C.AdamSSM, dict(pole=0.5, zero=0.6), "zero must lie in (-1, pole]"),
        (C.AdamSSM, dict(zero=-1.0), "zero must lie in (-1, pole]"),
        (C.DeltaGClip, dict(clip_norm=0), "clip_norm must be positive"),
        (C.DeltaGClip, dict(delta=1.5), "delta must lie in [0, 1]"),
        (C.DeltaGClip, dict(lr=float("nan")), "lr must be positive"),
        (C.Signum, dict(momentum=1.0), "momentum must lie in [0, 1)"),
        (C.SignSGD, dict(lr=-1e-3), "lr must be positive"),
    ],
)
def test_bad_options_are_clear_errors(cls, kwargs, message):
    with pytest.raises(ValueError, match=_escaped(message)):
        cls([torch.zeros(2, requires_grad=True)], **kwargs)


def test_param_groups_added_later_are_checked_too():
    opt = C.Adan([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="beta3"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "betas": (0, 0, 1)})
    sgd = C.SignSGD([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="no momentum"):
        sgd.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "momentum": 0.9})


def test_sparse_gradients_are_refused():
    p = torch.zeros(3, requires_grad=True)
    opt = C.Signum([p])
    p.grad = torch.zeros(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_the_harness_builds_every_comparator_from_its_presets():
    for name in C.COMPARATORS:
        assert name in OPTIMIZERS
        config = build_config("mnist", name)
        opt = build_optimizer(name, [torch.zeros(2, requires_grad=True)], config["hparams"])
        assert isinstance(opt, C.COMPARATORS[name][0])
    assert display_name("gclip") == "δ-GClip"
    adan = build_optimizer("adan", [torch.zeros(1, requires_grad=True)], {"beta3": 0.5})
    assert adan.defaults["betas"] == (0.98, 0.92, 0.5)
    with pytest.raises(ValueError, match="adan does not take 'final_lr'"):
        build_config("mnist", "adan", hparams={"final_lr": 0.1})
    with pytest.raises(ValueError, match="zero must lie"):
        build_config("mnist", "adamssm", hparams={"zero": 0.95})


def test_compare_runs_the_comparators(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "digits", "--optims", "adan", "adamssm", "gclip", "signsgd", "signum"]
    argv += ["--epochs", "1", "--quiet", "--no-bounds-record", "--out", str(out)]
    assert main(argv) == 0
    table = (out / "results.md").read_text()
    for display in ("Adan", "AdamSSM", "δ-GClip", "signSGD", "Signum"):
        assert f"| {display} |" in table


def _escaped(text: str) -> str:
    import re

    return re.escape(text)
