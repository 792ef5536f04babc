"""The fused CUDA step with low-precision state, run by Triton's interpreter on CPU tensors.

``TRITON_INTERPRET`` must be set before Triton is imported, so each test runs this file as
a script in a subprocess; the script compares the Triton kernel step by step with

* the single-tensor reference (``functional.adabound(fused=False, foreach=False)``), which
  after every step continues from the kernel's stored values, so each comparison is one
  step's rounding: float32 arithmetic ordered differently by an ulp may move a
  stochastically rounded bfloat16 value by one unit, or an 8-bit code by one step, in a
  few elements;
* the fused CPU kernel, which runs the same float32 operations in the same order (both
  without FMA contraction; the interpreter's arithmetic is NumPy's IEEE arithmetic), so
  every stored bit must agree.

Two tensors of 300 and 1000 elements: full and partial 256-element blocks, and blocks of
two tensors in one launch.
"""

from __future__ import annotations

import functools
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_required import require_tested_triton

FORMATS = {"bf16": torch.bfloat16, "8bit": "8bit", "param_sr": None}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DECAY = {
    "none": {},
    "coupled": dict(weight_decay=0.1),
    "decoupled": dict(weight_decay=0.1, decoupled_weight_decay=True),
}
SIZES = (300, 1000)
STEPS = 4
BASE = dict(
    amsbound=False, beta1=0.9, beta2=0.999, lr=1e-2, final_lr=0.1, base_lr=1e-2, gamma=1e-3,
    eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, unscaled_decay=False,
    bounds="reference", box=None, maximize=False,
)  # fmt: skip


def run_script(*cases: str) -> None:
    require_tested_triton()
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, __file__, *cases], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    for case in cases:
        assert f"ok {case}" in done.stdout


@pytest.mark.parametrize("state", FORMATS)
def test_every_combination_matches_the_reference_and_the_cpu_kernel(state):
    """amsbound x weight decay mode x parameter dtype, for one state format."""
    run_script(f"grid:{state}")


def test_keys_options_scaler_layouts_and_validation():
    """The in-kernel key and random bits against dynabound.state_formats; bounds, lr,
    decay, maximize, box, complex and mixed-dtype options; GradScaler's unscaling and
    skipped steps; channels-last and transposed parameters; a refused step."""
    run_script("keys", "options", "scaler", "layouts", "refused")


VARIANTS = {  # parameter dtype, state format, state dtypes, a vector load of full blocks
    "float32_8bit": ("fp32", 1, ("i8", "u8"), "ld.global.v4.b32"),
    "bfloat16_bf16": ("bf16", 0, ("bf16", "bf16"), "ld.global.v2.b32"),
    "float16_param": ("fp16", 2, ("fp16", "fp16"), "ld.global.v2.b32"),
}


