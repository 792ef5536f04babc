"""Low-precision moments (``state_dtype``) and stochastic rounding.

The encodings are checked against a NumPy oracle written from the format's definition
(values as powers of two times (1 + mantissa/8), rounding up when the dropped fraction plus
the random fraction reaches one), not from its bit manipulations; the fused CPU kernel
against the single-tensor reference for every option and format; and the optimizer for
checkpoints, conversions, memory and finite output.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_required import require_cpu_kernel
from option_sets import cases

from dynabound import AdaBound
from dynabound import state_formats as formats
from dynabound.diagnostics import bound_activity, effective_lr

FORMATS = [torch.bfloat16, "8bit"]
FORMAT_IDS = ["bf16", "8bit"]
M32 = 0xFFFFFFFF


# --- NumPy oracle -------------------------------------------------------------------------


def np_mix32(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64) & M32
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & M32
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & M32
    return x ^ (x >> np.uint64(16))


def np_random_bits(key: int, n: int) -> np.ndarray:
    return np_mix32((np.arange(n, dtype=np.uint64) + np.uint64(key)) & M32)


def np_decode(codes: np.ndarray, scales: np.ndarray, signed: bool) -> np.ndarray:
    """value = sign * 2^(e - 127) * (1 + f/8) * scale with (e, f) = divmod(|c| + offset, 8)."""
    binades = 15 if signed else 31
    offset = (127 - binades) * 8 - 1
    magnitude = np.abs(codes.astype(np.int64))
    exponent, fraction = np.divmod(magnitude + offset, 8)
    relative = np.where(magnitude > 0, 2.0 ** (exponent - 127) * (1 + fraction / 8), 0.0)
    scale = np.repeat(scales.astype(np.float64), formats.BLOCK)[: codes.size]
    value = (relative.astype(np.float32) * scale.astype(np.float32)).astype(np.float32)
    return np.where(codes < 0, -value, value)


def np_encode(x: np.ndarray, signed: bool, noise: np.ndarray):
    """Codes from the definition: y = |x| / scale written as 2^e * (1 + q/8); round q up
    when its dropped fraction plus noise / 2^16 reaches one."""
    binades = 15 if signed else 31
    n = x.size
    padded = np.zeros(-(-n // formats.BLOCK) * formats.BLOCK, np.float32)
    padded[:n] = np.abs(x)
    scales = padded.reshape(-1, formats.BLOCK).max(axis=1)
    inverse = np.where(scales > 0, np.float32(1) / np.where(scales > 0, scales, 1), 0)
    inverse = inverse.astype(np.float32)
    # One ulp up where scale * inverse < 1: the block's largest magnitude encodes as 1.0.
    low = (scales > 0) & (scales * inverse < 1)
    inverse = np.where(low, np.nextafter(inverse, np.float32(np.inf)), inverse)
    y = np.minimum(padded.reshape(-1, formats.BLOCK) * inverse[:, None].astype(np.float32), 1)
    y = y.astype(np.float32).reshape(-1)[:n].astype(np.float64)
    codes = np.zeros(n, np.int64)
    nonzero = y > 0
    mantissa, exponent = np.frexp(y[nonzero])  # y = mantissa * 2^exponent, mantissa in [.5, 1)
    q = (mantissa * 2 - 1) * 8  # 3 kept bits plus the dropped fraction, exact in float64
    kept = np.floor(q)
    up = (q - kept) + noise[nonzero] / 2.0**16 >= 1
    level = (exponent - 1 + 127) * 8 + kept + up  # the kept bits as one number
    codes[nonzero] = np.maximum(level - ((127 - binades) * 8 - 1), 0)
    if signed:
        codes = np.where(x < 0, -codes, codes)
    return codes, scales


def np_round_bfloat16(x: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """bfloat16 bits: the top 16 bits of float32, plus one when the dropped 16 bits plus
    the noise carry."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    carry = ((bits & np.uint64(0xFFFF)) + noise.astype(np.uint64)) >> np.uint64(16)
    out = ((bits >> np.uint64(16)) + carry) & np.uint64(0xFFFF)
    return np.where(np.isnan(x), 0x7FC0, out).astype(np.uint16)


