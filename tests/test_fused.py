"""The fused kernels against the single-tensor reference path.

The CPU kernel is built once per session (cached by torch's extension cache afterwards).
The Triton kernel runs through Triton's CPU interpreter in a subprocess, since
``TRITON_INTERPRET`` must be set before Triton is imported.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from kernel_required import require_cpu_kernel, require_tested_triton, run_on_each_isa
from option_sets import EVERY_OPTION, cases
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dynabound import AdaBound, kernels
from dynabound.kernels import cpu

SHAPES = [(37,), (5, 3, 2), (), (0,), (2, 0, 3), (70001,), (64, 3, 3, 3)]
STEPS = 5
CONFIGS = EVERY_OPTION


@pytest.fixture(scope="module", autouse=True)
def cpu_kernel():
    require_cpu_kernel()


def make_params(dtype=torch.float32, shapes=SHAPES, seed=0, complex_=False):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        p = torch.randn(shape, generator=gen, dtype=torch.float64)
        if complex_:
            p = torch.complex(p, torch.randn(shape, generator=gen, dtype=torch.float64))
            dtype = torch.complex64
        out.append(torch.nn.Parameter(p.to(dtype)))
    return out


def set_grads(params, step, skip=()):
    gen = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if p.is_complex():
            g = torch.complex(g, torch.randn(p.shape, generator=gen, dtype=torch.float64))
        p.grad = None if (i, step) in skip else g.to(p.dtype)


def train(params, steps=STEPS, skip=(), lr=1e-2, **options):
    opt = AdaBound(params, **{"lr": lr, "final_lr": 0.1, **options})
    for step in range(steps):
        set_grads(params, step, skip)
        opt.step()
    return opt


def assert_same(fused_opt, ref_opt, **tol):
    for group_f, group_r in zip(fused_opt.param_groups, ref_opt.param_groups, strict=True):
        for pf, pr in zip(group_f["params"], group_r["params"], strict=True):
            torch.testing.assert_close(pf.detach().to(pr.dtype), pr.detach(), **tol)
            sf, sr = fused_opt.state[pf], ref_opt.state[pr]
            assert sf.keys() == sr.keys()
            for key in sr:
                torch.testing.assert_close(sf[key].to(sr[key].dtype), sr[key], **tol)


TIGHT = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float64: dict(rtol=1e-13, atol=1e-13)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("name", "options"), cases("fused_cpu"))
def test_fused_matches_single_tensor(name, options, dtype):
    options = dict(options)
    lr = options.pop("lr", 1e-2)
    fused = train(make_params(dtype), lr=lr, fused=True, **options)
    ref = train(make_params(dtype), lr=lr, foreach=False, **options)
    assert_same(fused, ref, **TIGHT[dtype])
    assert all(s["step"].item() == STEPS for s in fused.state.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["default", "everything", "adamw_decay"])
def test_low_precision_computes_in_float32(name, dtype):
    """bf16/fp16 storage, fp32 math: matches the fp32 reference run on upcast copies."""
    options = dict(CONFIGS[name])
    fused_params = make_params(dtype)
    ref_params = [torch.nn.Parameter(p.detach().float()) for p in fused_params]
    fused = AdaBound(fused_params, lr=1e-2, fused=True, **options)
    ref = AdaBound(ref_params, lr=1e-2, foreach=False, **options)
    # One rounding of each stored value (the fp32 reference keeps full precision).
    tol = dict(rtol=1.6e-2, atol=1e-5) if dtype == torch.bfloat16 else dict(rtol=1e-3, atol=1e-5)
    for step in range(3):
        set_grads(fused_params, step)
        for pf, pr in zip(fused_params, ref_params, strict=True):
            pr.grad = pf.grad.float()
        fused.step()
        ref.step()
        # The reference continues from the rounded values the fused step stored.
        with torch.no_grad():
            for pf, pr in zip(fused_params, ref_params, strict=True):
                for key, value in ref.state[pr].items():
                    if key != "step":
                        torch.testing.assert_close(fused.state[pf][key].float(), value, **tol)
                        value.copy_(fused.state[pf][key])
                torch.testing.assert_close(pf.float(), pr, **tol)
                pr.copy_(pf)


def test_tensor_lr_and_per_parameter_steps():
    """Parameters that skip gradients fall behind: each tensor uses its own step."""
    skip = {(0, 1), (0, 2), (3, 0), (5, 3), (1, 0), (1, 4)}
    lr = torch.tensor(2e-2)
    fused = train(make_params(), skip=skip, lr=lr, fused=True, base_lr=1e-2, amsbound=True)
    ref = train(make_params(), skip=skip, lr=lr.clone(), foreach=False, base_lr=1e-2, amsbound=True)
    assert_same(fused, ref, **TIGHT[torch.float32])
    steps = sorted({s["step"].item() for s in fused.state.values()})
    assert steps == [3.0, 4.0, 5.0]


@pytest.mark.parametrize("name", ["default", "everything"])
def test_complex_parameters(name):
    shapes = [(9,), (4, 3), ()]
    fused = train(make_params(shapes=shapes, complex_=True), fused=True, **CONFIGS[name])
    ref = train(make_params(shapes=shapes, complex_=True), foreach=False, **CONFIGS[name])
    assert_same(fused, ref, **TIGHT[torch.float32])


def test_mixed_dtypes_and_layouts():
    """One group with fp32, fp64 and channels-last parameters, and a gradient whose layout
    differs from its parameter's (the kernel reads a copy)."""

    def build():
        params = make_params(torch.float32, [(8, 4, 3, 3), (33,)]) + make_params(
            torch.float64, [(5, 7)]
        )
        params[0].data = params[0].data.to(memory_format=torch.channels_last)
        return params

    def train_odd(params, **options):
        opt = AdaBound(params, lr=1e-2, **options)
        for step in range(3):
            set_grads(params, step)
            params[2].grad = params[2].grad.t().contiguous().t()  # column-major gradient
            opt.step()
        return opt

    fused_params = build()
    fused = train_odd(fused_params, fused=True, amsbound=True)
    ref = train_odd(build(), foreach=False, amsbound=True)
    assert fused.state[fused_params[0]]["exp_avg"].is_contiguous(memory_format=torch.channels_last)
    for pf, pr in zip(fused.param_groups[0]["params"], ref.param_groups[0]["params"], strict=True):
        torch.testing.assert_close(pf, pr, **TIGHT[pf.dtype])


