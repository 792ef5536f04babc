"""The projection sums of final_lr="auto" (``StepTensors.projection``) from the Triton kernels.

Both CUDA kernels (``triton_kernel``, and ``triton_encoded`` for bf16 / 8-bit state and
stochastic rounding) add ``sum(d*d)`` and ``sum(d*g)`` during the step they already run.
Here they run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET`` must be set
before Triton is imported, so the comparisons run this file as a script in a subprocess)
against the single-tensor reference with a projection, one step at a time from the same
values (the reference continues from the kernel's stored values after every step, so each
comparison is one step's rounding), and against the same kernel without a projection, whose
stored bits must not change. The host side (launches, refusals) runs in this process with
the kernels replaced by recorders, as in ``test_cuda_host.py``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import traceback
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from device_stubs import LaunchRecorder
from kernel_required import require_tested_triton
from option_sets import EVERY_OPTION, cases

from dynabound.functional import adabound_step
from dynabound.kernels import dispatch
from dynabound.spec import StepSpec, StepTensors

# Sizes: not multiples of the float kernel's 1024-element blocks or the encoded kernel's 256,
# one over the float kernel's 8192-element programs, a 0-dim and an empty tensor; for the
# encoded kernel (a program per 256 elements, slower in the interpreter) smaller ones.
SIZES = [(3000,), (33, 7), (), (0,), (10001,)]
ENCODED_SIZES = [(1000,), (33, 7), (), (0,), (300,)]
STEPS = 3
# float64 sums of float32 terms that agree to the terms' rounding: the step's float32
# operations (the same in the same order) differ from the reference's at most in an ulp.
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def run_script(*cases_: str) -> dict[str, str]:
    """Run the cases in one interpreter subprocess: case -> "ok" or its traceback."""
    require_tested_triton()
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    tests = Path(__file__).resolve().parent
    path = [str(tests.parent / "src"), str(tests), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, path))
    done = subprocess.run(
        [sys.executable, __file__, *cases_], env=env, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_ok(results: dict[str, str], case: str) -> None:
    assert results[case] == "ok", results[case]


@pytest.fixture(scope="module")
def option_set_results():
    """Every option set through both kernels, in one subprocess (one import of Triton)."""
    names = [f"float:{name}" for name in EVERY_OPTION]
    return run_script(*names, *(f"encoded:{name}" for name in EVERY_OPTION))


@pytest.mark.parametrize(("name", "options"), cases("triton"))
def test_float_kernel_sums_match_the_reference(option_set_results, name, options):
    assert_ok(option_set_results, f"float:{name}")


@pytest.mark.parametrize(("name", "options"), cases("triton_8bit_state"))
def test_encoded_kernel_sums_match_the_reference(option_set_results, name, options):
    """Every option set with 8-bit moments; bf16 moments and stochastic rounding alone in
    test_every_dtype_complex_and_state_format."""
    assert_ok(option_set_results, f"encoded:{name}")


def test_every_dtype_complex_and_state_format():
    """float64, bfloat16, float16, complex64 and complex128 parameters, all in one step (a
    launch per dtype, one scratch); bf16 moments, and bfloat16 parameters rounded
    stochastically next to moments of their own dtype."""
    results = run_script("dtypes", "formats")
    assert_ok(results, "dtypes")
    assert_ok(results, "formats")


def test_sums_are_in_the_units_of_the_rescaled_scalars():
    """Where dynabound.bounds.within_range rescales the numerator by a power of two (an
    infinite upper bound, as on an estimating group's first step, or one beyond float32's
    range), the sums are the reference's: per unit of the rescaled ``lr * scale``."""
    assert_ok(run_script("rescaled"), "rescaled")


def test_grad_scaler_unscaled_gradients_and_skipped_steps():
    """Sums of the unscaled gradient; a step skipped for found_inf adds nothing."""
    assert_ok(run_script("scaler"), "scaler")


def test_estimated_final_lr_matches_the_single_tensor_path():
    """AdaBound(final_lr="auto", fused=True) against foreach=False over 50 steps: the same
    samples and estimates, to float rounding; reading each sample at the next step, as on
    a GPU, gives the same bits."""
    assert_ok(run_script("auto"), "auto")