def spread_values(n: int, seed: int, low: float = -8, high: float = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    magnitude = 10 ** (torch.rand(n, generator=gen, dtype=torch.float64) * (high - low) + low)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    x = (magnitude * sign).float()
    x[::17] = 0.0
    return x


# --- the encodings against the oracle -----------------------------------------------------


def test_random_bits_match_the_oracle():
    for key in (0, 1, formats.step_key(3, 7, 0), M32):
        got = formats.random_bits(key, 1000).numpy()
        assert np.array_equal(got, np_random_bits(key, 1000).astype(np.int64))


def test_step_key_differs_by_seed_step_and_stream():
    keys = {formats.step_key(seed, step, stream) for seed in range(4) for step in range(1, 50)
            for stream in (0, 1)}  # fmt: skip
    assert len(keys) == 4 * 49 * 2


@pytest.mark.parametrize("signed", [True, False], ids=["first_moment", "second_moment"])
@pytest.mark.parametrize("n", [1, 255, 256, 1000])
def test_encode_and_decode_match_the_oracle(signed, n):
    x = spread_values(n, seed=n)
    if not signed:
        x = x.abs() * x.abs()
    noise = formats.random_bits(12345, n) & 0xFFFF
    codes, scales = formats.encode(x, signed, noise)
    want_codes, want_scales = np_encode(x.numpy(), signed, noise.numpy())
    assert codes.dtype == (torch.int8 if signed else torch.uint8)
    assert np.array_equal(codes.numpy().astype(np.int64), want_codes)
    assert np.array_equal(scales.numpy(), want_scales)
    decoded = formats.decode(codes, scales, signed)
    assert np.array_equal(decoded.numpy(), np_decode(codes.numpy(), scales.numpy(), signed))


def test_bfloat16_rounding_matches_the_oracle():
    x = spread_values(5000, seed=1, low=-40, high=38)
    x[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    noise = formats.random_bits(99, x.numel()) & 0xFFFF
    got = formats.round_bfloat16(x, noise).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(got, np_round_bfloat16(x.numpy(), noise.numpy()))


@pytest.mark.parametrize("signed", [True, False])
def test_block_maximum_is_exact_and_errors_are_within_one_step(signed):
    x = spread_values(4096, seed=2, low=-3, high=0)
    if not signed:
        x = x.abs()
    noise = formats.random_bits(5, x.numel()) & 0xFFFF
    decoded = formats.decode(*formats.encode(x, signed, noise), signed)
    blocks = x.view(-1, formats.BLOCK).abs()
    top = blocks.argmax(dim=1) + torch.arange(blocks.shape[0]) * formats.BLOCK
    assert torch.equal(decoded[top], x[top])
    # Within range a value lies between two neighbouring codes, 1/8 apart relative to the
    # lower one; below the range it may become zero.
    scale = blocks.amax(dim=1).repeat_interleave(formats.BLOCK)
    in_range = x.abs() >= scale * 2.0 ** -(15 if signed else 31)
    error = (decoded - x).abs()[in_range] / x.abs()[in_range]
    assert error.max() <= 0.125 + 1e-6


@pytest.mark.parametrize("signed", [True, False])
def test_encoding_decoded_values_to_nearest_is_lossless(signed):
    # A sharded checkpoint stores decoded 8-bit moments (dynabound.sharded_state); loaded
    # onto the same shards they must give back the same codes and scales. Noise 0 rounds
    # every value down: a block's largest one too, were its relative value 1 - 2^-24.
    x = spread_values(64 * formats.BLOCK, seed=3, low=-6, high=2)
    if not signed:
        x = x.abs()
    codes, scales = formats.encode(x, signed, torch.zeros(x.numel(), dtype=torch.int64))
    nearest = torch.full((x.numel(),), 1 << 15, dtype=torch.int64)
    again = formats.encode(formats.decode(codes, scales, signed), signed, nearest)
    assert torch.equal(again.codes, codes) and torch.equal(again.scales, scales)


@pytest.mark.parametrize("signed", [True, False])
def test_stochastic_rounding_is_unbiased(signed):
    # One value per block, the block's scale a fixed larger value: 2000 draws of the key.
    values = torch.tensor([0.3, 0.0123, 0.77, 1e-3], dtype=torch.float32)
    x = torch.zeros(4 * formats.BLOCK)
    x[:: formats.BLOCK] = 1.0
    x[1 :: formats.BLOCK] = values
    total = torch.zeros(4)
    draws = 2000
    for key in range(draws):
        noise = formats.random_bits(formats.step_key(0, key, 0), x.numel()) & 0xFFFF
        total += formats.decode(*formats.encode(x, signed, noise), signed)[1 :: formats.BLOCK]
    mean = total / draws
    # A draw is one of two codes 1/8 apart relative to the value: the mean of 2000 is
    # within a few 1e-3 relative.
    assert torch.allclose(mean, values, rtol=5e-3, atol=0)


# --- the optimizer ------------------------------------------------------------------------


def make_params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(37,), (5, 3, 2), (), (300,), (3, 700), (4, 3, 3, 3)]
    params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]
    cl = torch.randn(2, 3, 5, 5, generator=gen).to(dtype)
    params.append(cl.to(memory_format=torch.channels_last).requires_grad_())
    return params