def test_thread_count_does_not_change_results():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = train(make_params(), fused=True, amsbound=True)
        torch.set_num_threads(2)
        two = train(make_params(), fused=True, amsbound=True)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one.param_groups[0]["params"], two.param_groups[0]["params"], strict=True):
        assert torch.equal(a, b)


def test_grad_scaler_unscales_and_skips_inf_steps():
    """GradScaler hands grad_scale/found_inf to the fused step (like torch's fused Adam):
    gradients are unscaled in place, and an inf step changes nothing, not even `step`."""
    torch.manual_seed(0)
    model_f = torch.nn.Linear(6, 3)
    model_r = torch.nn.Linear(6, 3)
    model_r.load_state_dict(model_f.state_dict())
    opt_f = AdaBound(model_f.parameters(), lr=1e-2, fused=True, weight_decay=0.01)
    opt_r = AdaBound(model_r.parameters(), lr=1e-2, foreach=False, weight_decay=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    x = torch.randn(16, 6)
    for step in range(4):
        opt_f.zero_grad()
        opt_r.zero_grad()
        scaler.scale(model_f(x).square().mean()).backward()
        model_r(x).square().mean().backward()
        if step == 2:
            model_f.weight.grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in model_f.parameters()]
        scaler.step(opt_f)
        scaler.update()
        if step == 2:
            assert scaler.get_scale() == 512.0
            for p, b in zip(model_f.parameters(), before, strict=True):
                assert torch.equal(p, b)
            assert all(s["step"].item() == 2 for s in opt_f.state.values())
            continue
        opt_r.step()
        torch.testing.assert_close(model_f.weight.grad, model_r.weight.grad)
    assert all(s["step"].item() == 3 for s in opt_f.state.values())
    for pf, pr in zip(model_f.parameters(), model_r.parameters(), strict=True):
        torch.testing.assert_close(pf, pr, rtol=1e-6, atol=1e-6)


