"""The fused CPU kernel's projection sums (``StepTensors.projection``, what
``final_lr="auto"`` estimates from) against the single-tensor reference's.

Every step of these tests runs three times from the same tensors: the kernel with a
projection, the kernel without one (the update must be bit for bit the same) and the
reference with one (the sums must agree to float rounding). The optimizer builds each
step's tensors and description; a stand-in for ``optim.adabound_step`` runs the three.
"""

from __future__ import annotations

import math
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from kernel_required import require_cpu_kernel, run_on_each_isa
from option_sets import cases

from dynabound import AdaBound, functional, optim
from dynabound import state_formats as formats
from dynabound.kernels import cpu
from dynabound.spec import StepTensors

# Sizes that are not multiples of a cache line (16 floats), an 8-bit block (256) or a
# work unit (32768 elements), one larger than a unit, and a scalar.
SHAPES = [(37,), (5, 3, 2), (), (70001,), (255,), (4099,)]
STEPS = 3
# (parameter index, step) pairs without a gradient: those tensors fall a step behind, so a
# call steps tensors at different steps, with different scalars.
SKIPPED = {(1, 0), (3, 1)}
# The bounds of an estimate's first step, before it has a sample: the rate unbounded,
# which within_range rescales when given lr.
UNBOUNDED = {"unbounded": dict(bounds=lambda step: (0.0, math.inf))}

# Backend of tests/option_sets.py -> {variant: how its parameters and state are stored}.
VARIANTS = {
    "fused_cpu": {
        "float32": dict(dtype=torch.float32),
        "float64": dict(dtype=torch.float64),
        "bfloat16": dict(dtype=torch.bfloat16),
        "float16": dict(dtype=torch.float16),
        "complex64": dict(dtype=torch.complex64),
    },
    "fused_cpu_bf16_state": {
        "bf16_state": dict(dtype=torch.float32, state_dtype=torch.bfloat16),
        "bf16_rounded_params": dict(dtype=torch.bfloat16, stochastic_rounding=True),
    },
    "fused_cpu_8bit_state": {
        "8bit_state": dict(dtype=torch.float32, state_dtype="8bit"),
        "8bit_state_float16": dict(dtype=torch.float16, state_dtype="8bit"),
    },
}
FLOAT32 = VARIANTS["fused_cpu"]["float32"]
EIGHT_BIT = VARIANTS["fused_cpu_8bit_state"]["8bit_state"]
CASES = [
    pytest.param(variant, storage, case.values[1], id=f"{variant}-{case.id}", marks=case.marks)
    for backend, variants in VARIANTS.items()
    for variant, storage in variants.items()
    for case in cases(backend, UNBOUNDED)
]


@pytest.fixture(scope="module", autouse=True)
def cpu_kernel():
    require_cpu_kernel()


def make_params(dtype, shapes=SHAPES, seed=0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=gen, dtype=torch.float64)
        if dtype.is_complex:
            p = torch.complex(p, torch.randn(shape, generator=gen, dtype=torch.float64))
        params.append(torch.nn.Parameter(p.to(dtype)))
    return params


def set_grads(params, step: int) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if p.is_complex():
            g = torch.complex(g, torch.randn(p.shape, generator=gen, dtype=torch.float64))
        p.grad = None if (i, step) in SKIPPED else g.to(p.dtype)


def copy_of(t):
    if isinstance(t, formats.Quantized):
        return formats.Quantized(t.codes.clone(), t.scales.clone())
    return t.detach().clone()


def copy_tensors(tensors: StepTensors) -> StepTensors:
    lists = [[copy_of(t) for t in ts] for ts in tensors[:6]]
    return StepTensors(*lists, tensors.rounding_seeds)


def flat_tensors(tensors: StepTensors) -> list[torch.Tensor]:
    out = []
    for ts in tensors[:6]:
        for t in ts:
            out += [t.codes, t.scales] if isinstance(t, formats.Quantized) else [t.detach()]
    return out


def new_projection() -> torch.Tensor:
    return torch.zeros(2, dtype=torch.float64)