def set_grads(params, step, seed=0):
    gen = torch.Generator().manual_seed(1000 * seed + step)
    for p in params:
        magnitude = 10 ** (torch.rand(p.shape, generator=gen) * 12 - 8)  # 1e-8 .. 1e4
        sign = torch.where(torch.rand(p.shape, generator=gen) < 0.5, -1.0, 1.0)
        p.grad = (magnitude * sign).to(p.dtype).contiguous(memory_format=torch.preserve_format)


def train(params, steps, first=0, **options):
    opt = AdaBound(params, **{"lr": 1e-2, "final_lr": 0.1, "gamma": 0.05, **options})
    for step in range(first, first + steps):
        set_grads(params, step)
        opt.step()
    return opt


def decoded_state(opt, p):
    state = opt.state[p]
    return {m: formats.moment_float32(state, m) for m in formats.MOMENTS if m in state}


STATE_BACKENDS = {"fused_cpu_bf16_state": torch.bfloat16, "fused_cpu_8bit_state": "8bit"}
STATE_CASES = [
    pytest.param(state_dtype, case.values[1], id=f"{backend}-{case.id}", marks=case.marks)
    for backend, state_dtype in STATE_BACKENDS.items()
    for case in cases(backend)
]


@pytest.mark.parametrize(("state_dtype", "options"), STATE_CASES)
def test_fused_cpu_kernel_matches_the_reference(state_dtype, options):
    require_cpu_kernel()
    runs = {}
    for fused in (False, True):
        params = make_params()
        opt = train(params, 6, state_dtype=state_dtype, fused=fused, foreach=False, **options)
        runs[fused] = (params, opt)
    (ref_params, ref_opt), (fused_params, fused_opt) = runs[False], runs[True]
    for pr, pf in zip(ref_params, fused_params, strict=True):
        # The kernel's float32 arithmetic may differ from torch's by an ulp, and an ulp in a
        # moment can move an 8-bit code by one step: parameters stay within lr-sized noise.
        torch.testing.assert_close(pf, pr, rtol=1e-5, atol=2e-5)
        want, got = decoded_state(ref_opt, pr), decoded_state(fused_opt, pf)
        for key in want:
            close = torch.isclose(got[key], want[key], rtol=1e-5, atol=1e-30)
            assert close.float().mean() > 0.99, key