class _NewStorage(TorchDispatchMode):
    """Largest tensor storage created by any torch op while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = tree_leaves((args, kwargs))
        inputs = {t.untyped_storage().data_ptr() for t in leaves if torch.is_tensor(t)}
        for t in tree_leaves(out):
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("options", [{}, dict(amsbound=True, weight_decay=0.1, maximize=True)])
def test_fused_step_allocates_nothing_proportional_to_parameters(options):
    params = make_params(shapes=[(300, 300), (1000,), ()])
    opt = train(params, steps=1, fused=True, **options)  # the first step allocates the state
    set_grads(params, 1)
    with _NewStorage() as probe:
        opt.step()
    assert probe.largest < 1024, probe.largest
    ref = train(make_params(shapes=[(300, 300), (1000,), ()]), steps=1, foreach=False, **options)
    set_grads(ref.param_groups[0]["params"], 1)
    with _NewStorage() as probe:
        ref.step()
    assert probe.largest >= 300 * 300 * 4  # the probe does see the reference's temporaries


def test_version_counters_are_bumped():
    params = make_params(shapes=[(4,)])
    opt = train(params, steps=1, fused=True)
    before = params[0]._version
    set_grads(params, 1)
    opt.step()
    assert params[0]._version > before


def test_dtensor_parameters_update_their_local_shards(tmp_path):
    """FSDP2/tensor-parallel parameters are DTensors, which own no storage: the kernel must
    update the local shards (here a one-process mesh) instead of reading data_ptr() == 0.

    The process group lives in a fresh process: in a test worker that has already forked
    (torch.compile's compile workers), torch 2.4's gloo group can hang forever in its
    destructor, joining a thread that never returns."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    child = multiprocessing.get_context("spawn").Process(
        target=_update_dtensor_shards, args=(str(tmp_path / "store"),)
    )
    child.start()
    child.join(timeout=300)
    if child.is_alive():
        child.kill()
        pytest.fail("the DTensor step did not finish within 300 s")
    assert child.exitcode == 0, "the DTensor step failed in its process (its error is above)"


def _update_dtensor_shards(store: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.tensor import Shard, distribute_tensor
    except ImportError:  # torch 2.4: not public yet
        from torch.distributed._tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    plain = make_params(shapes=[(6, 4), (5,)])
    sharded = [
        torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)])) for p in plain
    ]
    fused = AdaBound(sharded, lr=1e-2, fused=True, amsbound=True, weight_decay=0.1)
    ref = AdaBound(plain, lr=1e-2, foreach=False, amsbound=True, weight_decay=0.1)
    for step in range(3):
        set_grads(plain, step)
        for d, p in zip(sharded, plain, strict=True):
            d.grad = distribute_tensor(p.grad.clone(), mesh, [Shard(0)])
        fused.step()
        ref.step()
    for d, p in zip(sharded, plain, strict=True):
        torch.testing.assert_close(d.full_tensor(), p.detach(), **TIGHT[torch.float32])
    dist.destroy_process_group()


def test_fused_step_inside_torch_compile():
    """The kernel is opaque to tracing: the compiled function runs it eagerly (no error)."""
    fused_params = make_params(shapes=[(8, 4), (4,)])
    ref_params = make_params(shapes=[(8, 4), (4,)])
    fused = AdaBound(fused_params, lr=1e-2, fused=True)
    ref = AdaBound(ref_params, lr=1e-2, foreach=False)
    compiled_step = torch.compile(fused.step)
    for step in range(3):
        set_grads(fused_params, step)
        set_grads(ref_params, step)
        compiled_step()
        ref.step()
    for pf, pr in zip(fused_params, ref_params, strict=True):
        torch.testing.assert_close(pf, pr, **TIGHT[torch.float32])


