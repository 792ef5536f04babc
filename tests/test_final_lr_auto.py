"""final_lr="auto": the projection sums against a NumPy model of the formulas, the estimate's
rule against its own definition, the wiring (each step bounded by the previous estimate),
paths against each other, checkpoints mid-estimation, and the refusals."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from dynabound import AdaBound, AdaBoundW, AMSBound, AMSBoundW, scale_batch_size
from dynabound import functional as F
from dynabound.diagnostics import BoundMonitor, bound_activity
from dynabound.final_lr import (
    SETTLE_PATIENCE,
    SETTLE_TOLERANCE,
    estimation_cap,
    final_lr_at,
    new_estimation,
    record_sample,
)
from dynabound.spec import StepTensors

CLASSES = [AdaBound, AMSBound, AdaBoundW, AMSBoundW]


# --- the two sums, against NumPy ------------------------------------------------------------


def _numpy_sums(p, g, m, v, vmax, t, *, beta1, beta2, eps, wd, amsbound, maximize):
    """A = sum(d*d), B = sum(d*g) from the formulas: d is Adam's unclipped step per unit of
    lr, numerator * m / (sqrt(u) + eps), after this step's moments."""
    p, g, m, v = (np.asarray(x, dtype=np.float64) for x in (p, g, m, v))
    g = -g if maximize else g
    g = g + wd * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    u = np.maximum(np.asarray(vmax, dtype=np.float64), v) if amsbound else v
    numerator = math.sqrt(1 - beta2**t) / (1 - beta1**t)
    d = numerator * m / (np.sqrt(u) + eps)
    return float((d * d).sum()), float((d * g).sum())


@pytest.mark.parametrize("amsbound", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
def test_projection_sums_follow_the_formulas(amsbound, maximize, foreach):
    gen = torch.Generator().manual_seed(3)
    shapes = [(7, 5), (33,), (), (3, 41)]  # the last one's gradient: a transposed view
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes[:-1]]
    grads.append(torch.randn(shapes[-1][::-1], generator=gen).t())
    ms = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    vs = [torch.rand(s, generator=gen) * 0.01 for s in shapes]
    vmaxs = [v * torch.rand(s, generator=gen) * 2 for v, s in zip(vs, shapes, strict=True)]
    t = 4
    expected = np.zeros(2)
    for tensors in zip(params, grads, ms, vs, vmaxs, strict=True):
        expected += _numpy_sums(
            *(x.numpy() for x in tensors), t, beta1=0.9, beta2=0.999, eps=1e-8, wd=0.01,
            amsbound=amsbound, maximize=maximize,
        )  # fmt: skip
    projection = torch.zeros(2, dtype=torch.float64)
    tensors = StepTensors(
        [p.clone() for p in params], grads, [m.clone() for m in ms], [v.clone() for v in vs],
        [x.clone() for x in vmaxs] if amsbound else [],
        [torch.tensor(float(t - 1)) for _ in shapes], None, projection,
    )  # fmt: skip
    spec = F.StepSpec(
        lr=1e-3, beta1=0.9, beta2=0.999, final_lr=0.1, base_lr=1e-3, gamma=1e-3, eps=1e-8,
        weight_decay=0.01, amsbound=amsbound, decoupled_weight_decay=False,
        unscaled_decay=False, maximize=maximize, bounds="reference", box=None,
    )  # fmt: skip
    F.adabound_step(tensors, spec, foreach=foreach)
    np.testing.assert_allclose(projection.numpy(), expected, rtol=1e-5)


def test_projection_leaves_the_update_unchanged():
    gen = torch.Generator().manual_seed(4)
    p = torch.randn(50, generator=gen)
    g = torch.randn(50, generator=gen)
    out = []
    for projection in (None, torch.zeros(2, dtype=torch.float64)):
        for foreach in (False, True):
            state = [p.clone(), torch.zeros(50), torch.zeros(50)]
            tensors = StepTensors(
                [state[0]], [g], [state[1]], [state[2]], [], [torch.tensor(0.0)], None,
                projection,
            )  # fmt: skip
            spec = F.StepSpec(
                lr=1e-3, beta1=0.9, beta2=0.999, final_lr=0.1, base_lr=1e-3, gamma=1e-3,
                eps=1e-8, weight_decay=0.0, amsbound=False, decoupled_weight_decay=False,
                unscaled_decay=False, maximize=False, bounds="reference", box=None,
            )  # fmt: skip
            F.adabound_step(tensors, spec, foreach=foreach)
            out.append(state)
    for other in out[1:]:
        for a, b in zip(out[0], other, strict=True):
            assert torch.equal(a, b)