@pytest.mark.parametrize("state_dtype", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize(
    "decay", [{}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "decoupled_weight_decay": True}],
    ids=["no decay", "L2", "decoupled"],
)  # fmt: skip
def test_non_finite_values_propagate_as_in_the_reference(state_dtype, decay):
    # An infinite parameter stays infinite without L2 decay (no 0 * inf in the kernel) and
    # poisons only what the reference's arithmetic poisons; NaN and infinite gradients too.
    # Two whole blocks and a part: the non-finite first block is encoded while the second,
    # finite one is updated, by the kernel's whole-block loop where it has one.
    require_cpu_kernel()
    inf, nan = float("inf"), float("nan")
    runs = []
    for fused in (False, True):
        p = torch.nn.Parameter(torch.tensor([inf, -inf, 1.0, nan, 2.0] + [0.5] * 595))
        opt = AdaBound([p], lr=1e-2, final_lr=0.1, fused=fused, state_dtype=state_dtype, **decay)
        p.grad = torch.ones_like(p)
        p.grad[[2, 4]] = torch.tensor([inf, nan])
        opt.step()
        runs.append((p.detach().clone(), decoded_state(opt, p)))
    (ref, ref_state), (got, got_state) = runs
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.isinf(), ref.isinf())
    finite = ref.isfinite()
    torch.testing.assert_close(got[finite], ref[finite], rtol=1e-5, atol=2e-5)
    for key, want in ref_state.items():
        assert torch.equal(got_state[key].isnan(), want.isnan()), key
    if not decay or decay.get("decoupled_weight_decay"):
        assert ref[0] == inf and ref[1] == -inf


@pytest.mark.parametrize("amsbound", [False, True], ids=["adabound", "amsbound"])
def test_blocks_whose_scale_has_no_finite_inverse_encode_as_in_the_reference(amsbound):
    # A block whose largest first moment is subnormal has an infinite inverse scale: its
    # zeros give 0 * inf = NaN, which the reference encodes as code 0. The kernel encodes
    # such blocks apart from the finite ones (whose clamp would turn NaN into the top code).
    require_cpu_kernel()
    runs = []
    for fused in (False, True):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 4 * formats.BLOCK))
        opt = AdaBound([p], lr=1e-2, fused=fused, state_dtype=formats.EIGHT_BIT,
                       amsbound=amsbound)  # fmt: skip
        for step in range(3):
            g = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
            g[formats.BLOCK : 2 * formats.BLOCK] = 0.0
            g[formats.BLOCK + 7] = 1e-38  # the second block's first moment: about 1e-39
            p.grad = g
            opt.step()
        runs.append((p.detach().clone(), decoded_state(opt, p), opt.state[p]))
    (ref, ref_state, ref_raw), (got, got_state, got_raw) = runs
    tiny = slice(formats.BLOCK, 2 * formats.BLOCK)
    assert ref_raw["exp_avg_scale"][1] < torch.finfo(torch.float32).tiny
    assert torch.equal(got_raw["exp_avg"][tiny], ref_raw["exp_avg"][tiny])
    assert torch.equal(got_state["exp_avg"][tiny], ref_state["exp_avg"][tiny])
    assert torch.count_nonzero(got_state["exp_avg"][tiny]) == 1
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("state_dtype", FORMATS, ids=FORMAT_IDS)
def test_low_precision_parameters_with_low_precision_state(dtype, state_dtype):
    require_cpu_kernel()
    runs = []
    for fused in (False, True):
        params = make_params(dtype)
        train(params, 4, state_dtype=state_dtype, fused=fused, foreach=False,
              stochastic_rounding=dtype is torch.bfloat16)  # fmt: skip
        runs.append(params)
    for pr, pf in zip(*runs, strict=True):
        assert pf.dtype == dtype
        ulp = 2.0 ** -(7 if dtype is torch.bfloat16 else 10)
        torch.testing.assert_close(pf.float(), pr.float(), rtol=2 * ulp, atol=1e-3)


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("state_dtype", FORMATS, ids=FORMAT_IDS)
def test_state_is_stored_in_the_format(fused, state_dtype):
    params = make_params()
    opt = train(params, 2, state_dtype=state_dtype, fused=fused, amsbound=True)
    for p in params:
        state = opt.state[p]
        if state_dtype == "8bit":
            assert state["exp_avg"].dtype == torch.int8
            assert state["exp_avg_sq"].dtype == state["max_exp_avg_sq"].dtype == torch.uint8
            assert state["exp_avg_scale"].numel() == formats.scale_count(p.numel())
        else:
            assert state["exp_avg"].dtype == torch.bfloat16
        assert state["exp_avg"].shape == p.shape
        assert state["exp_avg"].stride() == p.stride()