def test_rejects_parameters_it_cannot_walk_as_flat_arrays():
    p = torch.nn.Parameter(torch.randn(6, 8)[:, ::2])
    opt = AdaBound([p], fused=True)
    p.grad = torch.randn_like(p)
    with pytest.raises(RuntimeError, match="dense memory layout"):
        opt.step()


def test_can_fuse_says_whether_fused_would_run(monkeypatch):
    ok = [
        torch.zeros(3),
        torch.zeros(2, 2, dtype=torch.complex64),
        torch.zeros(4, 3, 2, 2).to(memory_format=torch.channels_last),
        torch.zeros((), dtype=torch.bfloat16),
    ]
    assert kernels.can_fuse(ok)
    assert not kernels.can_fuse(ok + [torch.zeros(6, 8)[:, ::2]])
    assert not kernels.can_fuse(ok + [torch.zeros(2, dtype=torch.float8_e4m3fn)])
    assert not kernels.can_fuse(ok + [torch.zeros(2, dtype=torch.int64)])
    assert kernels.can_fuse(ok + [torch.zeros(2, dtype=torch.complex128)])
    assert kernels.can_fuse([])
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_error", "RuntimeError: no C++ compiler")
    monkeypatch.setattr(kernels, "_fusable_by_type", {})  # what a fresh process knows
    assert not kernels.can_fuse(ok)


def test_unavailable_kernel_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_error", "RuntimeError: no C++ compiler")
    assert not kernels.is_available("cpu")
    assert "no C++ compiler" in kernels.unavailable_reason("cpu")
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="fused CPU kernel is unavailable.*no C\\+\\+ compiler"):
        AdaBound([p], fused=True).step()
    assert torch.equal(p, torch.ones(3))


