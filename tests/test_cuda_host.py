"""The CUDA fused step's host side, without a GPU.

CPU tensors are routed through the CUDA kernels' host side with the two Triton
kernels replaced by recorders, which shows what one eager step enqueues on the device and
when its launch plan is rebuilt. The kernel's own arithmetic runs in Triton's CPU
interpreter (a subprocess: ``TRITON_INTERPRET`` must be set before Triton is imported).
"""

from __future__ import annotations

import copy
import gc
import os
import subprocess
import sys
import textwrap
import weakref
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from device_stubs import LaunchRecorder, TorchOps
from kernel_required import require_tested_triton

from dynabound import AdaBound
from dynabound.kernels import dispatch, triton_common

tk = pytest.importorskip("dynabound.kernels.triton_kernel")
if tk.triton is None:
    pytest.skip("triton is not installed", allow_module_level=True)


@pytest.fixture
def cuda_path(monkeypatch):
    """Route fused CPU steps through the CUDA path with recording kernels; fresh caches."""
    recorders = LaunchRecorder(), LaunchRecorder()
    monkeypatch.setattr(tk, "_adabound_kernel", recorders[0])
    monkeypatch.setattr(triton_common, "advance_steps", recorders[1])
    run_kernels = dispatch.run_kernels
    on_cuda_path = lambda device, *args, **kwargs: run_kernels("cuda", *args, **kwargs)  # noqa: E731
    monkeypatch.setattr(dispatch, "run_kernels", on_cuda_path)
    monkeypatch.setattr(tk, "_plans", OrderedDict())
    for cache in ("_grad_tables", "_hypers"):
        monkeypatch.setattr(triton_common, cache, OrderedDict())
    builds = {"plan": 0, "grads": 0}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            builds[name] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(tk, "_build_plan", counting("plan", tk._build_plan))
    grads_counter = counting("grads", triton_common.build_grad_table)
    monkeypatch.setattr(triton_common, "build_grad_table", grads_counter)
    return recorders, builds


