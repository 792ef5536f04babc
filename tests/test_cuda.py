"""The fused CUDA kernel on a real GPU: skipped where CUDA or Triton is missing.

Every option and dtype against the single-tensor path, the default's choice of the fused
kernel, CUDA-graph capture and replay, GradScaler and torch.compile; the same for moments
stored in bfloat16 or 8 bits and stochastically rounded bfloat16 parameters.
"""

from __future__ import annotations

import pytest
import torch
from option_sets import cases

from dynabound import AdaBound, kernels
from dynabound import state_formats as formats

if not kernels.is_available("cuda"):
    pytest.skip(
        f"fused CUDA kernel unavailable: {kernels.unavailable_reason('cuda')}",
        allow_module_level=True,
    )

DEVICE = torch.device("cuda")
SHAPES = [(37,), (5, 3, 2), (), (0,), (70001,), (64, 3, 3, 3), (300, 300)]
OPTIONS = cases(
    "fused_cuda", {"tensor_lr": dict(lr=torch.tensor(2e-2, device="cuda"), base_lr=1e-2)}
)
# Storage dtype -> (arithmetic dtype of the reference, tolerance of one rounding).
DTYPES = {
    torch.float32: (torch.float32, dict(rtol=1e-6, atol=1e-6)),
    torch.float64: (torch.float64, dict(rtol=1e-12, atol=1e-12)),
    torch.bfloat16: (torch.float32, dict(rtol=1.6e-2, atol=1e-5)),
    torch.float16: (torch.float32, dict(rtol=1e-3, atol=1e-5)),
}


def make_params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(DEVICE, dtype))
        for s in SHAPES
    ]


def set_grads(params, step, dtype=None):
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        p.grad = g.to(DEVICE, dtype or p.dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(("name", "options"), OPTIONS)
def test_default_fused_matches_single_tensor(name, options, dtype):
    """The default (fused) step against the single-tensor path in the arithmetic dtype,
    resynchronised to the stored values after every step (one rounding per step)."""
    options = dict(options)
    lr = options.pop("lr", 1e-2)
    compute, tol = DTYPES[dtype]
    fused_params = make_params(dtype)
    ref_params = [torch.nn.Parameter(p.detach().to(compute)) for p in fused_params]
    fused = AdaBound(fused_params, lr=lr, **options)
    ref_lr = lr.clone() if isinstance(lr, torch.Tensor) else lr
    ref = AdaBound(ref_params, lr=ref_lr, foreach=False, **options)
    for step in range(4):
        set_grads(fused_params, step)
        for pf, pr in zip(fused_params, ref_params, strict=True):
            pr.grad = pf.grad.to(compute)
        fused.step()
        ref.step()
        with torch.no_grad():
            for pf, pr in zip(fused_params, ref_params, strict=True):
                torch.testing.assert_close(pf.to(compute), pr, **tol)
                for key, value in ref.state[pr].items():
                    stored = fused.state[pf][key].to(value.device, value.dtype)
                    torch.testing.assert_close(stored, value, **tol)
                    value.copy_(fused.state[pf][key])
                pr.copy_(pf)
    assert all(s["step"].device == DEVICE for s in fused.state.values())
    assert all(s["step"].item() == 4 for s in fused.state.values())


def test_default_picks_the_fused_kernel_and_falls_back_per_group(monkeypatch):
    from dynabound import optim

    chosen = []
    real = optim._choose_implementation
    monkeypatch.setattr(
        optim, "_choose_implementation", lambda g, p: chosen.append(real(g, p)) or chosen[-1]
    )
    strided = torch.nn.Parameter(torch.randn(6, 8, device=DEVICE)[:, ::2])
    dense = torch.nn.Parameter(torch.randn(8, device=DEVICE))
    opt = AdaBound([{"params": [dense]}, {"params": [strided]}])
    for p in (dense, strided):
        p.grad = torch.randn_like(p)
    opt.step()
    assert chosen == [(False, True), (True, False)]


def test_checkpoint_loaded_into_a_default_optimizer_keeps_steps_on_the_device():
    params = make_params(torch.float32)
    opt = AdaBound(params, foreach=False)
    set_grads(params, 0)
    opt.step()
    state = opt.state_dict()
    fresh = AdaBound(params)
    fresh.load_state_dict(state)
    assert all(s["step"].device == DEVICE for s in fresh.state.values())
    set_grads(params, 1)
    fresh.step()


@pytest.mark.parametrize("options", [{}, dict(amsbound=True, bounds="paper", weight_decay=0.1)])
def test_cuda_graph_capture_and_replay(options):
    params = make_params(torch.float32)
    ref_params = make_params(torch.float32)
    lr = torch.tensor(1e-2, device=DEVICE)
    opt = AdaBound(params, lr=lr, capturable=True, fused=True, **options)
    ref = AdaBound(ref_params, lr=1e-2, foreach=False, **options)
    static = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, static, strict=True):
        p.grad = g
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph builds the launch plan
        set_grads(ref_params, 0)
        for g, r in zip(static, ref_params, strict=True):
            g.copy_(r.grad)
        opt.step()
        ref.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for step in range(1, 6):
        set_grads(ref_params, step)
        for g, r in zip(static, ref_params, strict=True):
            g.copy_(r.grad)
        if step == 3:  # a tensor lr changed in place reaches the replayed graph
            lr.fill_(5e-3)
            for group in ref.param_groups:
                group["lr"] = 5e-3
        graph.replay()
        ref.step()
    torch.cuda.synchronize()
    for p, r in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
    assert all(s["step"].item() == 6 for s in opt.state.values())