TRITON_SCRIPT = textwrap.dedent(
    """
    import torch
    from dynabound.functional import adabound
    from dynabound.kernels import triton_kernel
    from dynabound.kernels.dispatch import run_kernels
    from dynabound.spec import StepSpec, StepTensors

    def cuda_step(*lists, **fields):  # the CUDA kernels on CPU tensors: the interpreter
        run_kernels("cuda", StepTensors(*lists), StepSpec(**fields))

    # Small chunks keep the interpreter quick while tensors still span several blocks.
    triton_kernel.CHUNK = 2 * triton_kernel.BLOCK

    def tensors(dtype, amsbound, seed=0):
        gen = torch.Generator().manual_seed(seed)
        shapes = [(3000,), (33, 7), (), (0,), (2500,)]
        p = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
        m = [torch.zeros_like(x) for x in p]
        v = [torch.zeros_like(x) for x in p]
        vmax = [torch.zeros_like(x) for x in p] if amsbound else []
        return p, m, v, vmax, [torch.zeros(()) for _ in p]

    def grads(params, step):
        gen = torch.Generator().manual_seed(100 + step)
        return [torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype)
                for x in params]

    base = dict(amsbound=False, beta1=0.9, beta2=0.999, lr=1e-2, final_lr=0.1, base_lr=1e-2,
                gamma=1e-3, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
                unscaled_decay=False, bounds="reference", box=None, maximize=False)
    cases = [
        (torch.float32, {}),
        (torch.float32, dict(amsbound=True, weight_decay=0.1, maximize=True)),
        (torch.float32, dict(weight_decay=0.1, decoupled_weight_decay=True, box=(-0.5, 0.5),
                             bounds="paper", lr=torch.tensor(2e-2))),
        (torch.float64, dict(amsbound=True, weight_decay=0.1, decoupled_weight_decay=True,
                             unscaled_decay=True)),
    ]
    for dtype, options in cases:
        hyper = dict(base, **options)
        p, m, v, vmax, steps = tensors(dtype, hyper["amsbound"])
        rp, rm, rv, rvmax, rsteps = tensors(dtype, hyper["amsbound"])
        for step in range(2):
            g = grads(p, step)
            cuda_step(p, g, m, v, vmax, steps, capturable=False, has_complex=False,
                                  grad_scale=None, found_inf=None, **hyper)
            adabound(rp, grads(p, step), rm, rv, rvmax, rsteps, foreach=False, **hyper)
        tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-13)
        for a, b in zip(p + m + v + vmax, rp + rm + rv + rvmax):
            torch.testing.assert_close(a, b, **tol)
        assert all(s.item() == 2 for s in steps)

    # bf16 storage, fp32 math: one rounding of each stored value from the fp32 reference.
    hyper = dict(base, amsbound=True, weight_decay=0.1)
    p, m, v, vmax, steps = tensors(torch.bfloat16, True)
    rp, rm, rv, rvmax, rsteps = (
        [x.float() for x in xs] for xs in tensors(torch.bfloat16, True)
    )
    g = grads(p, 0)
    cuda_step(p, g, m, v, vmax, steps, capturable=False, has_complex=False,
                          grad_scale=None, found_inf=None, **hyper)
    adabound(rp, [x.float() for x in g], rm, rv, rvmax, rsteps, foreach=False, **hyper)
    for a, b in zip(p + m + v + vmax, rp + rm + rv + rvmax):
        torch.testing.assert_close(a.float(), b, rtol=1.6e-2, atol=1e-5)

    # Complex parameters: real and imaginary parts are separate coordinates.
    gen = torch.Generator().manual_seed(5)
    shapes = [(40,), (3, 5), ()]
    def cplx():
        return [torch.randn(s, generator=gen, dtype=torch.complex64) for s in shapes]
    p, g1, g2 = cplx(), cplx(), cplx()
    rp = [x.clone() for x in p]
    state = [[torch.zeros_like(x) for x in p] for _ in range(4)]
    rstate = [[torch.zeros_like(x) for x in p] for _ in range(4)]
    steps, rsteps = [torch.zeros(()) for _ in p], [torch.zeros(()) for _ in p]
    hyper = dict(base, amsbound=True, weight_decay=0.1)
    for g in (g1, g2):
        cuda_step(p, g, *state[:3], steps, capturable=False, has_complex=True,
                              grad_scale=None, found_inf=None, **hyper)
        adabound(rp, g, *rstate[:3], rsteps, foreach=False, has_complex=True, **hyper)
    for a, b in zip(p + state[0], rp + rstate[0]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)

    # grad_scale / found_inf: unscale in place; an inf step changes nothing, steps included.
    hyper = dict(base, amsbound=True)
    p, m, v, vmax, steps = tensors(torch.float32, True)
    rp, rm, rv, rvmax, rsteps = tensors(torch.float32, True)
    scale, found = torch.tensor(8.0), torch.tensor(0.0)
    g = [x * 8 for x in grads(p, 0)]
    cuda_step(p, g, m, v, vmax, steps, capturable=True, has_complex=False,
                          grad_scale=scale, found_inf=found, **hyper)
    adabound(rp, grads(p, 0), rm, rv, rvmax, rsteps, foreach=False, **hyper)
    for a, b in zip(g, grads(p, 0)):
        torch.testing.assert_close(a, b)
    found.fill_(1.0)
    before = [x.clone() for x in p + m + v + vmax]
    cuda_step(p, [x * 8 for x in grads(p, 1)], m, v, vmax, steps, capturable=True,
                          has_complex=False, grad_scale=scale, found_inf=found, **hyper)
    assert all(torch.equal(a, b) for a, b in zip(p + m + v + vmax, before))
    assert all(s.item() == 1 for s in steps)
    for a, b in zip(p, rp):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    print("triton-interpreter-ok")
    """
)


def test_triton_kernel_in_interpreter():
    require_tested_triton()
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "triton-interpreter-ok" in done.stdout