def auto_history(options: dict, how: dict, device: str = "cpu", steps: int = 50) -> list:
    """``group["final_lr_auto"]["history"]`` after ``steps`` steps of a small regression
    with ``final_lr="auto"``."""
    from dynabound import AdaBound

    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.Tanh(), torch.nn.Linear(64, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.to(device)
    x = torch.randn(64, 40, generator=gen).to(device)
    y = torch.randn(64, 3, generator=gen).to(device)
    opt = AdaBound(model.parameters(), lr=1e-2, final_lr="auto", **options, **how)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    opt.update_final_lr_estimates()  # on a GPU the last step's sample is still out
    return opt.param_groups[0]["final_lr_auto"]["history"]


def assert_same_history(got: list, want: list, rtols: tuple[float, float], what) -> None:
    """The same steps, samples and estimates, to ``rtols`` (samples, estimates)."""
    assert len(got) == len(want), what
    assert sum(math.isfinite(row[1]) for row in want) >= 0.9 * len(want), what  # samples
    assert [row[0] for row in got] == [row[0] for row in want], what
    for column, rtol in zip((1, 2), rtols, strict=True):
        torch.testing.assert_close(
            torch.tensor([row[column] for row in got]),
            torch.tensor([row[column] for row in want]),
            rtol=rtol, atol=0, equal_nan=True, msg=f"{what}, column {column}",
        )  # fmt: skip


# (options, tolerance of the samples and of the estimates). The estimate's rounding grows
# with the trajectories'; with 8-bit moments an ulp of difference in float32 moves a
# stochastically rounded code by one unit, and 50 steps later the samples differ by up to
# about 0.3% (their average, the estimate, by 0.02%).
AUTO_OPTIONS = {
    "default": ({}, (1e-5, 1e-5)),
    "amsbound_decay": (dict(amsbound=True, weight_decay=1e-2), (1e-5, 1e-5)),
    "8bit": (dict(state_dtype="8bit"), (1e-2, 1e-3)),
}


@pytest.mark.parametrize("name", AUTO_OPTIONS)
def test_on_a_gpu_the_estimate_matches_the_single_tensor_path_and_repeats(name):
    from dynabound import kernels

    if not kernels.is_available("cuda"):
        pytest.skip(f"fused CUDA kernel unavailable: {kernels.unavailable_reason('cuda')}")
    options, rtols = AUTO_OPTIONS[name]
    got = auto_history(options, dict(fused=True), "cuda")
    assert_same_history(got, auto_history(options, dict(foreach=False), "cuda"), rtols, name)
    again = auto_history(options, dict(fused=True), "cuda")
    assert again == got  # fixed-order sums: the same bits run to run


def test_on_a_gpu_an_estimating_step_does_not_wait_for_the_device(monkeypatch):
    """Its sample travels to the host while the device works, and is read at the next
    step: no step synchronizes (torch's sync debug mode raises on any implicit sync),
    and reading each sample at once instead gives the same record, bit for bit."""
    from dynabound import AdaBound, kernels, optim

    if not kernels.is_available("cuda"):
        pytest.skip(f"fused CUDA kernel unavailable: {kernels.unavailable_reason('cuda')}")
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).cuda()) for s in [(256, 64), (64,)]]
    opt = AdaBound(params, lr=1e-2, final_lr="auto", fused=True)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).cuda()
    opt.step()  # the launch plan, and pinned memory from the caching allocator
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    record = opt.param_groups[0]["final_lr_auto"]
    assert record["steps"] == 20
    opt.update_final_lr_estimates()
    assert record["steps"] == 21

    later = auto_history({}, dict(fused=True), "cuda")
    monkeypatch.setattr(optim, "_read_at_once", lambda sample: True)
    assert auto_history({}, dict(fused=True), "cuda") == later


# --- the host side, in this process -------------------------------------------------------


@pytest.fixture
def cuda_path(monkeypatch):
    """CPU tensors through the CUDA kernels' host side, kernels replaced by recorders."""
    tk = pytest.importorskip("dynabound.kernels.triton_kernel")
    if tk.triton is None:
        pytest.skip("triton is not installed")
    from dynabound.kernels import triton_common, triton_encoded

    recorders = [LaunchRecorder() for _ in range(3)]
    monkeypatch.setattr(tk, "_adabound_kernel", recorders[0])
    monkeypatch.setattr(triton_encoded, "_encoded_kernel", recorders[1])
    monkeypatch.setattr(triton_common, "advance_steps", recorders[2])
    monkeypatch.setattr(tk, "_plans", OrderedDict())
    monkeypatch.setattr(triton_encoded, "_plans", OrderedDict())
    return recorders