@pytest.mark.parametrize("fused", [None, True])
def test_grad_scaler(fused):
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4).to(DEVICE)
    ref_model = torch.nn.Linear(16, 4).to(DEVICE)
    ref_model.load_state_dict(model.state_dict())
    opt = AdaBound(model.parameters(), lr=1e-2, fused=fused, weight_decay=0.01)
    ref = AdaBound(ref_model.parameters(), lr=1e-2, foreach=False, weight_decay=0.01)
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
    x = torch.randn(32, 16, device=DEVICE)
    for step in range(4):
        opt.zero_grad()
        ref.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        ref_model(x).square().mean().backward()
        if step == 2:
            model.weight.grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        if step == 2:
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
            continue
        ref.step()
    for p, r in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)


def test_compiled_default_step_matches_eager_and_does_not_recompile_for_a_scheduler():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    params = make_params(torch.float32)
    ref_params = make_params(torch.float32)
    opt = AdaBound(params, lr=1e-2)
    ref = AdaBound(ref_params, lr=1e-2, foreach=False)
    schedulers = [torch.optim.lr_scheduler.ExponentialLR(o, 0.9) for o in (opt, ref)]
    compiled = torch.compile(opt.step)
    for step in range(6):
        set_grads(params, step)
        set_grads(ref_params, step)
        compiled()
        ref.step()
        for s in schedulers:
            s.step()
    for p, r in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])


# --- low-precision state (state_dtype, stochastic_rounding) ---------------------------------

ENCODED_STATES = {"bf16": torch.bfloat16, "8bit": "8bit", "param_sr": None}
# Full and partial 256-element blocks, a 0-dim and an empty tensor, a channels-last one.
ENCODED_SHAPES = [(300,), (), (0,), (70001,), (2, 3, 9, 9), (300, 300)]


def encoded_params(seed=0):
    """float32, bfloat16 and float16 tensors in one group (a launch per dtype)."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(ENCODED_SHAPES * 3):
        dtype = (torch.float32, torch.bfloat16, torch.float16)[i // len(ENCODED_SHAPES)]
        p = torch.randn(shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
        if len(shape) == 4:
            p = p.to(memory_format=torch.channels_last)
        params.append(torch.nn.Parameter(p))
    return params


def spread_grads(params, step):
    """Magnitudes over 1e-6 .. 1e2, so moments spread over many binades of a block."""
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        magnitude = 10 ** (torch.rand(p.shape, generator=gen, dtype=torch.float64) * 8 - 6)
        sign = torch.where(torch.rand(p.shape, generator=gen) < 0.5, -1.0, 1.0)
        g = torch.empty_like(p)  # in the parameter's layout, as autograd makes it
        p.grad = g.copy_((magnitude * sign).to(DEVICE))


def assert_one_rounding(got, want, what):
    """Within one rounding in the stored dtype of float32 arithmetic that may differ from
    the reference's (torch's CUDA kernels contract to FMA) in the operands' last bits; a
    16-bit value differs in at most 1% of the elements."""
    if want.numel() == 0:
        return
    info = torch.finfo(want.dtype)
    atol = info.smallest_normal * info.eps + 4 * 2.0**-23 * want.float().abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), rtol=info.eps, atol=atol, msg=what)
    if info.bits == 16:
        differing = (got.view(torch.int16) != want.view(torch.int16)).float().mean().item()
        assert differing <= 0.01, (what, differing)


def assert_same_state(got: dict, want: dict, what: str):
    assert got.keys() == want.keys(), what
    for key, value in want.items():
        if key == "step":
            assert got[key].item() == value.item(), what
        elif key.endswith("_scale"):
            torch.testing.assert_close(got[key], value, rtol=1e-6, atol=0, msg=f"{what} {key}")
        elif value.dtype in (torch.int8, torch.uint8):  # 8-bit codes: at most one step apart
            steps = (got[key].int() - value.int()).abs()
            if value.numel():
                assert steps.max().item() <= 1, (what, key)
                assert steps.bool().float().mean().item() <= 0.01, (what, key)
        else:
            assert_one_rounding(got[key], value, f"{what} {key}")


@pytest.mark.parametrize("state", ENCODED_STATES)
@pytest.mark.parametrize(("name", "options"), OPTIONS)
def test_encoded_state_matches_the_reference(name, options, state):
    """The fused step against the single-tensor reference on the same device, with the
    reference continued from the fused values after every step (one step's rounding)."""
    options = dict(options)
    lr = options.pop("lr", 1e-2)
    state_dtype = ENCODED_STATES[state]
    fused_params = encoded_params()
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in fused_params]
    common = dict(state_dtype=state_dtype, stochastic_rounding=True, **options)
    fused = AdaBound(fused_params, lr=lr, fused=True, **common)
    ref_lr = lr.clone() if isinstance(lr, torch.Tensor) else lr
    ref = AdaBound(ref_params, lr=ref_lr, foreach=False, fused=False, **common)
    for step in range(4):
        spread_grads(fused_params, step)
        for pf, pr in zip(fused_params, ref_params, strict=True):
            pr.grad = pf.grad.clone()
        fused.step()
        ref.step()
        with torch.no_grad():
            for i, (pf, pr) in enumerate(zip(fused_params, ref_params, strict=True)):
                what = f"tensor {i} ({pf.dtype}) after step {step + 1}"
                assert_one_rounding(pf, pr, what)
                assert_same_state(fused.state[pf], ref.state[pr], what)
                pr.copy_(pf)
                for key, value in ref.state[pr].items():
                    if key != "step":
                        value.copy_(fused.state[pf][key])
    if state_dtype == "8bit":
        assert fused.state[fused_params[0]]["exp_avg"].dtype == torch.int8