class CheckedSteps:
    """Stands in for ``optim.adabound_step``: runs each fused step with a projection, and
    the same step without one and through the reference, from copies of its tensors."""

    def __init__(self) -> None:
        self.sums: list[tuple[torch.Tensor, torch.Tensor]] = []  # (kernel, reference)
        self.identical: list[bool] = []

    def __call__(self, tensors, spec, *, foreach=None, fused=None) -> None:
        assert fused, "these tests step through the fused kernel"
        plain, reference = copy_tensors(tensors), copy_tensors(tensors)
        got, want = new_projection(), new_projection()
        functional.adabound_step(tensors._replace(projection=got), spec, fused=True)
        functional.adabound_step(plain, spec, fused=True)
        functional.adabound_step(reference._replace(projection=want), spec, foreach=False)
        self.identical.append(
            all(
                torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))
                for a, b in zip(flat_tensors(tensors), flat_tensors(plain), strict=True)
            )
        )
        self.sums.append((got, want))


def run_checked(monkeypatch, storage: dict, options: dict, shapes=SHAPES) -> CheckedSteps:
    storage, options = dict(storage), dict(options)
    lr = options.pop("lr", 1e-2)
    params = make_params(storage.pop("dtype"), shapes)
    opt = AdaBound(params, lr=lr, fused=True, **storage, **options)
    checked = CheckedSteps()
    monkeypatch.setattr(optim, "adabound_step", checked)
    for step in range(STEPS):
        set_grads(params, step)
        opt.step()
    return checked


def tolerance(storage: dict) -> dict:
    # float64 parameters are updated in float64; every other dtype in float32, whose
    # per-element Adam steps may differ from torch's by an ulp, and whose loops sum each
    # block's products in float32 before float64 (cpu_kernel.cpp, LaneSums): about 2e-8
    # off the reference for float32 storage.
    if storage["dtype"] is torch.float64:
        return dict(rtol=1e-12, atol=0.0)
    encoded = "state_dtype" in storage or storage.get("stochastic_rounding", False)
    return dict(rtol=1e-5 if encoded else 1e-6, atol=0.0)


@pytest.mark.parametrize(("variant", "storage", "options"), CASES)
def test_projection_matches_the_reference(monkeypatch, variant, storage, options):
    checked = run_checked(monkeypatch, storage, options)
    assert len(checked.sums) == STEPS
    assert all(checked.identical), "a projection changed the update"
    for got, want in checked.sums:
        assert want[0] > 0, "a step that moves nothing tests nothing"
        torch.testing.assert_close(got, want, **tolerance(storage))


def test_sums_of_many_work_units_add_in_a_fixed_order(monkeypatch):
    """Small work units, many per tensor and tensors sharing one: the same sums as with
    one thread, bit for bit, and the reference's to rounding."""
    monkeypatch.setattr(cpu, "_CHUNK", 1000)
    threads = torch.get_num_threads()
    runs = {}
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            for storage in (FLOAT32, EIGHT_BIT):
                with monkeypatch.context() as patch:
                    checked = run_checked(patch, storage, {"amsbound": True})
                runs[count, storage.get("state_dtype")] = checked.sums
    finally:
        torch.set_num_threads(threads)
    for state_dtype in (None, "8bit"):
        one, two = runs[1, state_dtype], runs[2, state_dtype]
        for (a, want), (b, _) in zip(one, two, strict=True):
            assert a.tolist() == b.tolist()
            torch.testing.assert_close(a, want, rtol=1e-5, atol=0.0)