# --- the estimate's rule ---------------------------------------------------------------------


def test_estimate_is_the_bias_corrected_average_of_valid_samples():
    rng = np.random.default_rng(0)
    samples = list(rng.uniform(0.5, 2.0, 40))
    samples[5] = math.nan  # a step whose Adam step did not descend
    samples[9] = -1.0
    beta = 0.999
    record = new_estimation()
    for step, s in enumerate(samples, start=1):
        assert not record_sample(record, step, s, beta, cap=10_000)
    valid = [s for s in samples if math.isfinite(s) and s > 0]
    weights = beta ** np.arange(len(valid))[::-1]
    expected = (1 - beta) * float(np.dot(weights, valid)) / (1 - beta ** len(valid))
    assert record["estimate"] == pytest.approx(expected, rel=1e-12)
    assert record["samples"] == len(valid) and record["steps"] == len(samples)
    assert math.isnan(record["history"][5][1]) and record["history"][5][2] is not None
    assert [h[0] for h in record["history"]] == list(range(1, 41))


def test_estimate_is_fixed_after_patience_calm_samples():
    record = new_estimation()
    step = 0
    fixed = False
    while not fixed:
        step += 1
        fixed = record_sample(record, step, 1.0, 0.999, cap=10**9)
        assert step < 10_000
    # A constant sample leaves the estimate unchanged from the second sample on.
    assert step == SETTLE_PATIENCE + 1 and record["fixed_at"] == step
    assert record["estimate"] == pytest.approx(1.0)


def test_a_noisy_estimate_is_fixed_at_the_cap():
    record = new_estimation()
    cap = estimation_cap(1e-2)
    assert cap == max(SETTLE_PATIENCE, 100)
    steps = 0
    for step in range(1, 10 * cap):
        steps = step
        # Alternating samples keep the relative change above the tolerance early on.
        if record_sample(record, step, 1.0 + 0.9 * (-1) ** step, 0.999, cap):
            break
    assert steps == cap and record["fixed_at"] == cap
    assert SETTLE_TOLERANCE > 0


def test_no_sample_keeps_estimating_past_the_cap():
    record = new_estimation()
    for step in range(1, 5):
        assert not record_sample(record, step, math.nan, 0.999, cap=2)
    assert record["estimate"] is None
    assert record_sample(record, 5, 0.3, 0.999, cap=2)


# --- through the optimizer -------------------------------------------------------------------


def _problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 10, generator=gen)
    y = (x[:, :3].sum(1, keepdim=True) > 0).float()
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    torch.manual_seed(seed)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model, x, y