@pytest.mark.parametrize("projection", [False, True], ids=["ordinary", "projecting"])
def test_triton_kernel_compiles_to_vectorised_ptx(projection):
    """Compile (no GPU needed) for sm_90: catches what the interpreter accepts but the
    compiler does not, and checks that full blocks use 16-byte accesses, also in the
    variant that sums final_lr="auto"'s projection."""
    triton = require_tested_triton()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dynabound.kernels import triton_common
    from dynabound.kernels import triton_kernel as tk

    tl = tk.tl
    signature = {
        "base": "*fp32", "offsets": "*i64", "grad_offsets": "*i64", "numels": "*i64",
        "block_tensor": "*i32", "block_start": "*i64", "steps": "*fp32",
        "step_offsets": "*i64", "coef": "*fp64", "hyper": "*fp64", "lr_hi": "fp32",
        "lr_lo": "fp32", "final_hi": "fp32", "final_mid": "fp32", "final_lo": "fp32",
        "lr_ptr": "*fp32", "found_inf": "*fp32", "grad_scale": "*fp32", "n_tensors": "i32",
        "partials": "*fp64",
    }  # fmt: skip
    constants = dict(
        DTYPE=tl.float32, COMPUTE=tl.float32, IS_FP64=False, SCHEDULE=triton_common.REFERENCE,
        LR_TENSOR=False, AMSBOUND=True, WEIGHT_DECAY=1, UNSCALED_DECAY=False, MAXIMIZE=True,
        EPS_USED=True, HAS_BOX=True, HAS_FOUND_INF=True, HAS_GRAD_SCALE=True,
        PROJECTION=projection, VEC=4, BLOCK=tk.BLOCK, CHUNK=tk.CHUNK,
    )  # fmt: skip
    signature.update(dict.fromkeys(constants, "constexpr"))
    source = ASTSource(
        fn=tk._adabound_kernel,
        signature=signature,
        constexprs={(i,): constants[k] for i, k in enumerate(signature) if k in constants},
        attrs={(0,): [["tt.divisibility", 16]]},
    )
    try:
        kernel = triton.compile(
            source, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False}
        )
    except RuntimeError as exc:  # no ptxas in this Triton build
        pytest.skip(f"cannot compile for CUDA here: {exc}")
    ptx = kernel.asm["ptx"]
    assert "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx
    assert ("st.global.b64" in ptx) == projection  # the partial sums, only when asked


@pytest.mark.parametrize("path", ["fused", "foreach", "single"])
def test_bounds_beyond_float32_range_give_no_nan(path):
    # gamma = 1e-40 puts the first upper bound (~1e42 x lr) beyond float32; with eps = 0 a
    # zero second moment meets that bound, and an infinite bound would make 0 * inf = NaN.
    options = {"fused": dict(fused=True), "foreach": dict(foreach=True)}
    p = torch.zeros(5, requires_grad=True)
    opt = AdaBound([p], eps=0.0, gamma=1e-40, **options.get(path, dict(foreach=False)))
    for _ in range(3):
        p.grad = torch.zeros(5)
        p.grad[0] = 1e-3
        opt.step()
    assert torch.isfinite(p).all()
    assert torch.equal(p.detach()[1:], torch.zeros(4))
    assert p.detach()[0] < 0


def test_first_build_says_what_is_happening(monkeypatch, capsys):
    from torch.utils import cpp_extension  # noqa: F401  (torch 2.4 may print on import)

    from dynabound.kernels import compat

    def stop(*args, **kwargs):
        raise RuntimeError("compiler stopped by the test")

    capsys.readouterr()
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_error", None)
    monkeypatch.setattr(cpu, "is_built", lambda name: False)
    monkeypatch.setattr(compat, "compile_library", stop)
    assert not cpu.is_available()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "compiling the fused CPU kernel" in err
    assert "python -m dynabound.kernels build" in err
    assert "compiler stopped by the test" in cpu.unavailable_reason()