def test_a_skipped_step_adds_nothing_and_grad_scale_is_undone(monkeypatch):
    """found_inf set: nothing moves and the sums stay as they were; grad_scale: the sums of
    the unscaled gradients (a power of two divides exactly, so bit for bit)."""
    captured = []
    monkeypatch.setattr(optim, "adabound_step", lambda t, s, **how: captured.append((t, s)))
    for storage in (FLOAT32, EIGHT_BIT):
        captured.clear()
        storage = dict(storage)
        params = make_params(storage.pop("dtype"))
        set_grads(params, 0)
        AdaBound(params, lr=1e-2, fused=True, weight_decay=0.1, **storage).step()
        ((tensors, spec),) = captured
        before = [t.clone() for t in flat_tensors(tensors)]
        skipped = new_projection().fill_(0.5)
        skip = spec._replace(grad_scale=torch.tensor(1024.0), found_inf=torch.ones(()))
        functional.adabound_step(tensors._replace(projection=skipped), skip, fused=True)
        assert skipped.tolist() == [0.5, 0.5]
        for a, b in zip(flat_tensors(tensors), before, strict=True):
            assert torch.equal(a, b)

        unscaled, scaled = copy_tensors(tensors), copy_tensors(tensors)
        for g in scaled.grads:
            g.mul_(1024.0)
        want, got = new_projection(), new_projection()
        functional.adabound_step(unscaled._replace(projection=want), spec, fused=True)
        scale = spec._replace(grad_scale=torch.tensor(1024.0), found_inf=torch.zeros(()))
        functional.adabound_step(scaled._replace(projection=got), scale, fused=True)
        assert got.tolist() == want.tolist() and want[0] > 0
        for a, b in zip(scaled.grads, unscaled.grads, strict=True):
            assert torch.equal(a, b)  # left unscaled, as torch's fused Adam leaves them


def test_a_projection_of_the_wrong_kind_is_refused(monkeypatch):
    captured = []
    monkeypatch.setattr(optim, "adabound_step", lambda t, s, **how: captured.append((t, s)))
    params = make_params(torch.float32, [(4,)])
    set_grads(params, 0)
    AdaBound(params, fused=True).step()
    ((tensors, spec),) = captured
    for wrong in (torch.zeros(2), torch.zeros(3, dtype=torch.float64)):
        with pytest.raises(RuntimeError, match="contiguous float64 CPU tensor of shape"):
            functional.adabound_step(tensors._replace(projection=wrong), spec, fused=True)
    assert tensors.state_steps[0].item() == 0  # refused before anything moved


# The projection sums of every storage format, option and vector copy of the loops: one
# JSON line of their exact values (hex) per run.
_ISA_SCRIPT = textwrap.dedent(
    """
    import json, torch
    from dynabound import AdaBound, functional, optim
    from dynabound.kernels import cpu

    results = {}
    step_with = functional.adabound_step
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for state_dtype in (None, torch.bfloat16, "8bit"):
            if dtype == torch.float64 and state_dtype is not None:
                continue
            for options in ({}, {"amsbound": True, "weight_decay": 0.1, "maximize": True}):
                sums = []

                def step(tensors, spec, **how):
                    projection = torch.zeros(2, dtype=torch.float64)
                    step_with(tensors._replace(projection=projection), spec, **how)
                    sums.append([x.hex() for x in projection.tolist()])

                optim.adabound_step = step
                gen = torch.Generator().manual_seed(0)
                params = [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype))
                          for n in (1, 37, 255, 300, 4099)]
                opt = AdaBound(params, lr=1e-2, fused=True, state_dtype=state_dtype,
                               stochastic_rounding=dtype == torch.bfloat16, **options)
                for _ in range(3):
                    for p in params:
                        p.grad = torch.randn(p.shape, generator=gen).to(dtype)
                    opt.step()
                results[f"{dtype} {state_dtype} {sorted(options)}"] = sums
    print(json.dumps({"isa": cpu.vector_isa(), "sums": results}))
    """
)


