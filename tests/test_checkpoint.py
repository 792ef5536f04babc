"""Checkpoint safety and compatibility with the authors' AdaBound 0.0.5.

The authors' optimizer keeps its base learning rates on the object, outside ``state_dict``;
``tests/reference_adabound.py`` models it. dynabound keeps ``base_lr`` in each param group.
These tests check that it reproduces the reference, survives every way of copying or
resuming an optimizer, and loads the reference's checkpoints.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from collections.abc import Callable

import pytest
import torch
from reference_adabound import ReferenceAdaBound, ReferenceAdaBoundW
from torch import Tensor
from torch.optim import lr_scheduler

from dynabound import AdaBound, AdaBoundW

SHAPES = [(6, 5), (7,), ()]
NEW_KEYS = ["decoupled_weight_decay", "unscaled_decay", "bounds", "box", "base_lr", "maximize",
            "foreach", "fused", "capturable", "differentiable"]  # fmt: skip


def make_params(dtype: torch.dtype = torch.float64, shapes=SHAPES) -> list[Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
            for s in shapes]  # fmt: skip


def set_grads(params: list[Tensor], k: int, skip: bool = False) -> None:
    """Gradient of 0.25*|p|^2 plus noise seeded by k; with skip, some params miss steps."""
    g = torch.Generator().manual_seed(k)
    for i, p in enumerate(params):
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        p.grad = None if skip and (k + i) % 3 == 0 else p.detach() * 0.5 + noise


def train(opt, params, steps: int, scheduler=None, start: int = 0, skip: bool = False) -> None:
    for k in range(start, start + steps):
        set_grads(params, k, skip)
        opt.step()
        if scheduler is not None:
            scheduler.step()


def snapshot(opt: torch.optim.Optimizer) -> list[Tensor]:
    """Params and every state tensor, in a fixed order."""
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            out.append(p.detach().clone())
            state = opt.state.get(p, {})
            out.extend(torch.as_tensor(state[k]).clone() for k in sorted(state))
    return out


def assert_identical(a: list[Tensor], b: list[Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)


def save_and_load(obj) -> object:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# -- reproducing the authors' optimizer -------------------------------------------------

STEPS = 2000

REFERENCE_CASES = {
    "constant_missing_grads": dict(kwargs=dict(lr=1e-3), skip=True),
    "StepLR_foreach": dict(
        kwargs=dict(lr=1e-2), foreach=True,
        sched=lambda o: lr_scheduler.StepLR(o, step_size=500, gamma=0.1),
    ),
    "MultiStepLR_amsbound_l2": dict(
        kwargs=dict(lr=1e-2, amsbound=True, weight_decay=5e-4),
        sched=lambda o: lr_scheduler.MultiStepLR(o, milestones=[400, 1200], gamma=0.3),
    ),
    "OneCycleLR_foreach": dict(
        kwargs=dict(lr=1e-2), foreach=True,
        sched=lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.02, total_steps=STEPS),
    ),
    "AdaBoundW_unscaled_amsbound": dict(
        kwargs=dict(lr=1e-2, weight_decay=1e-3, amsbound=True), decoupled=True, skip=True,
        sched=lambda o: lr_scheduler.StepLR(o, step_size=700, gamma=0.1),
    ),
}  # fmt: skip


def run_both(case: dict, steps: int, dtype: torch.dtype):
    if case.get("decoupled"):
        ours_class, ref_class, extra = AdaBoundW, ReferenceAdaBoundW, dict(unscaled_decay=True)
    else:
        ours_class, ref_class, extra = AdaBound, ReferenceAdaBound, {}
    # Two params keep thousands of steps cheap; a 0-dim one covers scalar state.
    ours_params, ref_params = make_params(dtype, [(6, 5), ()]), make_params(dtype, [(6, 5), ()])
    ours = ours_class(ours_params, **case["kwargs"], **extra, foreach=case.get("foreach"))
    ref = ref_class(ref_params, **case["kwargs"])
    for opt, params in ((ours, ours_params), (ref, ref_params)):
        sched = case["sched"](opt) if "sched" in case else None
        train(opt, params, steps, sched, skip=case.get("skip", False))
    return ours, ref


@pytest.mark.parametrize("case", REFERENCE_CASES.values(), ids=REFERENCE_CASES.keys())
def test_defaults_reproduce_the_reference_float64(case: dict) -> None:
    ours, ref = run_both(case, STEPS, torch.float64)
    for a, b in zip(snapshot(ours), snapshot(ref), strict=True):
        # Measured worst relative error over these cases: 3e-14.
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-12, atol=1e-15)


def test_defaults_reproduce_the_reference_float32() -> None:
    ours, ref = run_both(REFERENCE_CASES["MultiStepLR_amsbound_l2"], 1000, torch.float32)
    for a, b in zip(snapshot(ours), snapshot(ref), strict=True):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-4, atol=1e-6)


# -- base_lr in the param group -----------------------------------------------------------


def test_base_lr_is_stored_per_group() -> None:
    a, b, c = make_params()
    opt = AdaBound([{"params": [a], "lr": 0.1}, {"params": [b]}], lr=0.01)
    opt.add_param_group({"params": [c], "lr": 0.5})
    assert [g["base_lr"] for g in opt.param_groups] == [0.1, 0.01, 0.5]
    assert [g["base_lr"] for g in opt.state_dict()["param_groups"]] == [0.1, 0.01, 0.5]

    explicit = AdaBound([{"params": [a], "base_lr": 0.3}, {"params": [b]}], lr=0.0, base_lr=0.2)
    assert [g["base_lr"] for g in explicit.param_groups] == [0.3, 0.2]
    assert AdaBound([a], lr=torch.tensor(0.25)).param_groups[0]["base_lr"] == 0.25


def test_base_lr_is_user_settable() -> None:
    """final = final_lr * lr / base_lr: doubling base_lr is halving final_lr."""
    runs = []
    for kwargs, set_base_lr in (
        (dict(final_lr=0.05), None),
        (dict(final_lr=0.1, base_lr=0.02), None),
        (dict(final_lr=0.1), 0.02),
    ):
        params = make_params()
        opt = AdaBound(params, lr=0.01, gamma=0.5, **kwargs)
        if set_base_lr is not None:
            opt.param_groups[0]["base_lr"] = set_base_lr
        train(opt, params, 30)
        runs.append(snapshot(opt))
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    assert not torch.allclose(runs[0][0], make_params()[0])


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
def test_copies_keep_base_lr_and_continue_identically(copier: str) -> None:
    def duplicate(obj):
        return copy.deepcopy(obj) if copier == "deepcopy" else pickle.loads(pickle.dumps(obj))

    params = make_params()
    opt = AdaBound(params, lr=0.01, amsbound=True)
    sched = lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    train(opt, params, 5, sched)
    params2, opt2 = duplicate((params, opt))
    assert opt2.param_groups[0]["base_lr"] == 0.01
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-4)
    train(opt, params, 5, start=5)
    train(opt2, params2, 5, start=5)
    assert_identical(snapshot(opt), snapshot(opt2))

    # The reference loses its base learning rates with the copy.
    ref_params = make_params()
    ref = ReferenceAdaBound(ref_params, lr=0.01)
    train(ref, ref_params, 2)
    ref_params2, ref2 = duplicate((ref_params, ref))
    set_grads(ref_params2, 2)
    with pytest.raises(AttributeError, match="base_lrs"):
        ref2.step()


def test_add_param_group_trains_the_new_group() -> None:
    params = make_params()
    opt = AdaBound(params[:2], lr=0.01)
    opt.add_param_group({"params": params[2:], "lr": 0.1, "final_lr": 0.3})
    assert opt.param_groups[1]["base_lr"] == 0.1
    train(opt, params, 10)

    together = make_params()
    groups = [{"params": together[:2]}, {"params": together[2:], "lr": 0.1, "final_lr": 0.3}]
    opt_together = AdaBound(groups, lr=0.01)
    train(opt_together, together, 10)
    assert_identical(snapshot(opt), snapshot(opt_together))
    assert not torch.equal(params[2].detach(), make_params()[2])

    # The reference pairs groups with base_lrs by zip: the new group never moves.
    ref_params = make_params()
    ref = ReferenceAdaBound(ref_params[:2], lr=0.01)
    ref.add_param_group({"params": ref_params[2:], "lr": 0.1, "final_lr": 0.3})
    train(ref, ref_params, 10)
    assert torch.equal(ref_params[2].detach(), make_params()[2])
    assert not torch.equal(ref_params[0].detach(), make_params()[0])


def test_state_dict_round_trip() -> None:
    params = make_params()
    # gamma=0.5 makes the bounds bind from the first steps, so base_lr matters.
    opt = AdaBound(params, lr=0.01, gamma=0.5, amsbound=True, box=(-3.0, 3.0), weight_decay=0.1)
    train(opt, params, 6, skip=True)
    saved = save_and_load(opt.state_dict())

    params2 = [p.detach().clone().requires_grad_() for p in params]
    opt2 = AdaBound(params2, lr=0.5)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["base_lr"] == 0.01 and opt2.param_groups[0]["lr"] == 0.01
    again = opt2.state_dict()
    assert again["param_groups"] == opt.state_dict()["param_groups"]
    assert again["state"].keys() == saved["state"].keys()
    for index, state in saved["state"].items():
        assert state.keys() == again["state"][index].keys()
        assert all(torch.equal(state[k], again["state"][index][k]) for k in state)
    assert again["state"][0]["step"].dtype == torch.float32

    train(opt, params, 6, start=6, skip=True)
    train(opt2, params2, 6, start=6, skip=True)
    assert_identical(snapshot(opt), snapshot(opt2))


# -- resuming -----------------------------------------------------------------------------

SCHEDULERS: dict[str, Callable] = {
    "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=4, gamma=0.1),
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=40),
}


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("amsbound", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
def test_resume_is_bit_identical(scheduler: str, amsbound: bool, foreach: bool) -> None:
    kwargs = dict(amsbound=amsbound, foreach=foreach, gamma=0.1, weight_decay=1e-3)
    params = make_params(torch.float32)
    opt = AdaBound(params, lr=0.01, **kwargs)
    sched = SCHEDULERS[scheduler](opt)
    train(opt, params, 20, sched, skip=True)
    checkpoint = save_and_load(
        {"params": params, "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    )
    train(opt, params, 20, sched, start=20, skip=True)

    # A fresh optimizer built with the decayed lr, as a resumed run often is.
    resumed_params = [p.detach().clone().requires_grad_() for p in checkpoint["params"]]
    resumed = AdaBound(resumed_params, lr=1e-4, **kwargs)
    resumed_sched = SCHEDULERS[scheduler](resumed)
    resumed.load_state_dict(checkpoint["optimizer"])
    resumed_sched.load_state_dict(checkpoint["scheduler"])
    assert resumed.param_groups[0]["base_lr"] == 0.01
    train(resumed, resumed_params, 20, resumed_sched, start=20, skip=True)
    assert_identical(snapshot(opt), snapshot(resumed))


def test_reference_resume_restores_final_lr_too_large() -> None:
    """The reference built with the decayed lr takes it as base: final_lr comes back 10x."""

    def resumed_final_params(opt_class) -> tuple[Tensor, Tensor]:
        params = make_params()
        opt = opt_class(params, lr=0.01, gamma=0.5)
        sched = lr_scheduler.StepLR(opt, step_size=10, gamma=0.1)
        train(opt, params, 15, sched)
        checkpoint = copy.deepcopy((params, opt.state_dict(), sched.state_dict()))
        train(opt, params, 30, sched, start=15)
        resumed_params = checkpoint[0]
        resumed = opt_class(resumed_params, lr=1e-3, gamma=0.5)
        resumed_sched = lr_scheduler.StepLR(resumed, step_size=10, gamma=0.1)
        resumed.load_state_dict(checkpoint[1])
        resumed_sched.load_state_dict(checkpoint[2])
        train(resumed, resumed_params, 30, resumed_sched, start=15)
        return params[0].detach(), resumed_params[0].detach()

    uninterrupted, resumed = resumed_final_params(ReferenceAdaBound)
    assert not torch.allclose(uninterrupted, resumed, rtol=1e-3)
    uninterrupted, resumed = resumed_final_params(AdaBound)
    assert torch.equal(uninterrupted, resumed)


# -- bound functions ------------------------------------------------------------------------


def narrowing_bounds(step):
    return 0.05 * (1 - 1 / (step + 1)), 0.05 * (1 + 1 / step)


def test_callable_bounds_save_a_marker_and_reload() -> None:
    params = make_params()
    opt = AdaBound(params, lr=0.01, bounds=narrowing_bounds)
    train(opt, params, 5)
    saved = save_and_load(opt.state_dict())
    assert saved["param_groups"][0]["bounds"] == "custom"
    assert opt.param_groups[0]["bounds"] is narrowing_bounds

    params2 = [p.detach().clone().requires_grad_() for p in params]
    opt2 = AdaBound(params2, lr=0.01, bounds=narrowing_bounds)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["bounds"] is narrowing_bounds
    train(opt, params, 5, start=5)
    train(opt2, params2, 5, start=5)
    assert_identical(snapshot(opt), snapshot(opt2))

    with pytest.raises(ValueError, match="saved with a bound function.*same bounds=callable"):
        AdaBound(make_params(), lr=0.01).load_state_dict(saved)


def test_state_dict_hooks_see_the_marker_also_after_copies() -> None:
    opt = AdaBound(make_params(), lr=0.01, bounds=narrowing_bounds)
    seen = []
    opt.register_state_dict_post_hook(lambda o, sd: seen.append(sd["param_groups"][0]["bounds"]))
    opt.state_dict()
    assert seen == ["custom"]
    opt.load_state_dict(opt.state_dict())
    assert len(opt._optimizer_state_dict_post_hooks) == 2  # not registered twice
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.state_dict()["param_groups"][0]["bounds"] == "custom"
        assert clone.param_groups[0]["bounds"] is narrowing_bounds


# -- checkpoints of the authors' package and of older versions -------------------------------


def test_reference_checkpoint_with_initial_lr_loads_without_warning() -> None:
    ref_params = make_params()
    ref = ReferenceAdaBound(ref_params, lr=0.01, amsbound=True)
    ref_sched = lr_scheduler.StepLR(ref, step_size=100, gamma=0.1)
    train(ref, ref_params, 250, ref_sched, skip=True)
    checkpoint = save_and_load(
        {"params": ref_params, "optimizer": ref.state_dict(), "scheduler": ref_sched.state_dict()}
    )
    group = checkpoint["optimizer"]["param_groups"][0]
    assert "base_lr" not in group and group["initial_lr"] == 0.01
    assert isinstance(checkpoint["optimizer"]["state"][0]["step"], int)

    params = [p.detach().clone().requires_grad_() for p in checkpoint["params"]]
    opt = AdaBound(params, lr=1e-4, amsbound=True)  # built with the decayed lr
    sched = lr_scheduler.StepLR(opt, step_size=100, gamma=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.load_state_dict(checkpoint["optimizer"])
    sched.load_state_dict(checkpoint["scheduler"])
    assert opt.param_groups[0]["base_lr"] == 0.01
    steps = [opt.state[p]["step"] for p in params]
    assert all(s.dtype == torch.float32 and s.ndim == 0 for s in steps)
    assert [s.item() for s in steps] == [sum((k + i) % 3 != 0 for k in range(250)) for i in
                                         range(len(params))]  # fmt: skip

    train(ref, ref_params, 250, ref_sched, start=250, skip=True)
    train(opt, params, 250, sched, start=250, skip=True)
    for a, b in zip(snapshot(opt), snapshot(ref), strict=True):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-12, atol=1e-15)


def test_reference_checkpoint_without_initial_lr_warns_once() -> None:
    ref_params = make_params()
    groups = [{"params": ref_params[:2]}, {"params": ref_params[2:], "lr": 0.02}]
    ref = ReferenceAdaBound(groups, lr=0.01)
    train(ref, ref_params, 50)
    saved = save_and_load(ref.state_dict())

    params = [p.detach().clone().requires_grad_() for p in ref_params]
    opt = AdaBound([{"params": params[:2]}, {"params": params[2:], "lr": 0.02}], lr=0.01)
    with pytest.warns(UserWarning, match="without base_lr") as record:
        opt.load_state_dict(saved)
    assert len(record) == 1
    assert [g["base_lr"] for g in opt.param_groups] == [0.01, 0.02]
    train(ref, ref_params, 50, start=50)
    train(opt, params, 50, start=50)
    for a, b in zip(snapshot(opt), snapshot(ref), strict=True):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-12, atol=1e-15)


def test_old_state_dict_missing_keys_is_backfilled() -> None:
    params = make_params()
    opt = AdaBound(params, lr=0.01)
    train(opt, params, 4)
    expected_groups = opt.state_dict()["param_groups"]
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        for key in NEW_KEYS + ["amsbound"]:
            del group[key]
        group["initial_lr"] = 0.01
    for state in old["state"].values():
        state["step"] = int(state["step"].item())  # torch < 1.12 saved Python ints

    params2 = [p.detach().clone().requires_grad_() for p in params]
    opt2 = AdaBound(params2, lr=0.3, amsbound=True, maximize=True, bounds="paper")
    opt2.load_state_dict(old)
    loaded = opt2.state_dict()["param_groups"][0]
    assert {k: loaded[k] for k in expected_groups[0]} == expected_groups[0]
    assert opt2.state[params2[0]]["step"].dtype == torch.float32
    train(opt, params, 4, start=4)
    train(opt2, params2, 4, start=4)
    assert_identical(snapshot(opt), snapshot(opt2))


def test_setstate_backfills_an_unpickled_optimizer() -> None:
    """An optimizer pickled before the newer keys existed gets their defaults."""
    params = make_params()
    opt = AdaBound(params, lr=0.01)
    state = copy.deepcopy(opt.__getstate__())
    for group in state["param_groups"]:
        for key in NEW_KEYS:
            del group[key]
    restored = AdaBound.__new__(AdaBound)
    restored.__setstate__(state)
    group = restored.param_groups[0]
    assert group["base_lr"] == 0.01 and group["bounds"] == "reference"
    assert group["box"] is None and group["capturable"] is False and group["foreach"] is None
    train(restored, restored.param_groups[0]["params"], 3)


def trained(params: list[Tensor], **kwargs) -> AdaBound:
    opt = AdaBound(params, **kwargs)
    set_grads(params, 0)
    opt.step()
    return opt


def test_load_state_dict_refuses_what_is_not_an_optimizer_state_dict() -> None:
    opt = AdaBound(make_params())
    saved = trained(make_params()).state_dict()
    checkpoint = {"model": {}, "optimizer": saved, "epoch": 3}
    with pytest.raises(
        ValueError,
        match=r"AdaBound.load_state_dict: expected an optimizer state dict \(with 'state' and "
        r"'param_groups', .*\), got a dict with keys 'model', 'optimizer', 'epoch'; from a "
        "training checkpoint, pass its optimizer entry",
    ):
        opt.load_state_dict(checkpoint)
    with pytest.raises(ValueError, match="got a list"):
        opt.load_state_dict([saved])
    with pytest.raises(ValueError, match="'param_groups' must be a list of dicts with 'params'"):
        opt.load_state_dict({"state": {}, "param_groups": [{"lr": 1e-3}]})
    opt.load_state_dict(checkpoint["optimizer"])  # the advice works


def test_load_state_dict_refuses_moments_that_do_not_fit_the_parameters() -> None:
    other_model = make_params(shapes=[(5, 6), (7,), ()])
    saved = trained(other_model).state_dict()
    opt = AdaBound(make_params())
    with pytest.raises(
        ValueError,
        match=r"exp_avg of parameter 0 has shape \(5, 6\), the parameter \(6, 5\): the state "
        "dict belongs to another model",
    ):
        opt.load_state_dict(saved)
    assert not opt.state  # nothing was loaded
    broken = trained(make_params()).state_dict()
    del broken["state"][1]["step"]
    with pytest.raises(ValueError, match="the state of parameter 1 lacks step"):
        opt.load_state_dict(broken)


def test_low_precision_and_complex_states_still_load() -> None:
    complex_params = [torch.randn(4, 3, dtype=torch.complex64, requires_grad=True)]
    for params, kwargs in (
        (make_params(torch.float32), dict(state_dtype="8bit")),
        (make_params(torch.float32), dict(state_dtype=torch.bfloat16, amsbound=True)),
        (complex_params, dict(state_dtype=torch.bfloat16)),
        (complex_params, {}),
    ):
        saved = trained(params, **kwargs).state_dict()
        twin = [p.detach().clone().requires_grad_() for p in params]
        AdaBound(twin, **kwargs).load_state_dict(saved)