def test_encoded_keys_and_random_bits_on_the_device():
    from dynabound.kernels import triton_encoded

    seeds = torch.tensor([0, 1, 5, 2**31 + 3, 2**32 - 1, 123456789, 42, 2**24] * 16)
    steps = torch.tensor([1.0, 2, 1000, 77, 2**24, 3, 0, 65537] * 16)  # float32 counters
    for stream in (formats.STREAM_STATE, formats.STREAM_PARAM):
        got = triton_encoded.step_keys(seeds.to(DEVICE), steps.to(DEVICE), stream).tolist()
        pairs = zip(seeds.tolist(), steps.tolist(), strict=True)
        assert got == [formats.step_key(s, int(t), stream) for s, t in pairs]
    for key in (0, 7, formats.step_key(3, 9, 0), 2**32 - 1):
        got = triton_encoded.random_bits(key, 100003, DEVICE)
        assert torch.equal(got, formats.random_bits(key, 100003, DEVICE))


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, "8bit"], ids=["bf16", "8bit"])
def test_encoded_step_does_not_synchronise(state_dtype):
    params = encoded_params()
    opt = AdaBound(params, lr=1e-2, fused=True, state_dtype=state_dtype, amsbound=True)
    spread_grads(params, 0)
    opt.step()  # builds and uploads the launch plan
    grads = [p.grad for p in params]
    spread_grads(params, 1)
    for p, g in zip(params, grads, strict=True):  # the addresses the gradient table knows
        p.grad = g.copy_(p.grad)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(s["step"].item() == 2 for s in opt.state.values())


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, "8bit"], ids=["bf16", "8bit"])
def test_encoded_state_with_grad_scaler(state_dtype):
    """Against the same fused step given the gradients unscaled by hand: a power-of-two
    scale divides exactly, so every stored bit agrees; the skipped step changes nothing."""
    torch.manual_seed(0)
    model = torch.nn.Linear(300, 7).to(DEVICE)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    options = dict(lr=1e-2, weight_decay=0.01, state_dtype=state_dtype, amsbound=True)
    opt = AdaBound(model.parameters(), fused=True, **options)
    ref = AdaBound(ref_params, fused=True, **options)
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
    x = torch.randn(32, 300, device=DEVICE)
    for step in range(4):
        opt.zero_grad()
        scaler.scale(model(x).square().mean()).backward()
        for p, r in zip(model.parameters(), ref_params, strict=True):
            r.grad = p.grad / scaler.get_scale()
        if step == 2:
            model.weight.grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in model.parameters()]
            state = [v.clone() for s in opt.state.values() for v in s.values()]
        scaler.step(opt)
        scaler.update()
        if step == 2:
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
            after = [v for s in opt.state.values() for v in s.values()]
            assert all(torch.equal(a, b) for a, b in zip(after, state, strict=True))
            continue
        ref.step()
        for p, r in zip(model.parameters(), ref_params, strict=True):
            assert torch.equal(p, r)
            assert torch.equal(p.grad, r.grad)  # left unscaled in place
            for key, value in ref.state[r].items():
                assert torch.equal(opt.state[p][key], value), key