def _train(opt_fn, steps, seed=0, model_and_data=None, start=0, opt=None):
    model, x, y = model_and_data or _problem(seed)
    opt = opt or opt_fn(model.parameters())
    gen = torch.Generator().manual_seed(seed + 1)
    perm = [torch.randperm(128, generator=gen)[:32] for _ in range(start + steps)]
    for k in range(start, start + steps):
        idx = perm[k]
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("cls", CLASSES)
def test_each_step_uses_the_estimate_of_the_steps_before(cls):
    """Replaying the run with the functional step, each step bounded by the estimate the
    record says it used, gives the same parameters bit for bit."""
    steps = 30
    kwargs = dict(lr=1e-2, gamma=0.05, weight_decay=1e-3, foreach=False)
    model, opt = _train(lambda ps: cls(ps, final_lr="auto", **kwargs), steps)
    group = opt.param_groups[0]
    history = group["final_lr_auto"]["history"]
    assert len(history) == steps

    replay_model, x, y = _problem(0)
    replay = cls(replay_model.parameters(), final_lr=0.1, **kwargs)
    gen = torch.Generator().manual_seed(1)
    perm = [torch.randperm(128, generator=gen)[:32] for _ in range(steps)]
    for k in range(steps):
        used = final_lr_at(group, k + 1)
        replay_group = replay.param_groups[0]
        if used is None:
            replay_group["bounds"] = lambda step: (0.0, math.inf)
        else:
            replay_group["bounds"] = "reference"
            replay_group["final_lr"] = used
        replay.zero_grad()
        idx = perm[k]
        torch.nn.functional.binary_cross_entropy_with_logits(
            replay_model(x[idx]), y[idx]
        ).backward()
        replay.step()
    for a, b in zip(model.parameters(), replay_model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", CLASSES)
def test_foreach_gives_the_single_tensor_estimate(cls):
    kwargs = dict(lr=1e-2, final_lr="auto", gamma=0.05)
    _, single = _train(lambda ps: cls(ps, foreach=False, **kwargs), 102)
    _, multi = _train(lambda ps: cls(ps, foreach=True, **kwargs), 102)
    a, b = (o.param_groups[0]["final_lr_auto"] for o in (single, multi))
    assert a["fixed_at"] == b["fixed_at"] is not None
    np.testing.assert_allclose(
        [h[2] for h in a["history"]], [h[2] for h in b["history"]], rtol=1e-5
    )
    assert single.param_groups[0]["final_lr"] == a["estimate"]
    assert isinstance(single.param_groups[0]["final_lr"], float)


def test_default_path_gives_the_single_tensor_estimate():
    kwargs = dict(lr=1e-2, final_lr="auto", gamma=0.05)
    _, single = _train(lambda ps: AdaBound(ps, foreach=False, **kwargs), 60)
    _, default = _train(lambda ps: AdaBound(ps, **kwargs), 60)
    a, b = (o.param_groups[0]["final_lr_auto"] for o in (single, default))
    np.testing.assert_allclose(
        [h[2] for h in a["history"]], [h[2] for h in b["history"]], rtol=1e-5
    )


@pytest.mark.parametrize("later", [False, True], ids=["read-at-once", "read-later"])
@pytest.mark.parametrize("at", [1, 7, 100, 101])
def test_a_checkpoint_at_any_step_resumes_bit_for_bit(at, later, monkeypatch):
    """Saved (weights_only load) after ``at`` steps, mid-estimation, at the step that fixes
    the estimate or after; the resumed run takes the same steps as the uninterrupted one.
    ``later``: the saved run left each sample for the next step, as on a GPU."""
    total = 104
    make = lambda ps: AdaBound(ps, lr=1e-2, final_lr="auto", gamma=0.02, foreach=False)  # noqa: E731
    whole_model, whole = _train(make, total)
    assert whole.param_groups[0]["final_lr_auto"]["fixed_at"] == 100

    if later:
        _read_later(monkeypatch)
    model, opt = _train(make, at)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh_model, x, y = _problem(0)
    fresh_model.load_state_dict(saved["model"])
    fresh = make(fresh_model.parameters())
    fresh.load_state_dict(saved["opt"])
    _train(make, total - at, model_and_data=(fresh_model, x, y), start=at, opt=fresh)

    assert fresh.param_groups[0]["final_lr_auto"] == whole.param_groups[0]["final_lr_auto"]
    assert fresh.param_groups[0]["final_lr"] == whole.param_groups[0]["final_lr"]
    for a, b in zip(whole_model.parameters(), fresh_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_the_estimate_is_referred_to_base_lr():
    """A scheduler that halves lr from the start halves Adam's steps and leaves the first
    sample, which is per unit of lr and referred to base_lr, unchanged."""
    firsts = []
    for factor in (1.0, 0.5):
        model, x, y = _problem(0)
        opt = AdaBound(model.parameters(), lr=1e-2, final_lr="auto", foreach=False)
        torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch, f=factor: f)
        torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
        opt.step()
        firsts.append(opt.param_groups[0]["final_lr_auto"]["history"][0][1])
    assert firsts[0] == pytest.approx(firsts[1], rel=1e-12)


def test_groups_estimate_separately_and_a_number_stays_a_number():
    model, x, y = _problem(0)
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = AdaBound(
        [{"params": first}, {"params": second, "final_lr": 0.2}],
        lr=1e-2,
        final_lr="auto",
        foreach=False,
    )
    torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
    opt.step()
    assert opt.param_groups[0]["final_lr"] == "auto"
    assert opt.param_groups[0]["final_lr_auto"]["samples"] == 1
    assert opt.param_groups[1]["final_lr"] == 0.2
    assert "final_lr_auto" not in opt.param_groups[1]


def test_setting_auto_again_starts_a_new_estimate():
    _, opt = _train(lambda ps: AdaBound(ps, lr=1e-2, final_lr="auto", gamma=0.05), 110)
    group = opt.param_groups[0]
    assert isinstance(group["final_lr"], float)
    group["final_lr"] = "auto"
    model, x, y = _problem(0)
    for p, q in zip(group["params"], model.parameters(), strict=True):
        p.grad = torch.ones_like(q)
    opt.step()
    assert group["final_lr_auto"]["steps"] == 1 and group["final_lr"] == "auto"


def test_diagnostics_report_the_final_lr_in_use():
    model, x, y = _problem(0)
    opt = AdaBound(model.parameters(), lr=1e-2, final_lr="auto", gamma=0.05, foreach=False)
    monitor = BoundMonitor(opt, every=1)
    _train(None, 3, model_and_data=(model, x, y), opt=opt)
    history = opt.param_groups[0]["final_lr_auto"]["history"]
    rows = monitor.records
    assert math.isnan(rows[0]["final_lr"]) and rows[0]["upper"] == 0.0  # Adam's first step
    assert rows[1]["final_lr"] == history[0][2] and rows[2]["final_lr"] == history[1][2]
    assert all(r["final_lr_estimating"] == 1.0 for r in rows)
    summary = bound_activity(opt).summary()
    assert summary["final_lr"] == history[1][2]


@pytest.mark.parametrize("later", [False, True], ids=["read-at-once", "read-later"])
def test_compiled_step_estimates_eagerly_without_recompiling(later, monkeypatch):
    import torch._dynamo

    torch._dynamo.reset()
    make = lambda ps: AdaBound(ps, lr=1e-2, final_lr="auto", gamma=0.05, foreach=True)  # noqa: E731
    eager_model, eager = _train(make, 25)
    if later:
        _read_later(monkeypatch)
    model, x, y = _problem(0)
    opt = make(model.parameters())
    compiled = torch.compile(opt.step)
    gen = torch.Generator().manual_seed(1)
    perm = [torch.randperm(128, generator=gen)[:32] for _ in range(25)]
    from torch._dynamo.utils import counters

    counters.clear()
    for idx in perm:
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x[idx]), y[idx]).backward()
        compiled()
    assert counters["stats"]["unique_graphs"] <= 2
    opt.update_final_lr_estimates()
    assert opt.param_groups[0]["final_lr_auto"] == eager.param_groups[0]["final_lr_auto"]
    for a, b in zip(eager_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)