def step_tensors(projection=None, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(dtype) for s in SIZES]
    lists = [params, [torch.randn(p.shape, generator=gen).to(dtype) for p in params]]
    lists += [[torch.zeros_like(p) for p in params] for _ in range(2)]
    return StepTensors(*lists, [], [torch.zeros(()) for _ in params], None, projection)


SPEC = StepSpec(
    lr=1e-2, beta1=0.9, beta2=0.999, final_lr=0.1, base_lr=1e-2, gamma=1e-3, eps=1e-8,
    weight_decay=0.0, amsbound=False, decoupled_weight_decay=False, unscaled_decay=False,
    maximize=False, bounds="reference", box=None,
)  # fmt: skip


@pytest.mark.parametrize("state_dtype", [None, "8bit"])
def test_a_projecting_step_launches_no_more_kernels(cuda_path, state_dtype):
    """The same two launches per dtype as an ordinary step; the sums of the partials and
    their addition to the projection are the only other device work."""
    spec = SPEC._replace(state_dtype=state_dtype)

    def tensors(projection):
        t = step_tensors(projection)
        if state_dtype is None:
            return t
        from test_triton_encoded import new_state

        moments = new_state(t.params, "8bit", False)
        return t._replace(**dict(zip(t._fields[2:5], moments, strict=True)))

    counts = []
    for projection in (None, torch.zeros(2, dtype=torch.float64)):
        before = sum(r.launches for r in cuda_path)
        dispatch.run_kernels("cuda", tensors(projection), spec)
        counts.append(sum(r.launches for r in cuda_path) - before)
    assert counts == [2, 2]


def test_a_projection_of_the_wrong_type_is_refused_before_anything_changes(cuda_path):
    tensors = step_tensors(torch.zeros(2, dtype=torch.float32))
    before = [p.clone() for p in tensors.params]
    with pytest.raises(RuntimeError, match="float64 tensor of shape"):
        dispatch.run_kernels("cuda", tensors, SPEC)
    assert all(torch.equal(p, b) for p, b in zip(tensors.params, before, strict=True))
    assert all(s.item() == 0 for s in tensors.state_steps)
    assert cuda_path[0].launches == 0


def test_a_kernel_without_projection_refuses_rather_than_adding_nothing(monkeypatch):
    monkeypatch.setattr(dispatch, "PROJECTING", set())
    tensors = step_tensors(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="cannot compute the projection"):
        dispatch.run_kernels("cuda", tensors, SPEC)
    assert all(s.item() == 0 for s in tensors.state_steps)


def test_the_compiled_op_refuses_a_projection():
    from dynabound.kernels import ops

    with pytest.raises(RuntimeError, match="projection"):
        ops.call_fused_op(step_tensors(torch.zeros(2, dtype=torch.float64)), SPEC)


def test_a_traced_step_with_a_projection_runs_outside_the_graph(monkeypatch):
    """Under torch.compile a projecting fused step is the eager step between graphs: the
    sums reach the projection (the Triton path stands in for the kernel of the device)."""
    pytest.importorskip("dynabound.kernels.triton_kernel")
    from dynabound import kernels
    from dynabound.kernels import ops

    seen = []
    monkeypatch.setattr(ops, "call_fused_op", lambda *a: seen.append("op"))
    monkeypatch.setattr(ops, "fused_step_outside_graph", lambda t, s: seen.append(t.projection))
    projection = torch.zeros(2, dtype=torch.float64)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    kernels.fused_adabound(step_tensors(projection), SPEC)
    assert seen == [projection]


# --- the script: runs in the subprocess ---------------------------------------------------