def state_bytes(opt) -> int:
    return sum(
        t.numel() * t.element_size()
        for state in opt.state.values()
        for key, t in state.items()
        if key != "step"
    )


@pytest.mark.parametrize("amsbound", [False, True])
def test_state_memory(amsbound):
    params = [torch.randn(1024, 1024, requires_grad=True), torch.randn(1000, requires_grad=True)]
    size = {}
    for state_dtype in (None, torch.bfloat16, "8bit"):
        opt = train(params, 1, state_dtype=state_dtype, amsbound=amsbound)
        size[state_dtype] = state_bytes(opt)
    assert size[torch.bfloat16] == size[None] // 2
    assert size["8bit"] <= 0.27 * size[None]


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
@pytest.mark.parametrize("state_dtype", [None, *FORMATS], ids=["param", *FORMAT_IDS])
def test_resume_through_a_weights_only_checkpoint_is_bit_identical(fused, state_dtype):
    dtype = torch.bfloat16 if state_dtype is None else torch.float32
    options = dict(state_dtype=state_dtype, fused=fused, amsbound=True, weight_decay=0.01,
                   stochastic_rounding=True)  # fmt: skip
    straight = make_params(dtype)
    train(straight, 10, **options)

    first = make_params(dtype)
    opt = train(first, 5, **options)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = [p.clone().requires_grad_() for p in saved["params"]]
    opt = AdaBound(resumed, lr=1e-2, final_lr=0.1, gamma=0.05, **options)
    opt.load_state_dict(saved["opt"])
    for step in range(5, 10):
        set_grads(resumed, step)
        opt.step()
    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a, b)


def test_loading_converts_between_formats():
    params = make_params()
    full = train(params, 5)
    eight = AdaBound(params, lr=1e-2, final_lr=0.1, gamma=0.05, state_dtype="8bit")
    eight.load_state_dict(full.state_dict())
    for p in params:
        assert eight.state[p]["exp_avg"].dtype == torch.int8
        for key, value in decoded_state(full, p).items():
            got = decoded_state(eight, p)[key]
            scale = value.abs().max()
            in_range = value.abs() >= scale * 2.0 ** (-15 if key == "exp_avg" else -31)
            # Rounded to nearest: within half a step, 1/16 relative.
            assert ((got - value).abs() <= value.abs() / 16 + 1e-30)[in_range].all()
    back = AdaBound(params, lr=1e-2, final_lr=0.1, gamma=0.05)
    back.load_state_dict(eight.state_dict())
    for p in params:
        assert back.state[p]["exp_avg"].dtype == torch.float32
        for key, value in decoded_state(eight, p).items():
            assert torch.equal(back.state[p][key], value)


def test_changing_state_dtype_between_steps_converts():
    params = make_params()
    opt = train(params, 3)
    opt.param_groups[0]["state_dtype"] = torch.bfloat16
    set_grads(params, 3)
    opt.step()
    assert all(opt.state[p]["exp_avg"].dtype == torch.bfloat16 for p in params)


@pytest.mark.parametrize("state_dtype", FORMATS, ids=FORMAT_IDS)
def test_diagnostics_read_every_state_type(state_dtype):
    params, reference_params = make_params(), make_params()
    opt = train(params, 3, state_dtype=state_dtype)
    reference = train(reference_params, 3)
    rates, want = effective_lr(opt), effective_lr(reference)
    for p, q in zip(params, reference_params, strict=True):
        assert rates[p].shape == p.shape
        # The same clipped rates up to the moments' rounding (up to 1/8 of v per step,
        # 1/16 of the rate), except where a second moment below its block's range became
        # zero: those sit at the upper bound. The gradients span 1e-8 to 1e4 in every block.
        close = torch.isclose(rates[p], want[q], rtol=0.15, atol=0)
        assert close.float().mean() >= 0.95
    activity = bound_activity(opt)
    assert activity.lower + activity.upper + activity.free == pytest.approx(1.0)