def model(n_tensors: int) -> list[torch.nn.Parameter]:
    shapes = [(16, 3, 3, 3), (16,), (40, 16)] * (n_tensors // 3) + [(7,)] * (n_tensors % 3)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def one_step_work(opt, recorders) -> tuple[int, list[str]]:
    before = sum(r.launches for r in recorders)
    with TorchOps() as ops:
        opt.step()
    return sum(r.launches for r in recorders) - before, ops.ops


OPTIONS = {
    "reference": {},
    "paper, amsbound, decay, box": dict(
        bounds="paper", amsbound=True, weight_decay=0.1, decoupled_weight_decay=True, box=(-1, 1)
    ),
    "tensor lr, maximize": dict(lr=torch.tensor(1e-3), maximize=True),
}


@pytest.mark.parametrize("name", OPTIONS)
def test_two_launches_and_no_other_device_work_whatever_the_parameter_count(cuda_path, name):
    recorders, _ = cuda_path
    for n in (10, 200):
        opt = AdaBound(model(n), fused=True, **OPTIONS[name])
        opt.step()  # creates the state and the launch plan
        launches, ops = one_step_work(opt, recorders)
        assert launches == 2, (n, launches)  # the update, then the step counters
        assert ops == [], (n, ops)


def test_bound_functions_cost_a_constant_number_of_device_ops(cuda_path):
    recorders, _ = cuda_path
    counts = []
    for n in (10, 200):
        opt = AdaBound(model(n), fused=True, bounds=lambda t: (0.1 - 0.1 / (t + 1), 0.1 + 1 / t))
        opt.step()
        launches, ops = one_step_work(opt, recorders)
        counts.append((launches, len(ops)))
    assert counts[0] == counts[1], counts
    assert counts[0][0] == 1  # the counters are advanced by a foreach op instead


def test_one_launch_group_per_dtype(cuda_path):
    recorders, _ = cuda_path
    params = model(6) + [torch.nn.Parameter(torch.randn(5, dtype=torch.float64))]
    params[-1].grad = torch.randn(5, dtype=torch.float64)
    opt = AdaBound(params, fused=True)
    opt.step()
    assert one_step_work(opt, recorders) == (4, [])


def test_the_plan_is_built_once_and_rebuilt_only_when_tensors_move(cuda_path):
    _, builds = cuda_path
    params = model(9)
    opt = AdaBound(params, fused=True, amsbound=True)
    for _ in range(3):
        opt.step()
    assert builds == {"plan": 1, "grads": 1}

    # zero_grad(set_to_none=True) then backward: gradients at new addresses replace only
    # the gradient table (the old ones stay alive here, so the addresses really differ).
    old = [p.grad for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert builds == {"plan": 1, "grads": 2}
    for p, g in zip(params, old, strict=True):  # back to cached addresses: no rebuild
        p.grad = g
    opt.step()
    assert builds == {"plan": 1, "grads": 2}

    moved = params[4].data
    params[4].data = moved.clone()  # a parameter at a new address
    opt.step()
    assert builds["plan"] == 2

    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # new state tensors
    opt.step()
    assert builds["plan"] == 3


def test_cached_plans_keep_no_tensor_alive(cuda_path):
    params = model(6)
    alive = [weakref.ref(p) for p in params]
    opt = AdaBound(params, fused=True, amsbound=True)
    opt.step()
    state = weakref.ref(opt.state[params[0]]["exp_avg"])
    del opt, params
    gc.collect()
    assert all(ref() is None for ref in alive) and state() is None


def test_a_gradient_in_another_layout_is_refused_before_anything_changes(cuda_path):
    params = model(3)
    opt = AdaBound(params, fused=True)
    opt.step()
    before = [p.detach().clone() for p in params]
    steps = [s["step"].clone() for s in opt.state.values()]
    params[2].grad = torch.randn(16, 40).t()  # same shape, column-major
    with pytest.raises(RuntimeError, match="dense memory layout"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert all(torch.equal(s["step"], b) for s, b in zip(opt.state.values(), steps, strict=True))


def test_state_of_another_dtype_is_refused(cuda_path):
    params = model(3)
    opt = AdaBound(params, fused=True)
    opt.step()
    opt.state[params[1]]["exp_avg"] = opt.state[params[1]]["exp_avg"].double()
    with pytest.raises(RuntimeError, match="state of the parameter's dtype"):
        opt.step()


def test_float_lr_is_carried_to_float64_precision():
    for lr in (1e-3, 0.1, 3e-7, 2.5e-5, 1.0, 0.0):
        high, low = triton_common.split_float(lr)
        assert abs(high + low - lr) <= 2**-48 * abs(lr)


def test_an_estimated_final_lr_is_carried_exactly():
    """An estimating step takes final_lr as three float32 arguments (its value moves every
    step): their float64 sum is the estimate itself, bit for bit."""
    import random
    import struct

    rng = random.Random(0)
    values = [1.0, 0.1, 1 / 3, 15.123456789, 1e-9, 3e8] + [
        10 ** rng.uniform(-9, 9) for _ in range(10000)
    ]
    for value in values:
        parts = triton_common.split_float_exactly(value)
        assert all(struct.unpack("f", struct.pack("f", p))[0] == p for p in parts)
        high, middle, low = parts
        assert (high + middle) + low == value


INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import itertools, torch
    from dynabound.bounds import step_coefficients
    from dynabound.functional import adabound
    from dynabound.kernels import triton_kernel
    from dynabound.kernels.dispatch import run_kernels
    from dynabound.kernels.triton_common import step_scalars
    from dynabound.spec import StepSpec, StepTensors

    def cuda_step(*lists, **fields):  # the CUDA kernels on CPU tensors: the interpreter
        run_kernels("cuda", StepTensors(*lists), StepSpec(**fields))

    # 1. The kernel's scalars are dynabound.bounds' scalars.
    steps = torch.tensor([1, 2, 3, 7, 10, 100, 999, 1e4, 123457, 1e6], dtype=torch.float64)
    for bounds, gamma, (b1, b2), final_lr, base_lr in itertools.product(
        ("reference", "paper"), (1e-3, 0.5, 1e-7), ((0.9, 0.999), (0.0, 0.9999), (0.5, 0.0)),
        (0.1, 3.0), (1e-3, 0.7),
    ):
        got = step_scalars(steps, bounds=bounds, final_lr=final_lr, base_lr=base_lr,
                           gamma=gamma, beta1=b1, beta2=b2)
        for i, t in enumerate(steps.tolist()):
            want = step_coefficients(t, bounds=bounds, final_lr=final_lr, base_lr=base_lr,
                                     gamma=gamma, beta1=b1, beta2=b2)
            expected = (want.numerator, want.lower, want.upper, want.scale)
            for name, g, w in zip(("numerator", "lower", "upper", "scale"), got, expected):
                g = g[i].item()
                # Bounds and scale follow the same IEEE operations. beta**t is computed as
                # exp(t log beta), a few ulps from Python's pow, and 1 - beta**t magnifies
                # that by beta**t / (1 - beta**t).
                tol = 0.0
                if name == "numerator":
                    tol = 16 * 2.0**-53 * max([1.0] + [b**t / (1 - b**t) for b in (b1, b2) if b])
                assert abs(g - w) <= tol * abs(w), (bounds, gamma, b1, b2, t, name, g, w)

    # 2. Whole steps against the single-tensor path for what the other interpreter test
    #    leaves out: bound functions, lr = 0, float16, a float lr of many digits.
    triton_kernel.CHUNK = 2 * triton_kernel.BLOCK
    def tensors(dtype, amsbound, seed=0):
        gen = torch.Generator().manual_seed(seed)
        shapes = [(3000,), (33, 7), (), (0,)]
        p = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
        m = [torch.zeros_like(x) for x in p]
        v = [torch.zeros_like(x) for x in p]
        vmax = [torch.zeros_like(x) for x in p] if amsbound else []
        return p, m, v, vmax, [torch.zeros(()) for _ in p]

    def grads(params, step, scale=1.0):
        gen = torch.Generator().manual_seed(100 + step)
        return [(torch.randn(x.shape, generator=gen, dtype=torch.float64) * scale).to(x.dtype)
                for x in params]

    user_bounds = lambda t: (0.05 * (1 - 1 / (0.01 * t + 1)), 0.05 * (1 + 3 / (0.01 * t)))
    base = dict(amsbound=False, beta1=0.9, beta2=0.999, lr=1e-2, final_lr=0.1, base_lr=1e-2,
                gamma=1e-3, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
                unscaled_decay=False, bounds="reference", box=None, maximize=False)
    cases = [
        (torch.float32, dict(bounds=user_bounds, amsbound=True), 1.0),
        (torch.float32, dict(lr=0.0, weight_decay=0.1, decoupled_weight_decay=True,
                             unscaled_decay=True), 1.0),
        (torch.float32, dict(lr=3.3333333333e-3, gamma=0.37), 1.0),
        (torch.float64, dict(bounds="paper", weight_decay=0.01), 1.0),
        (torch.float16, dict(amsbound=True, weight_decay=0.1), 1e-3),
    ]
    for dtype, options, grad_scale in cases:
        hyper = dict(base, **options)
        p, m, v, vmax, steps = tensors(dtype, hyper["amsbound"])
        ref = [[x.float() if dtype == torch.float16 else x.clone() for x in xs]
               for xs in (p, m, v, vmax)]
        rsteps = [torch.zeros(()) for _ in p]
        for step in range(3):
            g = grads(p, step, grad_scale)
            cuda_step(p, g, m, v, vmax, steps, capturable=False,
                                  has_complex=False, grad_scale=None, found_inf=None, **hyper)
            rg = [x.float() if dtype == torch.float16 else x for x in g]
            adabound(ref[0], rg, ref[1], ref[2], ref[3], rsteps, foreach=False, **hyper)
            if dtype == torch.float16:  # compare one step's rounding, then resynchronise
                for xs, rs in zip((p, m, v, vmax), ref):
                    for a, b in zip(xs, rs):
                        torch.testing.assert_close(a.float(), b, rtol=1e-3, atol=1e-7)
                        b.copy_(a)
        tol = {torch.float32: 1e-6, torch.float64: 1e-13, torch.float16: 1e-3}[dtype]
        for a, b in zip(p + m + v + vmax, sum(ref, [])):
            torch.testing.assert_close(a.to(b.dtype), b, rtol=tol, atol=tol)
        assert all(s.item() == 3 for s in steps), options
    print("triton-host-interpreter-ok")
    """
)


def test_kernel_scalars_and_remaining_options_in_interpreter():
    require_tested_triton()
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", INTERPRETER_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "triton-host-interpreter-ok" in done.stdout