@pytest.mark.parametrize("projection", [False, True], ids=["ordinary", "projecting"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_kernel_compiles_for_sm90_with_ieee_float32_arithmetic(variant, projection):
    """Compile (no GPU needed): catches what the interpreter accepts but the compiler does
    not; full blocks use vector accesses, float32 has no FMA contraction and no
    approximate division or square root (the CPU kernel's rounding), also in the variant
    that sums final_lr="auto"'s projection."""
    triton = require_tested_triton()
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter replaces the compiler")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dynabound.kernels import triton_encoded as te

    tl = te.tl
    dtype, state_format, (m_type, v_type), vector_load = VARIANTS[variant]
    signature = {
        "p_base": f"*{dtype}", "m_base": f"*{m_type}", "v_base": f"*{v_type}",
        "s_base": "*fp32", "offsets": "*i64", "grad_offsets": "*i64", "numels": "*i64",
        "block_tensor": "*i32", "block_start": "*i64", "steps": "*fp32",
        "step_offsets": "*i64", "seeds": "*i64", "coef": "*fp64", "hyper": "*fp64",
        "lr_hi": "fp32", "lr_lo": "fp32", "final_hi": "fp32", "final_mid": "fp32",
        "final_lo": "fp32", "lr_ptr": "*fp32", "found_inf": "*fp32",
        "grad_scale": "*fp32", "n_tensors": "i32", "partials": "*fp64",
    }  # fmt: skip
    itemsize = {"fp32": 4, "bf16": 2, "fp16": 2, "i8": 1}
    constants = dict(
        DTYPE={"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}[dtype],
        FORMAT=state_format, SCHEDULE=0, LR_TENSOR=False, AMSBOUND=True, WEIGHT_DECAY=1,
        UNSCALED_DECAY=False, MAXIMIZE=True, EPS_USED=True, HAS_BOX=True, HAS_FOUND_INF=True,
        HAS_GRAD_SCALE=True, ROUND_PARAM=dtype == "bf16", PROJECTION=projection,
        P_VEC=16 // itemsize[dtype],
        M_VEC=16 // itemsize[m_type], BLOCK=te.BLOCK,
    )  # fmt: skip
    signature.update(dict.fromkeys(constants, "constexpr"))
    source = ASTSource(
        fn=te._encoded_kernel,
        signature=signature,
        constexprs={(i,): constants[k] for i, k in enumerate(signature) if k in constants},
        attrs={(i,): [["tt.divisibility", 16]] for i in range(4)},
    )
    options = {"enable_fp_fusion": False, "num_warps": te.NUM_WARPS}
    try:
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    except RuntimeError as exc:  # no ptxas in this Triton build
        pytest.skip(f"cannot compile for CUDA here: {exc}")
    ptx = kernel.asm["ptx"]
    assert vector_load in ptx
    for approximate in ("fma.rn.f32", "div.full.f32", "div.approx.f32", "sqrt.approx.f32"):
        assert approximate not in ptx, approximate
    assert ("st.global.b64" in ptx) == projection  # the partial sums, only when asked


# --- the script: runs in the subprocess -------------------------------------------------


def new_state(params, state_dtype, amsbound):
    from dynabound import state_formats as formats

    lists = ([], [], [])
    for p in params:
        for k, moment in enumerate(formats.MOMENTS[: 3 if amsbound else 2]):
            entries = formats.new_moment(p, moment, state_dtype)
            if state_dtype == formats.EIGHT_BIT:
                value = formats.Quantized(entries[moment], entries[formats.scale_key(moment)])
            else:
                value = entries[moment]
            lists[k].append(value)
    return lists


def make_params(dtypes, sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for dtype, size in zip(dtypes, sizes, strict=True):
        shape = size if isinstance(size, tuple) else (size,)
        if dtype is torch.complex64:
            params.append(torch.randn(shape, generator=gen, dtype=torch.complex64))
        else:
            params.append(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype))
    return params


def gradients(params, step, scale=1.0):
    gen = torch.Generator().manual_seed(100 + step)
    out = []
    for p in params:
        # Magnitudes over 1e-6 .. 1e2: moments spread over many binades of a block.
        real = torch.view_as_real(p) if p.is_complex() else p
        magnitude = 10 ** (torch.rand(real.shape, generator=gen, dtype=torch.float64) * 8 - 6)
        sign = torch.where(torch.rand(real.shape, generator=gen) < 0.5, -1.0, 1.0)
        # In the parameter's memory layout, as autograd makes gradients.
        g = torch.empty_like(real).copy_(magnitude * sign * scale)
        out.append(torch.view_as_complex(g) if p.is_complex() else g)
    return out


def real(t):
    return torch.view_as_real(t) if t.is_complex() else t


def one_rounding(got, want, what):
    """``got`` within one rounding of ``want`` in their stored dtype, after float32
    arithmetic that may differ from the reference's in the operands' last bits; and
    differing from it in few elements."""
    got, want = real(got), real(want)
    if want.numel() == 0:
        return
    info = torch.finfo(want.dtype)
    scale = want.float().abs().max().item()
    atol = info.smallest_normal * info.eps + 4 * 2.0**-23 * scale
    torch.testing.assert_close(got.float(), want.float(), rtol=info.eps, atol=atol, msg=what)
    if info.bits == 16:
        differing = (got.view(torch.int16) != want.view(torch.int16)).float().mean().item()
        assert differing <= 0.01, (what, differing)


def compare_moment(got, want, what):
    from dynabound import state_formats as formats

    if isinstance(want, formats.Quantized):
        if want.codes.numel() == 0:
            return
        step = (got.codes.int() - want.codes.int()).abs()
        assert step.max().item() <= 1, what
        assert step.bool().float().mean().item() <= 0.01, what
        torch.testing.assert_close(got.scales, want.scales, rtol=4 * 2.0**-23, atol=0, msg=what)
    else:
        one_rounding(got, want, what)


def copy_into(target, source):
    from dynabound import state_formats as formats

    if isinstance(target, formats.Quantized):
        target.codes.copy_(source.codes)
        target.scales.copy_(source.scales)
    else:
        target.copy_(source)


def clone(value):
    from dynabound import state_formats as formats

    if isinstance(value, formats.Quantized):
        return formats.Quantized(value.codes.clone(), value.scales.clone())
    return value.clone()


def bits(t):
    t = real(t)
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_same_bits(got, want, what):
    from dynabound import state_formats as formats

    pairs = zip(got, want, strict=True) if isinstance(want, formats.Quantized) else [(got, want)]
    for a, b in pairs:
        assert torch.equal(bits(a), bits(b)), what


def kernel_step(device_type, *lists, rounding_seeds=None, **fields):
    """One step of the fused kernels for ``device_type`` (the CUDA kernels on CPU tensors
    run in Triton's interpreter), with the keyword arguments of functional.adabound."""
    from dynabound.kernels.dispatch import run_kernels
    from dynabound.spec import StepSpec, StepTensors

    run_kernels(device_type, StepTensors(*lists, rounding_seeds), StepSpec(**fields))


def cpu_kernel():
    """The fused CPU kernel to compare bits with; None where it cannot be built, unless it
    is required (kernel_required.py)."""
    from kernel_required import kernel_required

    from dynabound.kernels import cpu

    if cpu.is_available():
        return functools.partial(kernel_step, "cpu")
    if kernel_required():
        raise RuntimeError(f"the fused CPU kernel cannot be built: {cpu.unavailable_reason()}")
    return None


cuda_step = functools.partial(kernel_step, "cuda")


def against_reference(
    params, state_dtype, steps=STEPS, seeds=None, stochastic_rounding=True, **options
):
    """Run the Triton kernel, the reference and the fused CPU kernel side by side; compare
    after every step and continue the reference from the kernel's values."""
    from dynabound.functional import adabound

    hyper = dict(BASE, **options)
    amsbound = hyper["amsbound"]
    ref_params = [p.clone() for p in params]
    state = new_state(params, state_dtype, amsbound)
    ref_state = new_state(ref_params, state_dtype, amsbound)
    counters = [torch.zeros(()) for _ in params]
    ref_counters = [torch.zeros(()) for _ in params]
    fused_cpu = cpu_kernel()
    cpu_params = [p.clone() for p in params]
    cpu_state = new_state(cpu_params, state_dtype, amsbound)
    cpu_counters = [torch.zeros(()) for _ in params]
    encoded = dict(
        state_dtype=state_dtype, stochastic_rounding=stochastic_rounding, rounding_seeds=seeds
    )
    for step in range(steps):
        grads = gradients(params, step)
        ref_lr = hyper["lr"].clone() if isinstance(hyper["lr"], torch.Tensor) else hyper["lr"]
        cuda_step(
            params, grads, *state, counters, capturable=False, has_complex=False,
            grad_scale=None, found_inf=None, **encoded, **hyper,
        )  # fmt: skip
        adabound(
            ref_params, [g.clone() for g in grads], *ref_state, ref_counters, foreach=False,
            fused=False, **encoded, **dict(hyper, lr=ref_lr),
        )  # fmt: skip
        assert [c.item() for c in counters] == [step + 1] * len(params)
        if fused_cpu is not None:
            cpu_lr = hyper["lr"].clone() if isinstance(hyper["lr"], torch.Tensor) else hyper["lr"]
            fused_cpu(
                cpu_params, [g.clone() for g in grads], *cpu_state, cpu_counters,
                capturable=False, has_complex=False, grad_scale=None, found_inf=None,
                **encoded, **dict(hyper, lr=cpu_lr),
            )  # fmt: skip
            ours = [*params, *sum(state, [])]
            for i, (got, want) in enumerate(zip(ours, [*cpu_params, *sum(cpu_state, [])],
                                                strict=True)):  # fmt: skip
                assert_same_bits(got, want, f"tensor {i} against the CPU kernel, step {step + 1}")
        for i, (p, r) in enumerate(zip(params, ref_params, strict=True)):
            one_rounding(p, r, f"parameter {i} ({p.dtype}) after step {step + 1}")
            r.copy_(p)
        for k, (moments, ref_moments) in enumerate(zip(state, ref_state, strict=True)):
            for i, (m, r) in enumerate(zip(moments, ref_moments, strict=True)):
                compare_moment(m, r, f"moment {k} of parameter {i} after step {step + 1}")
                copy_into(r, m)
    return params, state, counters


def case_grid(name):
    state_dtype = FORMATS[name]
    for amsbound, decay, dtype in itertools.product((False, True), DECAY, DTYPES):
        dtypes = [DTYPES[dtype]] * 2
        if state_dtype is None:  # stochastic rounding alone works through a bfloat16 tensor
            dtypes[1] = torch.bfloat16
        params = make_params(dtypes, SIZES)
        against_reference(params, state_dtype, amsbound=amsbound, seeds=[7, 2**31 + 5],
                          **DECAY[decay])  # fmt: skip


def case_keys():
    from dynabound import state_formats as formats
    from dynabound.kernels import triton_encoded

    seeds = torch.tensor([0, 1, 5, 2**31 + 3, 2**32 - 1, 123456789, 42, 2**24] * 16)
    steps = torch.tensor([1.0, 2, 1000, 77, 2**24, 3, 0, 65537] * 16)  # float32 counters
    for stream in (formats.STREAM_STATE, formats.STREAM_PARAM):
        got = triton_encoded.step_keys(seeds, steps, stream).tolist()
        pairs = zip(seeds.tolist(), steps.tolist(), strict=True)
        want = [formats.step_key(s, int(t), stream) for s, t in pairs]
        assert got == want, stream
    for key in (0, 7, formats.step_key(3, 9, 0), 2**32 - 1):
        got = triton_encoded.random_bits(key, 1500, "cpu")
        assert torch.equal(got, formats.random_bits(key, 1500)), key


def case_options():
    def user_bounds(t):
        return 0.05 * (1 - 1 / (0.01 * t + 1)), 0.05 * (1 + 3 / (0.01 * t))

    sizes = (300, 40)
    cases = [
        ("8bit", [torch.float32] * 2, dict(maximize=True, box=(-1.0, 0.8), amsbound=True)),
        (torch.bfloat16, [torch.bfloat16] * 2, dict(bounds="paper", weight_decay=0.1)),
        ("8bit", [torch.float16] * 2, dict(bounds=user_bounds, amsbound=True)),
        ("8bit", [torch.float32] * 2, dict(lr=torch.tensor(3e-3), weight_decay=0.1,
                                           decoupled_weight_decay=True, unscaled_decay=True)),
        (torch.bfloat16, [torch.float32] * 2, dict(lr=0.0, base_lr=1e-2, weight_decay=0.1,
                                                   decoupled_weight_decay=True)),
        (None, [torch.bfloat16] * 2, dict(maximize=True, bounds="paper", amsbound=True)),
    ]  # fmt: skip
    for state_dtype, dtypes, options in cases:
        against_reference(make_params(dtypes, sizes), state_dtype, steps=3, **options)
    # A bfloat16 parameter rounded to nearest next to 8-bit moments.
    params = make_params([torch.bfloat16] * 2, sizes)
    against_reference(params, "8bit", steps=2, stochastic_rounding=False)
    # Mixed dtypes (a launch each) draw each parameter's seed by its place in the list;
    # complex64 is its real view; empty and 0-dim tensors.
    dtypes = [torch.float32, torch.bfloat16, torch.complex64, torch.float32, torch.float16]
    params = make_params(dtypes, [300, (5, 60), 70, 0, ()])
    against_reference(params, "8bit", steps=2, seeds=[11, 22, 33, 44, 55], amsbound=True)
    for state_dtype in (torch.bfloat16, None):
        dtypes = [torch.bfloat16, torch.complex64, torch.float32]
        against_reference(make_params(dtypes, [300, 50, 20]), state_dtype, steps=2, seeds=None)


def case_scaler():
    # GradScaler: gradients unscaled and written back; a step with found_inf set changes
    # nothing, the step counters included.
    from dynabound.functional import adabound

    for state_dtype, dtype, bounds in (
        ("8bit", torch.float32, "reference"),
        (torch.bfloat16, torch.bfloat16, lambda t: (0.01 * (1 - 1 / t), 0.01 * (1 + 1 / t))),
    ):
        hyper = dict(BASE, amsbound=True, bounds=bounds)
        encoded = dict(state_dtype=state_dtype, stochastic_rounding=True, rounding_seeds=[3, 4])
        params = make_params([dtype] * 2, (300, 40))
        ref_params = [p.clone() for p in params]
        state, ref_state = (new_state(ps, state_dtype, True) for ps in (params, ref_params))
        counters = [torch.zeros(()) for _ in params]
        ref_counters = [torch.zeros(()) for _ in params]
        scale, found = torch.tensor(1024.0), torch.tensor(0.0)
        grads = gradients(params, 0, scale=1024.0)
        cuda_step(
            params, grads, *state, counters, capturable=False, has_complex=False,
            grad_scale=scale, found_inf=found, **encoded, **hyper,
        )  # fmt: skip
        unscaled = gradients(params, 0)
        adabound(ref_params, unscaled, *ref_state, ref_counters, foreach=False, **encoded,
                 **hyper)  # fmt: skip
        for g, u in zip(grads, unscaled, strict=True):
            assert torch.equal(g, u)  # a power-of-two scale divides exactly
        for p, r in zip(params, ref_params, strict=True):
            one_rounding(p, r, "parameter after an unscaled step")
        found.fill_(1.0)
        before = [clone(x) for xs in (params, *state) for x in xs]
        cuda_step(
            params, gradients(params, 1, scale=1024.0), *state, counters, capturable=False,
            has_complex=False, grad_scale=scale, found_inf=found, **encoded, **hyper,
        )  # fmt: skip
        after = [x for xs in (params, *state) for x in xs]
        for a, b in zip(after, before, strict=True):
            pairs = zip(a, b, strict=True) if isinstance(a, tuple) else [(a, b)]
            assert all(torch.equal(x, y) for x, y in pairs)
        assert all(c.item() == 1 for c in counters)


def case_layouts():
    # Channels-last and transposed parameters: blocks and random bits follow memory order.
    gen = torch.Generator().manual_seed(9)
    params = [
        torch.randn(2, 3, 9, 9, generator=gen).to(memory_format=torch.channels_last),
        torch.randn(40, 13, generator=gen).t(),
    ]
    against_reference(params, "8bit", steps=2, amsbound=True)


def case_refused():
    # A state of the wrong format is refused before anything moves.

    params = make_params([torch.float32] * 2, (300, 40))
    state = new_state(params, torch.bfloat16, False)
    counters = [torch.zeros(()) for _ in params]
    before = [p.clone() for p in params]
    try:
        cuda_step(
            params, gradients(params, 0), *state, counters, capturable=False,
            has_complex=False, grad_scale=None, found_inf=None, state_dtype="8bit",
            stochastic_rounding=False, rounding_seeds=None, **BASE,
        )  # fmt: skip
    except RuntimeError as exc:
        assert "8-bit moments" in str(exc), exc
    else:
        raise AssertionError("8-bit step over bfloat16 moments was not refused")
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert all(c.item() == 0 for c in counters)


if __name__ == "__main__":
    for case in sys.argv[1:]:
        name, _, argument = case.partition(":")
        function = globals()[f"case_{name}"]
        function(argument) if argument else function()
        print(f"ok {case}", flush=True)