# --- samples read at the next step, as on a GPU -----------------------------------------------


def _read_later(monkeypatch):
    """Every estimating step leaves its sample for the next step, as a step on a GPU does
    (there its readings are still on their way to the host when the step returns)."""
    from dynabound import optim

    monkeypatch.setattr(optim, "_read_at_once", lambda sample: False)


def _auto(gamma=0.05):
    return lambda ps: AdaBound(ps, lr=1e-2, final_lr="auto", gamma=gamma, foreach=False)


def test_samples_read_at_the_next_step_give_the_same_run(monkeypatch):
    """Through the fixing of the estimate (the cap, step 100) and ordinary steps after it:
    the same parameters and record, bit for bit."""
    at_once_model, at_once = _train(_auto(), 110)
    _read_later(monkeypatch)
    model, later = _train(_auto(), 110)
    for a, b in zip(at_once_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    group, want = later.param_groups[0], at_once.param_groups[0]
    assert isinstance(group["final_lr"], float) and group["final_lr"] == want["final_lr"]
    assert group["final_lr_auto"] == want["final_lr_auto"]


def test_a_sample_waits_for_the_next_step_or_a_read(monkeypatch):
    _, at_once = _train(_auto(), 5)
    _read_later(monkeypatch)
    _, opt = _train(_auto(), 5)
    group = opt.param_groups[0]
    record = group["final_lr_auto"]
    assert record["steps"] == 4  # the fifth step's sample is still out
    # What the last step used is known without it, to the diagnostics too.
    assert final_lr_at(group, 5) == final_lr_at(at_once.param_groups[0], 5) is not None
    assert bound_activity(opt).summary()["final_lr"] == final_lr_at(group, 5)
    opt.update_final_lr_estimates()
    assert record == at_once.param_groups[0]["final_lr_auto"]
    opt.update_final_lr_estimates()  # nothing left to read
    assert record["steps"] == 5


def test_the_fixing_sample_sets_final_lr_when_read_unless_a_number_was_set(monkeypatch):
    _, at_once = _train(_auto(), 100)
    fixed_at = at_once.param_groups[0]["final_lr_auto"]["fixed_at"]
    assert fixed_at == 100
    _read_later(monkeypatch)
    _, opt = _train(_auto(), fixed_at)
    group = opt.param_groups[0]
    assert group["final_lr"] == "auto"
    opt.update_final_lr_estimates()
    assert group["final_lr"] == at_once.param_groups[0]["final_lr"]

    _, opt = _train(_auto(), fixed_at)
    group = opt.param_groups[0]
    group["final_lr"] = 0.2  # the user's number, while the fixing sample is out
    opt.update_final_lr_estimates()
    assert group["final_lr"] == 0.2
    assert group["final_lr_auto"]["fixed_at"] == fixed_at


def test_a_copy_or_pickle_carries_the_sample_still_out(monkeypatch):
    import copy
    import pickle

    _read_later(monkeypatch)
    _, opt = _train(_auto(), 6)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.param_groups[0]["final_lr_auto"]["steps"] == 6
    assert opt.param_groups[0]["final_lr_auto"]["steps"] == 6


def test_functional_form_keeps_the_record_with_the_caller():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    m, v, step = torch.zeros(3), torch.zeros(3), torch.tensor(0.0)
    record = new_estimation()
    fixed = None
    for _ in range(estimation_cap(0.5)):
        p.grad = 2 * p.detach()
        with torch.no_grad():
            fixed = F.adabound(
            [p], [p.grad], [m], [v], [], [step], amsbound=False, beta1=0.9, beta2=0.999,
            lr=0.1, final_lr="auto", base_lr=0.1, gamma=0.5, eps=1e-8, weight_decay=0.0,
            decoupled_weight_decay=False, unscaled_decay=False, bounds="reference", box=None,
                maximize=False, final_lr_estimation=record,
            )  # fmt: skip
    assert fixed is not None and fixed == record["estimate"] > 0
    with pytest.raises(ValueError, match="final_lr_estimation"):
        F.adabound(
            [p], [p.grad], [m], [v], [], [step], amsbound=False, beta1=0.9, beta2=0.999,
            lr=0.1, final_lr="auto", base_lr=0.1, gamma=0.5, eps=1e-8, weight_decay=0.0,
            decoupled_weight_decay=False, unscaled_decay=False, bounds="reference", box=None,
            maximize=False,
        )  # fmt: skip


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bounds=lambda step: (0.0, 1.0)), "bound function"),
        (dict(bounds="paper"), "sqrt\\(t\\)"),
        (dict(capturable=True), "capturable"),
        (dict(final_lr="automatic"), "number or 'auto'"),
    ],
)
def test_auto_is_refused_where_it_cannot_apply(kwargs, message):
    kwargs = {"final_lr": "auto", **kwargs}
    with pytest.raises(ValueError, match=message):
        AdaBound([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_scale_batch_size_keeps_auto():
    scaled = scale_batch_size({"lr": 1e-3, "final_lr": "auto"}, 128, 256, method="adabound")
    assert scaled["final_lr"] == "auto" and scaled["gamma"] == pytest.approx(2e-3)