def test_build_command_reports_the_kernels():
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
    )
    for command in ("status", "build"):
        done = subprocess.run(
            [sys.executable, "-m", "dynabound.kernels", command],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("cpu: ") and "\ncuda: " in done.stdout
    assert "cpu: fused kernel ready" in done.stdout


def test_cpu_plan_is_cached_and_a_gradient_layout_change_is_seen(monkeypatch):
    """Steps reuse the validated kernel calls while the tensors stay put; a gradient with
    another layout at the same address is read through a copy, not through stale strides."""
    from collections import OrderedDict

    monkeypatch.setattr(cpu, "_plans", OrderedDict())
    collected = []
    real_collect = cpu._collect
    monkeypatch.setattr(cpu, "_collect", lambda *a: collected.append(1) or real_collect(*a))

    gen = torch.Generator().manual_seed(3)
    fused_params = [torch.nn.Parameter(torch.randn(5, 7, generator=gen))]
    fused = AdaBound(fused_params, lr=1e-2, fused=True)
    ref_params = [torch.nn.Parameter(fused_params[0].detach().clone())]
    ref = AdaBound(ref_params, lr=1e-2, foreach=False)
    buffer = torch.empty(35)
    for step in range(4):
        buffer.copy_(torch.randn(35, generator=gen))
        # Steps 0-1: row-major; steps 2-3: the same memory read column-major.
        grad = buffer.view(5, 7) if step < 2 else buffer.view(7, 5).t()
        fused_params[0].grad = grad
        ref_params[0].grad = grad.clone()
        fused.step()
        ref.step()
        torch.testing.assert_close(fused_params[0], ref_params[0], **TIGHT[torch.float32])
    assert len(collected) == 3  # built at step 0, reused at step 1, not cached with a copy


def test_unsupported_dtype_is_refused_before_the_step_counters_move():
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float8_e4m3fn), requires_grad=False)
    p.grad = torch.zeros(4, dtype=torch.float8_e4m3fn)
    opt = AdaBound([p], fused=True)
    with pytest.raises(RuntimeError, match="does not support torch.float8_e4m3fn"):
        opt.step()
    assert opt.state[p]["step"].item() == 0


# Every option set and storage format, stepped by the fused CPU kernel; prints a digest of
# the resulting parameters and state. Odd sizes reach the loops' vector remainders.
_ISA_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, torch
    from dynabound import AdaBound
    from dynabound.kernels import cpu

    DECOUPLED = {"weight_decay": 0.1, "decoupled_weight_decay": True}
    EVERY_TERM = {"weight_decay": 0.01, "maximize": True, "box": (-0.5, 0.7)}
    digests = {}
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for state_dtype in (None, torch.bfloat16, "8bit"):
            if dtype == torch.float64 and state_dtype is not None:
                continue
            for amsbound in (False, True):
                for decay in ({}, {"weight_decay": 0.1}, DECOUPLED, EVERY_TERM):
                    gen = torch.Generator().manual_seed(0)
                    params = [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype))
                              for n in (1, 37, 255, 300, 4099)]
                    opt = AdaBound(params, lr=1e-2, final_lr=0.1, amsbound=amsbound,
                                   fused=True, state_dtype=state_dtype,
                                   stochastic_rounding=dtype == torch.bfloat16, **decay)
                    for step in range(4):
                        for p in params:
                            # Gradients from 1e-8 to 1e4, zeros and a tiny subnormal.
                            g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                            g = g * 10.0 ** torch.randint(-8, 5, p.shape, generator=gen)
                            g[::7] = 0.0
                            g[::11] = 1e-40
                            p.grad = g.to(dtype)
                        opt.step()
                    h = hashlib.sha256()
                    for p in params:
                        h.update(p.detach().view(-1).view(torch.uint8).numpy().tobytes())
                        for value in opt.state[p].values():
                            h.update(value.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
                    name = f"{dtype} {state_dtype} ams={amsbound} {sorted(decay.items())}"
                    digests[name] = h.hexdigest()
    print(json.dumps({"isa": cpu.vector_isa(), "digests": digests}))
    """
)


def test_every_vector_copy_of_the_loops_computes_the_same_bits():
    """The generic, AVX2 and AVX-512 copies (whichever this CPU runs) agree bit for bit."""
    results = run_on_each_isa(_ISA_SCRIPT)
    assert results["generic"]["isa"] == "generic"
    assert results["avx2"]["isa"] in {"generic", "avx2"}
    assert len(results["generic"]["digests"]) == 3 * (3 * 2 * 4) + 2 * 4  # float64: no encoding
    for cap in ("avx2", "best"):
        assert results[cap]["digests"] == results["generic"]["digests"], (
            f"{results[cap]['isa']} differs from the generic loops"
        )