@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or shutil.which("objdump") is None,
    reason="reads x86-64 machine code with objdump",
)
def test_every_copy_of_the_estimating_loops_is_vectorised():
    """A loop GCC leaves scalar computes the same bits, only several times slower, so no
    other test sees it: the estimating loops of the AVX2 and portable copies once were."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_vectorisation.py"
    run = subprocess.run(
        [sys.executable, str(script), "--scalar"], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_vector_copy_of_the_loops_adds_the_same_sums():
    """The generic, AVX2 and AVX-512 copies (the hand-written 8-bit loop among them, where
    the CPU runs it) add the same float64 numbers in the same order."""
    results = run_on_each_isa(_ISA_SCRIPT)
    assert results["generic"]["isa"] == "generic"
    assert len(results["generic"]["sums"]) == 2 * (3 * 3 + 1)
    for cap in ("avx2", "best"):
        assert results[cap]["sums"] == results["generic"]["sums"], (
            f"{results[cap]['isa']} adds other sums than the generic loops"
        )


# ---------------------------------------------------------------- final_lr="auto"


def train_auto(steps: int, compiled: bool = False, **options) -> tuple[AdaBound, list]:
    """A small regression model (one weight larger than a work unit) trained with
    final_lr="auto"; returns the optimizer and the parameters."""
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(300, 128), torch.nn.Tanh(), torch.nn.Linear(128, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    x = torch.randn(64, 300, generator=gen)
    y = torch.randn(64, 1, generator=gen)
    opt = AdaBound(model.parameters(), lr=1e-3, final_lr="auto", **options)
    step = torch.compile(opt.step, backend="eager") if compiled else opt.step
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        step()
    return opt, list(model.parameters())


def assert_same_history(got: list, want: list) -> None:
    assert [row[0] for row in got] == [row[0] for row in want]
    for column in (1, 2):
        a = torch.tensor([row[column] for row in got], dtype=torch.float64)
        b = torch.tensor([row[column] for row in want], dtype=torch.float64)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0.0, equal_nan=True)


@pytest.mark.parametrize(
    "options",
    [{}, dict(amsbound=True, weight_decay=1e-2, decoupled_weight_decay=True)],
    ids=["adabound", "amsbound_decoupled"],
)
def test_auto_final_lr_estimates_as_the_reference_does(monkeypatch, options):
    projected = []
    float_step = cpu.float_step

    def counting_step(tensors, spec):
        projected.append(tensors.projection is not None)
        float_step(tensors, spec)

    monkeypatch.setattr(cpu, "float_step", counting_step)
    fused, fused_params = train_auto(50, fused=True, **options)
    assert projected == [True] * 50, "the estimating steps did not run the fused kernel"
    ref, ref_params = train_auto(50, foreach=False, **options)
    got = fused.param_groups[0]["final_lr_auto"]
    want = ref.param_groups[0]["final_lr_auto"]
    assert len(want["history"]) == 50 and want["samples"] > 40  # the estimate is fed
    assert_same_history(got["history"], want["history"])
    for p, q in zip(fused_params, ref_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_auto_final_lr_under_torch_compile():
    """A compiled step estimates as an eager one: the estimating step runs between graphs."""
    torch._dynamo.reset()
    compiled, _ = train_auto(6, compiled=True, fused=True)
    eager, _ = train_auto(6, fused=True)
    history = compiled.param_groups[0]["final_lr_auto"]["history"]
    assert len(history) == 6 and not math.isnan(history[-1][1])
    assert_same_history(history, eager.param_groups[0]["final_lr_auto"]["history"])


def test_a_compiled_fused_step_with_a_projection_adds_its_sums(monkeypatch):
    """The custom op has no projection argument: a traced fused step with one runs outside
    the graph, and the op itself refuses one rather than leave the sums at zero."""
    captured = []
    monkeypatch.setattr(optim, "adabound_step", lambda t, s, **how: captured.append((t, s)))
    params = make_params(torch.float32)
    set_grads(params, 0)
    AdaBound(params, lr=1e-2, fused=True).step()
    ((tensors, spec),) = captured
    eager, traced = copy_tensors(tensors), copy_tensors(tensors)
    want, got = new_projection(), new_projection()
    functional.adabound_step(eager._replace(projection=want), spec, fused=True)

    torch._dynamo.reset()

    @torch.compile(backend="eager")
    def compiled_step():
        functional.adabound_step(traced._replace(projection=got), spec, fused=True)

    compiled_step()
    assert got.tolist() == want.tolist() and want[0] > 0

    from dynabound.kernels import ops

    with pytest.raises(RuntimeError, match="cannot add projection sums"):
        ops.call_fused_op(tensors._replace(projection=new_projection()), spec)
