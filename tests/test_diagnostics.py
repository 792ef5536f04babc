"""dynabound.diagnostics: effective rates against direct float64 computations from the state,
against the parameter change of the last step, bound fractions, the monitor and the figures.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

import dynabound
import dynabound.diagnostics
from dynabound import AdaBound, AdaBoundW, AMSBound
from dynabound.diagnostics import (
    BoundMonitor,
    bound_activity,
    effective_lr,
    plot_rate_heatmap,
    plot_transition,
    rate_statistics,
    read_records,
    select_figure1_params,
)
from dynabound.diagnostics import monitor as monitor_module
from dynabound.diagnostics.rates import EXACT_QUANTILE_LIMIT

STEPS = 7


def make_params(dtype=torch.float64, with_complex=False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(4, 3, generator=g, dtype=dtype), torch.randn(5, generator=g, dtype=dtype)]
    if with_complex:
        params.append(torch.randn(3, generator=g, dtype=torch.complex128))
    return [nn.Parameter(p) for p in params]


def train(opt, params, steps=STEPS, lr_at: Callable[[int], float] | None = None):
    """Step with gradients spanning six decades; returns params and grads of the last step."""
    g = torch.Generator().manual_seed(2)
    before, grads = [], []
    for k in range(steps):
        if lr_at is not None:
            for group in opt.param_groups:
                group["lr"] = lr_at(k)
        before = [p.detach().clone() for p in params]
        grads = []
        for p in params:
            scale = 10 ** (torch.rand(p.shape, generator=g, dtype=torch.float64) * 6 - 4)
            grad = torch.randn(p.shape, generator=g, dtype=torch.float64) * scale
            if p.is_complex():
                grad = torch.complex(grad, torch.randn(p.shape, generator=g, dtype=torch.float64))
            p.grad = grad.to(p.dtype)
            grads.append(p.grad.clone())
        opt.step()
    return before, grads


def real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def dynabound_direct(group, state) -> torch.Tensor:
    """The design's direct form with absolute bounds (not the library's lr-free form)."""
    t = float(state["step"])
    lr = float(group["lr"])
    b1, b2 = group["betas"]
    final = group["final_lr"] * lr / group["base_lr"]
    u = real(state["max_exp_avg_sq"] if group["amsbound"] else state["exp_avg_sq"]).double()
    if group["bounds"] == "paper":
        lower = final * (1 - 1 / ((1 - b2) * t + 1))
        upper = final * (1 + 1 / ((1 - b2) * t))
        return (lr / u.sqrt()).clamp(lower, upper) / math.sqrt(t)
    if callable(group["bounds"]):
        lower, upper = (b * lr / group["base_lr"] for b in group["bounds"](t))
    else:
        lower = final * (1 - 1 / (group["gamma"] * t + 1))
        upper = final * (1 + 1 / (group["gamma"] * t))
    step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
    return (step_size / (u.sqrt() + group["eps"])).clamp(lower, upper)


DYNABOUND_CASES = {
    "adabound": lambda ps: AdaBound(ps, lr=1e-3, foreach=False),
    "adabound-foreach": lambda ps: AdaBound(ps, lr=1e-3, foreach=True),
    "amsbound": lambda ps: AMSBound(ps, lr=1e-3, final_lr=0.05),
    "paper": lambda ps: AdaBound(ps, lr=1e-3, bounds="paper", betas=(0.9, 0.9)),
    "callable": lambda ps: AdaBound(ps, lr=2e-3, bounds=lambda t: (0.01, 0.5 + 1 / t)),
    "tensor-lr": lambda ps: AdaBound(ps, lr=torch.tensor(1e-3), foreach=False),
    "maximize": lambda ps: AdaBound(ps, lr=1e-3, maximize=True, gamma=0.1),
    "coupled-decay": lambda ps: AdaBound(ps, lr=1e-3, weight_decay=0.1),
    "decoupled-decay": lambda ps: AdaBoundW(ps, lr=1e-3, weight_decay=0.1),
}


@pytest.mark.parametrize("with_complex", [False, True])
@pytest.mark.parametrize("case", list(DYNABOUND_CASES))
def test_dynabound_rate_matches_state_and_last_step(case, with_complex):
    params = make_params(with_complex=with_complex)
    opt = DYNABOUND_CASES[case](params)
    # A scheduler-like lr change: the bounds follow lr / base_lr.
    before, _ = train(opt, params, lr_at=lambda k: 1e-3 if k < 4 else 4e-4)
    state_before = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    rates = effective_lr(opt)
    assert set(rates) == set(params)
    for p, p0 in zip(params, before, strict=True):
        group, state = opt.param_groups[0], opt.state[p]
        rate = rates[p]
        assert rate.shape == real(p).shape
        torch.testing.assert_close(rate, dynabound_direct(group, state), rtol=1e-12, atol=0)
        # The rate times m is exactly the move of the last step (after decoupled decay).
        lr, wd = float(group["lr"]), group["weight_decay"]
        decayed = real(p0) * (1 - lr * wd) if group["decoupled_weight_decay"] else real(p0)
        torch.testing.assert_close(
            decayed - real(p.detach()), rate * real(state["exp_avg"]), rtol=1e-9, atol=1e-15
        )
        for key, value in state.items():  # reading the rates changed nothing
            assert torch.equal(value, state_before[p][key])


def test_dynabound_float32_rate_reproduces_step():
    params = make_params(dtype=torch.float32)
    opt = AdaBound(params, lr=1e-3)
    before, _ = train(opt, params)
    rates = effective_lr(opt)
    for p, p0 in zip(params, before, strict=True):
        assert rates[p].dtype == torch.float32
        move = rates[p] * opt.state[p]["exp_avg"]
        torch.testing.assert_close(p0 - p.detach(), move, rtol=1e-3, atol=1e-7)


def adam_direct(group, state):
    t = float(state["step"])
    b1, b2 = group["betas"]
    u = real(state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]).double()
    return float(group["lr"]) / (1 - b1**t) / (u.sqrt() / math.sqrt(1 - b2**t) + group["eps"])


def rmsprop_direct(group, state):
    u = real(state["square_avg"]).double()
    if group["centered"]:
        u = u - real(state["grad_avg"]).double() ** 2
    return group["lr"] / (u.sqrt() + group["eps"])


def adagrad_direct(group, state):
    t = float(state["step"])
    clr = group["lr"] / (1 + (t - 1) * group["lr_decay"])
    return clr / (real(state["sum"]).double().sqrt() + group["eps"])


def adamax_direct(group, state):
    t = float(state["step"])
    return group["lr"] / (1 - group["betas"][0] ** t) / real(state["exp_inf"]).double()


# (constructor, direct formula, direction the rate multiplies: "m", "grad" or "buf")
TORCH_CASES = {
    "adam": (lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=False), adam_direct, "m"),
    "adam-foreach": (lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True), adam_direct, "m"),
    "amsgrad": (lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True), adam_direct, "m"),
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), adam_direct, "m"),
    "adam-tensor-lr": (
        lambda ps: torch.optim.Adam(ps, lr=torch.tensor(1e-2, dtype=torch.float64)),
        adam_direct,
        "m",
    ),
    "adamax": (lambda ps: torch.optim.Adamax(ps, lr=1e-2), adamax_direct, "m"),
    "rmsprop": (lambda ps: torch.optim.RMSprop(ps, lr=1e-3), rmsprop_direct, "grad"),
    "rmsprop-centered": (
        lambda ps: torch.optim.RMSprop(ps, lr=1e-3, centered=True),
        rmsprop_direct,
        "grad",
    ),
    "rmsprop-momentum": (
        lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.9),
        rmsprop_direct,
        "buf",
    ),
    "adagrad": (
        lambda ps: torch.optim.Adagrad(ps, lr=0.1, lr_decay=0.1, initial_accumulator_value=0.1),
        adagrad_direct,
        "grad",
    ),
    "sgd-momentum": (
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
        lambda group, state: torch.full_like(real(state["momentum_buffer"]), group["lr"]),
        "buf",
    ),
}


@pytest.mark.parametrize("with_complex", [False, True])
@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_torch_optimizer_rates(case, with_complex):
    make, direct, direction = TORCH_CASES[case]
    params = make_params(with_complex=with_complex)
    opt = make(params)
    before, grads = train(opt, params)
    rates = effective_lr(opt)
    assert set(rates) == set(params)
    for p, p0, g in zip(params, before, grads, strict=True):
        group, state = opt.param_groups[0], opt.state[p]
        torch.testing.assert_close(rates[p], direct(group, state), rtol=1e-12, atol=0)
        lr, wd = float(group["lr"]), group["weight_decay"]
        decayed = real(p0) * (1 - lr * wd) if wd else real(p0)
        if direction == "m":
            expected = rates[p] * real(state["exp_avg"])
        elif direction == "grad":
            expected = rates[p] * real(g)
        else:  # momentum buffers: the move is lr * buf; the rate is lr (SGD) or feeds buf
            expected = lr * real(state["momentum_buffer"])
        torch.testing.assert_close(decayed - real(p.detach()), expected, rtol=1e-9, atol=1e-15)


def test_rmsprop_momentum_rate_feeds_the_buffer():
    params = make_params()
    opt = torch.optim.RMSprop(params, lr=1e-3, momentum=0.9)
    train(opt, params, steps=3)
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in params]
    _, grads = train(opt, params, steps=1)
    rates = effective_lr(opt)
    for p, old, g in zip(params, buffers, grads, strict=True):
        increment = opt.state[p]["momentum_buffer"] - 0.9 * old
        torch.testing.assert_close(increment, rates[p] / 1e-3 * g, rtol=1e-9, atol=1e-15)


def test_only_stepped_parameters_are_reported():
    params = make_params()
    frozen = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = AdaBound([*params, frozen])
    assert effective_lr(opt) == {}
    adagrad = torch.optim.Adagrad(params)  # state exists from construction, with step 0
    assert effective_lr(adagrad) == {}
    train(opt, params, steps=2)
    assert set(effective_lr(opt)) == set(params)
    sgd = torch.optim.SGD([*params, frozen], lr=0.1)  # keeps no state: params with a gradient
    assert set(effective_lr(sgd)) == set(params)


def test_unsupported_optimizers_raise_type_error():
    params = make_params()
    with pytest.raises(TypeError, match="LBFGS"):
        effective_lr(torch.optim.LBFGS(params))
    with pytest.raises(TypeError, match="no rate bounds"):
        bound_activity(torch.optim.Adam(params))
    with pytest.raises(TypeError, match="LBFGS"):
        BoundMonitor(torch.optim.LBFGS(params))


def constructed_adabound():
    """Step 1 at lr == base_lr = 1e-3: lower ~ 1e-4, upper ~ 100.1; the unclipped rate is
    1e-3*sqrt(1-b2)/(1-b1)/(sqrt(v)+eps) = 3.16e-4/(sqrt(v)+eps)."""
    a = nn.Parameter(torch.zeros(10))
    b = nn.Parameter(torch.zeros(4))
    opt = AdaBound([a, b], lr=1e-3, final_lr=0.1, gamma=1e-3)
    a.grad, b.grad = torch.ones(10), torch.ones(4)
    opt.step()
    opt.state[a]["exp_avg_sq"] = torch.tensor([100.0] * 3 + [0.0] * 2 + [1e-4] * 5)
    opt.state[b]["exp_avg_sq"] = torch.full((4,), 1e-2)
    return opt, a, b


def test_bound_fractions_on_constructed_case():
    opt, a, b = constructed_adabound()
    activity = bound_activity(opt, names={"a": a, "b": b})
    final = 0.1
    lower, upper = final * (1 - 1 / (1e-3 + 1)), final * (1 + 1 / 1e-3)
    pa, pb = activity.params
    assert (pa.name, pa.numel, pa.step) == ("a", 10, 1)
    assert (pa.lower, pa.upper, pa.free) == (0.3, 0.2, 0.5)
    assert (pb.lower, pb.upper, pb.free) == (0.0, 0.0, 1.0)
    assert (activity.lower, activity.upper) == (3 / 14, 2 / 14)
    assert activity.free == pytest.approx(9 / 14)
    assert activity.transition == pytest.approx(5 / 14)
    assert pa.lower_bound == pytest.approx(lower, rel=1e-6)
    assert activity.upper_bound == pytest.approx(upper, rel=1e-6)
    assert pa.rate_min == pytest.approx(lower, rel=1e-6)
    assert pa.rate_max == pytest.approx(upper, rel=1e-6)
    summary = activity.summary()
    assert summary["lower"] == 3 / 14 and summary["step"] == 1.0
    # Sorted rates: 3 at lower, 4 of b, 5 free of a, 2 at upper: the median averages b and a.
    free_a, free_b = (1e-3 * math.sqrt(1 - 0.999) / 0.1 / (s + 1e-8) for s in (1e-2, 0.1))
    assert summary["rate_median"] == pytest.approx((free_a + free_b) / 2, rel=1e-5)
    assert activity.per_param()["a/upper"] == 0.2
    # An unclipped rate exactly at the bound counts as pinned there.
    numerator = math.sqrt(1 - 0.999) / 0.1
    at_lower = (numerator / (lower / 1e-3) - 1e-8) ** 2
    opt.state[b]["exp_avg_sq"] = torch.full((4,), at_lower)
    assert bound_activity(opt).params[1].lower == 1.0


def test_bound_activity_paper_mode_bounds_include_sqrt_t_scale():
    params = make_params()
    opt = AdaBound(params, lr=1e-3, bounds="paper", final_lr=0.1, betas=(0.9, 0.99))
    train(opt, params, steps=9)
    activity = bound_activity(opt)
    t = 9
    assert activity.lower_bound == pytest.approx(0.1 * (1 - 1 / (0.01 * t + 1)) / 3)
    assert activity.upper_bound == pytest.approx(0.1 * (1 + 1 / (0.01 * t)) / 3)
    rates = effective_lr(opt)
    for p, a in zip(params, activity.params, strict=True):
        assert (a.rate_min, a.rate_max) == (rates[p].min().item(), rates[p].max().item())
        assert a.lower_bound * (1 - 1e-9) <= a.rate_min <= a.rate_max
        assert a.rate_max <= a.upper_bound * (1 + 1e-9)


def test_rate_statistics_exact_and_sampled():
    g = torch.Generator().manual_seed(3)
    small = [torch.rand(50, generator=g) ** 4, torch.rand(7, 3, generator=g)]
    stats = rate_statistics(small, (0.0, 0.01, 0.5, 0.99, 1.0))
    values = torch.cat([t.flatten() for t in small]).double().numpy()
    for q in (0.0, 0.01, 0.5, 0.99, 1.0):
        assert stats[f"rate_q{q:g}"] == pytest.approx(np.quantile(values, q), rel=1e-6)
    assert stats["rate_min"] == pytest.approx(values.min())
    big = [torch.rand(EXACT_QUANTILE_LIMIT, generator=g), torch.rand(100_000, generator=g) * 3]
    stats = rate_statistics(big, (0.01, 0.5, 0.99))
    values = torch.cat(big).double().numpy()
    for q in (0.01, 0.5, 0.99):  # a sample estimate: within 0.5% in rank of the truth
        lo, hi = np.quantile(values, [max(q - 0.005, 0), min(q + 0.005, 1)])
        assert lo <= stats[f"rate_q{q:g}"] <= hi
    assert stats["rate_max"] == pytest.approx(values.max())
    with pytest.raises(ValueError, match="quantiles"):
        rate_statistics(small, (1.5,))


def test_monitor_records_every_n_to_list_and_csv(tmp_path):
    params = make_params()
    opt = AdaBound(params, lr=1e-3)
    csv_path = tmp_path / "logs" / "bounds.csv"
    monitor = BoundMonitor(opt, every=3, csv_path=csv_path, names=[("w", params[0])])
    train(opt, params, steps=10)
    assert [r["step"] for r in monitor.records] == [3.0, 6.0, 9.0]
    last = monitor.records[-1]
    for key in ("rate_min", "rate_q0.01", "rate_q0.5", "rate_q0.99", "rate_max", "lower"):
        assert key in last
    assert last["lower"] + last["upper"] + last["free"] == pytest.approx(1.0)
    lines = csv_path.read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("step,")
    assert read_records(csv_path)[1]["step"] == 6.0
    monitor.remove()
    monitor.remove()
    train(opt, params, steps=3)
    assert len(monitor.records) == 3 and len(csv_path.read_text().splitlines()) == 4
    # A new monitor appends to the existing file under its header (a resumed run).
    with BoundMonitor(opt, every=1, csv_path=csv_path) as again:
        train(opt, params, steps=2)
    assert len(again.records) == 2
    rows = read_records(csv_path)
    assert len(rows) == 5 and rows[-1]["step"] == pytest.approx(15.0)
    assert len(opt._optimizer_step_post_hooks) == 0


def test_monitor_summaries_match_direct_calls_and_per_param(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    opt = AMSBound(model.parameters(), lr=1e-2)
    monitor = BoundMonitor(opt, every=2, names=model, per_param=True, quantiles=(0.5,))
    for _ in range(4):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
    row = monitor.records[-1]
    expected = bound_activity(opt, names=model).summary()
    for key, value in expected.items():
        assert row[key] == pytest.approx(value), key
    assert {"0.weight/lower", "1.bias/free"} <= set(row)
    adam_params = make_params()
    adam = torch.optim.Adam(adam_params)
    with BoundMonitor(adam, every=1) as adam_monitor:
        train(adam, adam_params, steps=2)
    stats = rate_statistics(effective_lr(adam).values(), (0.01, 0.5, 0.99))
    assert adam_monitor.records[-1] == {"step": 2.0, **stats}


def test_monitor_tensorboard(tmp_path, monkeypatch):
    class FakeWriter:
        def __init__(self):
            self.scalars, self.closed = [], False

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            self.closed = True

    writer = FakeWriter()
    monkeypatch.setattr(monitor_module, "_open_tensorboard", lambda log_dir: writer)
    params = make_params()
    opt = AdaBound(params)
    with BoundMonitor(opt, every=2, tensorboard_dir=tmp_path / "tb"):
        train(opt, params, steps=4)
    assert ("dynabound/free", pytest.approx(1.0, abs=1.0), 4) in writer.scalars
    assert {step for _, _, step in writer.scalars} == {2, 4} and writer.closed
    monkeypatch.undo()
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.warns(UserWarning, match="TensorBoard"):
            BoundMonitor(opt, tensorboard_dir=tmp_path / "tb2").remove()
    else:
        BoundMonitor(opt, every=1, tensorboard_dir=tmp_path / "tb2").record()
        assert any((tmp_path / "tb2").iterdir())


def test_monitor_rejects_bad_arguments():
    opt = AdaBound(make_params())
    for every in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="every"):
            BoundMonitor(opt, every=every)
    with pytest.raises(ValueError, match="quantiles"):
        BoundMonitor(opt, quantiles=(0.5, 2.0))


class SmallCNN(nn.Module):
    def __init__(self, depth=11):
        super().__init__()
        layers = [nn.Conv2d(1, 3, 3, padding=1)]
        layers += [nn.Conv2d(3, 3, 3, padding=1) for _ in range(depth - 1)]
        self.convs = nn.ModuleList(layers)
        self.norm = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 10)

    def forward(self, x):
        for conv in self.convs:
            x = torch.relu(conv(x))
        return self.fc(self.norm(x).flatten(1))


def test_figure1_selection_and_heatmap(tmp_path):
    torch.manual_seed(0)
    model = SmallCNN()
    opt = AdaBound(model.parameters(), lr=1e-2, final_lr=0.1)
    for _ in range(3):
        nn.functional.cross_entropy(model(torch.randn(8, 1, 4, 4)), torch.arange(8)).backward()
        opt.step()
    rates = effective_lr(opt)
    blocks = select_figure1_params(model, rates)
    labels = [label for label, _ in blocks]
    assert len(blocks) == 10 and labels[-1] == "fc.bias"
    assert labels[0].startswith("convs.0.weight[") and labels[8].startswith("convs.10.weight[")
    assert len({label.split("[")[0] for label in labels[:9]}) == 9
    first = blocks[0][1]
    out, inp = (int(i) for i in labels[0].split("[")[1].rstrip("]").split(","))
    assert torch.equal(first, rates[model.convs[0].weight][out, inp])
    mean = select_figure1_params(model.named_parameters(), rates, kernel="mean")
    torch.testing.assert_close(mean[0][1], rates[model.convs[0].weight].mean(dim=(0, 1)))
    activity = bound_activity(opt)
    bounds = (activity.lower_bound, activity.upper_bound)
    path = plot_rate_heatmap(blocks, tmp_path / "fig" / "heat.png", bounds=bounds, dpi=50)
    assert path.exists() and path.stat().st_size > 10_000
    with pytest.raises(ValueError, match="2-D block"):
        plot_rate_heatmap({"w": rates[model.convs[0].weight]}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="kernel"):
        select_figure1_params(model, rates, kernel="max")


def test_figure1_selection_falls_back_to_matrix_blocks_for_mlps(tmp_path):
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    blocks = select_figure1_params(model, effective_lr(opt))
    assert len(blocks) == 10 and blocks[-1][0] == "4.bias"
    assert [label.split("[")[0] for label, _ in blocks[:9]] == ["0.weight"] * 3 + [
        "2.weight"
    ] * 3 + ["4.weight"] * 3
    assert all(block.shape == (3, 3) for _, block in blocks[:9])
    path = plot_rate_heatmap(blocks, tmp_path / "mlp.png", title="Adam", dpi=50)
    assert path.stat().st_size > 10_000


def test_transition_plots(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    opt = AdaBound(model.parameters(), lr=1e-2, gamma=0.05)
    csv_path = tmp_path / "b.csv"
    with BoundMonitor(opt, every=5, csv_path=csv_path, names=model, per_param=True) as monitor:
        for _ in range(60):
            model(torch.randn(16, 4)).pow(2).mean().backward()
            opt.step()
    overall = plot_transition(monitor.records, tmp_path / "t" / "overall.png", dpi=50)
    layers = plot_transition(csv_path, tmp_path / "layers.png", per_layer=True, log_x=True, dpi=50)
    assert overall.stat().st_size > 10_000 and layers.stat().st_size > 10_000
    epochs = [{"epoch": i, "bounds/lower": 0.1 * i, "bounds/free": 1 - 0.1 * i, "bounds/upper": 0}
              for i in range(5)]  # fmt: skip
    assert plot_transition(epochs, tmp_path / "e.png", x="epoch", prefix="bounds/", dpi=30).exists()
    with pytest.raises(ValueError, match="no records"):
        plot_transition([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="per_param"):
        plot_transition(epochs, tmp_path / "x.png", x="epoch", prefix="bounds/", per_layer=True)
    with pytest.raises(ValueError, match="x key"):
        plot_transition(monitor.records, tmp_path / "x.png", x="epoch")


def test_diagnostics_import_without_matplotlib(monkeypatch):
    class BlockMatplotlib:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "matplotlib":
                raise ImportError(f"{name} is blocked in this test")
            return None

    for name in list(sys.modules):
        if name.split(".")[0] == "matplotlib" or name.startswith("dynabound.diagnostics"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(dynabound, "diagnostics", dynabound.diagnostics)
    monkeypatch.setattr(sys, "meta_path", [BlockMatplotlib(), *sys.meta_path])
    fresh = importlib.import_module("dynabound.diagnostics")
    params = make_params()
    opt = AdaBound(params)
    train(opt, params, steps=2)
    assert set(fresh.effective_lr(opt)) == set(params)
    with pytest.raises(ImportError, match="blocked"):
        fresh.plot_transition([{"step": 1, "lower": 0, "free": 1, "upper": 0}], "unused.png")


class DeadUnitMLP(nn.Module):
    """8-16-4 ReLU perceptron whose hidden unit 5 never fires and whose input 3 is always 0:
    the weights touching them never get a nonzero gradient."""

    DEAD, BLANK = 5, 3

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
        with torch.no_grad():
            self.fc1.weight[self.DEAD] = 0
            self.fc1.bias[self.DEAD] = -100.0

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


ZERO_MOMENT_CASES = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
    "amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-3, amsgrad=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.0),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
    "adamax": lambda ps: torch.optim.Adamax(ps, lr=1e-3),
    "adabound": lambda ps: AdaBound(ps, lr=1e-3, foreach=False),
    "amsbound-8bit": lambda ps: AMSBound(ps, lr=1e-3, state_dtype="8bit"),
}


@pytest.mark.parametrize("case", list(ZERO_MOMENT_CASES))
def test_elements_that_never_had_a_gradient_are_excluded_and_counted(case):
    model = DeadUnitMLP()
    opt = ZERO_MOMENT_CASES[case](list(model.parameters()))
    g = torch.Generator().manual_seed(3)
    touched = {p: torch.zeros_like(p, dtype=torch.bool) for p in model.parameters()}
    for _ in range(20):
        x = torch.randn(32, 8, generator=g)
        x[:, DeadUnitMLP.BLANK] = 0
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), torch.randint(0, 4, (32,), generator=g)).backward()
        for p in model.parameters():
            touched[p] |= p.grad != 0
        opt.step()
    never = {p: ~t for p, t in touched.items()}
    n_never = sum(int(m.sum()) for m in never.values())
    assert n_never == 8 + 1 + 4 + 15  # the dead unit's row, bias, outgoing column; input 3

    kept = effective_lr(opt)
    assert kept.excluded == 0
    rates = effective_lr(opt, exclude_zero_second_moment=True)
    assert rates.excluded == n_never and rates.numel == sum(p.numel() for p in model.parameters())
    for p, rate in rates.items():
        assert torch.equal(rate.isnan(), never[p])
        torch.testing.assert_close(rate[~never[p]], kept[p][~never[p]], rtol=0, atol=0)
    remaining = rate_statistics(rates.values())["rate_max"]
    everything = rate_statistics(kept.values())["rate_max"]
    assert remaining < everything
    if case in ("adam", "amsgrad", "adamw", "adamax"):
        # The artifact: exactly lr/eps (bias-corrected), only where the moment is zero.
        eps_rate = 1e-3 / (1 - 0.9**20) / 1e-8
        assert everything == pytest.approx(eps_rate, rel=1e-6)
        assert remaining < 1e-3 / 1e-8


def test_sgd_has_no_second_moment_to_exclude():
    model = DeadUnitMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    rates = effective_lr(opt, exclude_zero_second_moment=True)
    assert rates.excluded == 0 and not any(r.isnan().any() for r in rates.values())


def test_the_heatmap_states_how_many_elements_were_left_out(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    model = DeadUnitMLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    rates = effective_lr(opt, exclude_zero_second_moment=True)
    titles = []
    save = Figure.savefig

    def savefig(fig, *args, **kwargs):
        titles.append(fig._suptitle.get_text())
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    blocks = select_figure1_params(model, rates, kernel="sample")
    blocks.append(("fc1.weight[5]", rates[model.fc1.weight][DeadUnitMLP.DEAD, :3][None]))
    path = plot_rate_heatmap(
        blocks, tmp_path / "heat.png", title="Adam", excluded=(rates.excluded, rates.numel), dpi=50
    )
    assert path.stat().st_size > 10_000
    assert titles[0].startswith("Adam\n")
    assert f"{rates.excluded:,} of {rates.numel:,} elements" in titles[0]
    mean = select_figure1_params(model, rates, kernel="mean")  # no conv: matrix blocks
    assert all(not torch.isnan(b).all() for _, b in mean)