def hyper_of(options: dict) -> dict:
    """functional.adabound's keywords for an option set (AdaBound's keywords)."""
    options = dict(options)
    beta1, beta2 = options.pop("betas", (0.9, 0.999))
    hyper = dict(
        amsbound=False, lr=1e-2, final_lr=0.1, gamma=1e-3, eps=1e-8, weight_decay=0.0,
        decoupled_weight_decay=False, unscaled_decay=False, bounds="reference", box=None,
        maximize=False,
    )  # fmt: skip
    hyper.update(options, beta1=beta1, beta2=beta2)
    hyper.setdefault("base_lr", hyper["lr"])
    return hyper


def one_step(lists, seeds, projection, *, kernel, **fields):
    """One step of the CUDA kernels (on CPU tensors: the interpreter) or of the
    single-tensor reference, adding its sums to ``projection`` if given."""
    fields = dict(capturable=False, has_complex=False, **fields)
    tensors = StepTensors(*lists, seeds, projection)
    if kernel:
        dispatch.run_kernels("cuda", tensors, StepSpec(**fields))
    else:
        adabound_step(tensors, StepSpec(**fields), foreach=False, fused=False)


def compare_steps(
    params, state_dtype, hyper, *, steps=STEPS, seeds=None, scale=None, stochastic_rounding=False
):
    """Step the kernel with a projection, the kernel without, and the reference with one,
    from the same values; compare the sums and the stored bits after every step."""
    from test_triton_encoded import clone, copy_into, gradients, new_state

    amsbound = hyper["amsbound"]
    fields = dict(hyper, state_dtype=state_dtype, stochastic_rounding=stochastic_rounding)
    runs = []
    for _ in range(3):  # with a projection, without one, the reference
        copies = [p.clone() for p in params]
        state = new_state(copies, state_dtype, amsbound)
        runs.append([copies, *state, [torch.zeros(()) for _ in params]])
    projected, plain, reference = runs
    real = params[0].dtype.to_real()
    rtol = RTOL[torch.float64 if real == torch.float64 else torch.float32]
    for step in range(steps):
        grads = gradients(params, step)
        sums = [torch.zeros(2, dtype=torch.float64) for _ in range(2)]
        kernel = dict(fields, kernel=True, found_inf=None, grad_scale=None)
        if scale is not None:  # a power of two: the kernel's unscaled gradient is exact
            kernel["grad_scale"] = torch.tensor(scale)
        for run, projection in ((projected, sums[0]), (plain, None)):
            g = [x * scale if scale is not None else x.clone() for x in grads]
            one_step([run[0], g, *run[1:]], seeds, projection, **kernel)
        g = [x.clone() for x in grads]
        one_step([reference[0], g, *reference[1:]], seeds, sums[1], kernel=False, **fields)
        what = f"step {step + 1}"
        torch.testing.assert_close(sums[0], sums[1], rtol=rtol, atol=0, msg=what)
        assert sums[0][0] > 0, what  # not a sum of nothing
        stored = [[t for ts in run[:4] for t in ts] for run in runs]
        for i, (a, b) in enumerate(zip(stored[0], stored[1], strict=True)):
            assert same_bits(a, b), f"tensor {i} with and without a projection, {what}"
        assert [c.item() for c in projected[4]] == [step + 1] * len(params), what
        for a, b in zip(stored[0], stored[2], strict=True):
            copy_into(b, clone(a))


def same_bits(a, b) -> bool:
    from dynabound.state_formats import Quantized

    if isinstance(a, Quantized):
        return all(same_bits(x, y) for x, y in zip(a, b, strict=True))
    a, b = (torch.view_as_real(t) if t.is_complex() else t for t in (a, b))
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(ints), b.view(ints))


def make_params(dtypes, sizes=SIZES):
    gen = torch.Generator().manual_seed(0)
    out = []
    for dtype, shape in zip(dtypes, sizes, strict=True):
        values = torch.randn(shape, generator=gen, dtype=dtype.to_real(), device="cpu")
        if dtype.is_complex:
            values = torch.complex(values, torch.randn(shape, generator=gen).to(values.dtype))
        out.append(values.to(dtype))
    return out


def case_float(name):
    compare_steps(make_params([torch.float32] * len(SIZES)), None, hyper_of(EVERY_OPTION[name]))


def case_encoded(name):
    params = make_params([torch.float32] * len(SIZES), ENCODED_SIZES)
    compare_steps(params, "8bit", hyper_of(EVERY_OPTION[name]), seeds=[3, 1, 4, 1, 5])