def test_stochastic_rounding_lets_the_second_moment_decay():
    # After one large gradient, v decays by beta2 = 0.999 per step. Rounded to nearest in
    # bfloat16 it never moves (0.1% is under half a unit in the last place); rounded
    # stochastically it follows float32 on average.
    def decay(state_dtype, dtype):
        p = torch.zeros(4096, dtype=dtype, requires_grad=True)
        opt = AdaBound([p], lr=0.0, base_lr=1e-3, state_dtype=state_dtype, fused=False)
        for step in range(500):
            p.grad = torch.full_like(p, 1.0 if step == 0 else 0.0)
            opt.step()
        return formats.moment_float32(opt.state[p], "exp_avg_sq").mean().item()

    exact = decay(None, torch.float32)
    assert exact == pytest.approx(1e-3 * 0.999**499, rel=1e-4)
    assert decay(None, torch.bfloat16) == pytest.approx(1e-3, rel=4e-3)  # stuck
    assert decay(torch.bfloat16, torch.float32) == pytest.approx(exact, rel=1e-2)
    assert decay("8bit", torch.float32) == pytest.approx(exact, rel=1e-2)


def test_stochastic_rounding_of_bfloat16_parameters_keeps_small_updates():
    # Steps of 1e-3 on parameters near 1 (bfloat16 spacing 2^-7): rounded to nearest they
    # are lost; rounded stochastically the mean moves as in float32.
    def drift(dtype, stochastic_rounding):
        p = torch.ones(4096, dtype=dtype, requires_grad=True)
        opt = AdaBound([p], lr=1e-3, final_lr=1e-3, gamma=1e6, betas=(0.0, 0.999),
                       eps=0.0, stochastic_rounding=stochastic_rounding, fused=False)  # fmt: skip
        for _ in range(50):
            p.grad = torch.ones_like(p)
            opt.step()
        return 1 - p.float().mean().item()

    exact = drift(torch.float32, False)
    assert drift(torch.bfloat16, False) == 0.0
    assert drift(torch.bfloat16, True) == pytest.approx(exact, rel=0.02)


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from([torch.bfloat16, "8bit"]),
    st.booleans(),
    st.booleans(),
    st.floats(-8, 4),
    st.integers(0, 2**16),
)
def test_finite_gradients_give_finite_state(state_dtype, amsbound, fused, exponent, seed):
    if fused:
        require_cpu_kernel()
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(700, generator=gen, requires_grad=True)
    opt = AdaBound([p], lr=1e-2, final_lr=0.1, state_dtype=state_dtype, amsbound=amsbound,
                   fused=fused)  # fmt: skip
    for _ in range(4):
        magnitude = 10 ** (torch.rand(700, generator=gen) * 12 - 8)  # 1e-8 .. 1e4
        magnitude[:350] = 10.0**exponent
        p.grad = magnitude * torch.where(torch.rand(700, generator=gen) < 0.5, -1.0, 1.0)
        opt.step()
    assert torch.isfinite(p).all()
    for value in decoded_state(opt, p).values():
        assert torch.isfinite(value).all()


def test_bad_state_options_are_clear_errors():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="Invalid state_dtype"):
        AdaBound([p], state_dtype=torch.float16)
    with pytest.raises(ValueError, match="Invalid state_dtype"):
        AdaBound([p], state_dtype="4bit")
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        AdaBound([torch.zeros(3, dtype=torch.float64, requires_grad=True)], state_dtype="8bit")
    with pytest.raises(ValueError, match="differentiable or capturable"):
        AdaBound([p], state_dtype="8bit", capturable=True)
    gappy = torch.zeros(4, 6)[:, ::2].requires_grad_()
    with pytest.raises(ValueError, match="without gaps"):
        AdaBound([gappy], state_dtype=torch.bfloat16)
