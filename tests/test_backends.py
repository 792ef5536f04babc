"""The registry of backends and option sets (tests/option_sets.py), and the parity tests of
the backends that have no test file of their own: the compiled step, and the Triton kernels
in Triton's interpreter.

Each backend's parity test takes its cases from ``option_sets.cases``, so an option set a
backend does not implement fails by name there; the test here checks that the option sets
vary every field of a step, so that a new field reaches every backend's parity test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from kernel_required import require_tested_triton
from option_sets import BACKENDS, EVERY_OPTION, cases

from dynabound import AdaBound, kernels, optim
from dynabound.spec import StepSpec

TESTS = Path(__file__).resolve().parent

# StepSpec fields that say how a step runs rather than what it computes, and the tests
# that vary them (each parity test of a *_state backend varies state_dtype).
HOW_IT_RUNS = {
    "capturable": "test_conventions.py::test_capturable_matches_non_capturable",
    "differentiable": "test_conventions.py::test_differentiable_step_gradcheck",
    "has_complex": "test_conventions.py::test_complex_equals_view_as_real",
    "grad_scale": "test_fused.py::test_grad_scaler_unscales_and_skips_inf_steps",
    "found_inf": "test_fused.py::test_grad_scaler_unscales_and_skips_inf_steps",
    "state_dtype": "test_state_formats.py::test_fused_cpu_kernel_matches_the_reference",
    "stochastic_rounding": "test_state_formats.py::"
    "test_stochastic_rounding_of_bfloat16_parameters_keeps_small_updates",
}


def spec_of(options: dict, monkeypatch) -> StepSpec:
    """The StepSpec the optimizer builds for these constructor options."""
    seen: list[StepSpec] = []
    monkeypatch.setattr(optim, "adabound_step", lambda tensors, spec, **how: seen.append(spec))
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    AdaBound([p], foreach=True, **options).step()
    return seen[0]


def test_the_option_sets_vary_every_field_of_a_step(monkeypatch):
    default = spec_of({}, monkeypatch)
    varied = {
        name
        for options in EVERY_OPTION.values()
        for name, value in spec_of(options, monkeypatch)._asdict().items()
        if value != getattr(default, name)
    }
    missing = sorted(set(StepSpec._fields) - varied - set(HOW_IT_RUNS))
    assert not missing, f"no option set in tests/option_sets.py varies {missing}"


@pytest.mark.parametrize("where", sorted(set(HOW_IT_RUNS.values())))
def test_the_tests_named_for_the_other_fields_exist(where):
    path, name = where.split("::")
    assert re.search(rf"^def {name}\(", (TESTS / path).read_text(), re.M), where


def test_every_declared_gap_names_an_option_set_and_a_reason():
    for backend, gaps in BACKENDS.items():
        for name, reason in gaps.items():
            assert name in EVERY_OPTION and reason, (backend, name)


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(37,), (5, 3, 2), (), (300,)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def set_grads(params, twins, step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p, q in zip(params, twins, strict=True):
        p.grad = torch.randn(p.shape, generator=gen)
        q.grad = p.grad.clone()


@pytest.mark.parametrize(("name", "options"), cases("compiled"))
def test_compiled_step_matches_single_tensor(name, options):
    """torch.compile(step): the fused kernel as the custom op (a bound function between
    graphs), against the eager single-tensor path."""
    if not kernels.is_available("cpu"):
        pytest.skip(f"CPU kernel unavailable: {kernels.unavailable_reason('cpu')}")
    torch._dynamo.reset()
    options = {"lr": 1e-2, **options}
    params, twins = make_params(), make_params()
    opt = AdaBound(params, **options)
    ref = AdaBound(twins, foreach=False, **options)
    compiled = torch.compile(opt.step, backend="eager")
    for step in range(3):
        set_grads(params, twins, step)
        compiled()
        ref.step()
    for p, q in zip(params, twins, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
        for key, value in ref.state[q].items():
            torch.testing.assert_close(opt.state[p][key], value, rtol=1e-6, atol=1e-6)


# Every option set through AdaBound(fused=True) with the CUDA kernels' host side and
# Triton's interpreter standing in for the device (CPU tensors routed to them): the float
# kernel against the single-tensor path, the 8-bit kernel against the fused CPU kernel,
# whose float32 operations it repeats, so bit for bit. Prints one JSON line of results.
_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import json, sys, traceback
    import torch
    from option_sets import EVERY_OPTION
    from dynabound import AdaBound, kernels
    from dynabound.kernels import dispatch, triton_kernel

    triton_kernel.CHUNK = 2 * triton_kernel.BLOCK  # several blocks per tensor, quickly
    run_kernels = dispatch.run_kernels

    def run(options, state_dtype, through_triton, reference=False):
        dispatch.run_kernels = (
            (lambda device, *a: run_kernels("cuda", *a)) if through_triton else run_kernels
        )
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen))
                  for s in [(3000,), (33, 7), (), (0,)]]
        how = dict(foreach=False) if reference else dict(fused=True)
        opt = AdaBound(params, **{"lr": 1e-2, **options}, state_dtype=state_dtype, **how)
        for step in range(3):
            gen = torch.Generator().manual_seed(100 + step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return [t for p in params for t in (p.detach(), *opt.state[p].values())]

    results = {}
    backend = sys.argv[1]
    for name, options in EVERY_OPTION.items():
        try:
            if backend == "triton":
                got, want = run(options, None, True), run(options, None, False, True)
                for a, b in zip(got, want, strict=True):
                    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
            else:
                if not kernels.is_available("cpu"):
                    raise RuntimeError(kernels.unavailable_reason("cpu"))
                got, want = run(options, "8bit", True), run(options, "8bit", False)
                for a, b in zip(got, want, strict=True):
                    assert torch.equal(a, b), "differs from the fused CPU kernel"
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()[-2000:]
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def interpreter_results():
    require_tested_triton()
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    path = [str(TESTS.parent / "src"), str(TESTS), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, path))
    results = {}
    for backend in ("triton", "triton_8bit_state"):
        done = subprocess.run(
            [sys.executable, "-c", _INTERPRETER_SCRIPT, backend],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        results[backend] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


@pytest.mark.parametrize(("name", "options"), cases("triton"))
def test_triton_kernel_matches_single_tensor(interpreter_results, name, options):
    result = interpreter_results["triton"][name]
    assert result == "ok", result


@pytest.mark.parametrize(("name", "options"), cases("triton_8bit_state"))
def test_triton_8bit_kernel_matches_the_cpu_kernel(interpreter_results, name, options):
    result = interpreter_results["triton_8bit_state"][name]
    assert result == "ok", result