def case_dtypes():
    everything = hyper_of(EVERY_OPTION["everything"])
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64]
    params = make_params(dtypes)
    compare_steps(params, None, everything)
    for dtype in (torch.float64, torch.complex128, torch.bfloat16, torch.float16):
        compare_steps(make_params([dtype] * len(SIZES)), None, hyper_of({"amsbound": True}))


def case_formats():
    options = hyper_of(dict(EVERY_OPTION["everything"], weight_decay=0.1))
    for state_dtype, dtype in ((torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                               (None, torch.bfloat16), ("8bit", torch.float16),
                               ("8bit", torch.complex64)):  # fmt: skip
        params = make_params([dtype] * len(SIZES), ENCODED_SIZES)
        compare_steps(params, state_dtype, options, seeds=[9] * 5, stochastic_rounding=True)
    decoupled = hyper_of(EVERY_OPTION["adamw_decay"])
    params = make_params([torch.bfloat16] * len(SIZES), ENCODED_SIZES)
    compare_steps(params, "8bit", decoupled, stochastic_rounding=True)


def unbounded(t):
    return 0.0 * t, math.inf + 0.0 * t  # an estimating group's first step: Adam's


def case_rescaled():
    for options in (dict(bounds=unbounded), dict(gamma=1e-40), dict(bounds=unbounded, lr=3.0)):
        hyper = hyper_of(options)
        compare_steps(make_params([torch.float32] * len(SIZES)), None, hyper)
        params = make_params([torch.bfloat16] * len(SIZES), ENCODED_SIZES)
        compare_steps(params, torch.bfloat16, hyper, stochastic_rounding=True)


def case_scaler():
    from test_triton_encoded import gradients, new_state

    from dynabound.kernels.dispatch import run_kernels
    from dynabound.spec import StepSpec, StepTensors

    hyper = hyper_of(dict(amsbound=True, weight_decay=0.1))
    for state_dtype in (None, "8bit"):
        sizes = SIZES if state_dtype is None else ENCODED_SIZES
        compare_steps(make_params([torch.float32] * len(SIZES), sizes), state_dtype, hyper,
                      scale=1024.0)  # fmt: skip
        # found_inf set: nothing is added, nothing moves.
        params = make_params([torch.float32] * len(SIZES))
        state = new_state(params, state_dtype, True)
        counters = [torch.zeros(()) for _ in params]
        projection = torch.tensor([1.5, -2.5], dtype=torch.float64)
        before = [p.clone() for p in params]
        spec = StepSpec(
            capturable=False, has_complex=False, state_dtype=state_dtype,
            stochastic_rounding=True, grad_scale=torch.tensor(2.0),
            found_inf=torch.tensor(1.0), **hyper,
        )  # fmt: skip
        tensors = StepTensors(params, gradients(params, 0), *state, counters, None, projection)
        run_kernels("cuda", tensors, spec)
        assert projection.tolist() == [1.5, -2.5], state_dtype
        assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
        assert all(c.item() == 0 for c in counters)


def case_auto():
    from dynabound import optim

    run_kernels = dispatch.run_kernels
    dispatch.run_kernels = lambda device, *a: run_kernels("cuda", *a)
    for name, (options, rtols) in AUTO_OPTIONS.items():
        got = auto_history(options, dict(fused=True))
        dispatch.run_kernels = run_kernels
        want = auto_history(options, dict(foreach=False))
        dispatch.run_kernels = lambda device, *a: run_kernels("cuda", *a)
        assert_same_history(got, want, rtols, name)
        # Each sample read at the next step, as on a GPU: the same bits.
        read_at_once, optim._read_at_once = optim._read_at_once, lambda sample: False
        assert auto_history(options, dict(fused=True)) == got, name
        optim._read_at_once = read_at_once


if __name__ == "__main__":
    outcomes = {}
    for case in sys.argv[1:]:
        name, _, argument = case.partition(":")
        function = globals()[f"case_{name}"]
        try:
            function(argument) if argument else function()
            outcomes[case] = "ok"
        except Exception:
            outcomes[case] = traceback.format_exc()[-3000:]
    print(json.dumps(outcomes))
