"""float16 and bfloat16 parameters: every path computes in float32 and rounds once per store.

Each low-precision run is checked step by step against the float32 single-tensor path run on
upcast copies, which are reset to the rounded values the low-precision step stored, so only
the rounding of each stored value separates the two. The eager paths run the reference's
float32 operations and must give exactly its rounded result; the fused kernel orders its
float32 arithmetic its own way, so its float32 result may differ in the last bits of the
operands before it is rounded.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_required import require_cpu_kernel
from option_sets import EVERY_OPTION, cases
from test_conventions import LiveTemporaries

from dynabound import AdaBound
from dynabound.bounds import StepCoefficients, within_range

DTYPES = [torch.float16, torch.bfloat16]
SHAPES = [(37,), (5, 3, 2), (), (0,), (4099,)]
STEPS = 4
EXTRA = {
    # final_lr / base_lr = 1e5: the bounds relative to lr exceed float16's 65504.
    "ratio_beyond_float16": dict(lr=1e-6, final_lr=0.1, gamma=1000.0),
    "paper_ratio_beyond_float16": dict(bounds="paper", lr=1e-6, final_lr=0.1),
    "everything": dict(amsbound=True, weight_decay=0.05, maximize=True, box=(-1.0, 1.0), eps=0.0),
}
CONFIGS = EVERY_OPTION | EXTRA
PATHS = {
    "single": dict(foreach=False, fused=False),
    "foreach": dict(foreach=True),
    "fused": dict(fused=True),
}


def require_path(path: str, dtype: torch.dtype) -> None:
    if path != "fused":
        return
    require_cpu_kernel()
    from dynabound.kernels import cpu

    if dtype not in cpu.supported_dtypes():
        pytest.skip(f"this build of the CPU kernel has no {dtype}")


def make_params(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype))
        for s in SHAPES
    ]


def small_gradients(params: list[torch.Tensor], step: int) -> None:
    """Magnitudes log-uniform in [1e-4, 1]: half of them below float16's 7.7e-3, where
    (1 - b2) * g * g underflows float16."""
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        exponent = torch.rand(p.shape, generator=gen, dtype=torch.float64) * 4 - 4
        sign = torch.randint(0, 2, p.shape, generator=gen) * 2 - 1
        p.grad = (sign * 10**exponent).to(p.dtype)


def stored(opt: AdaBound, p: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"param": p.detach(), **{k: v for k, v in opt.state[p].items() if k != "step"}}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype.itemsize == 2 else t


def assert_one_rounding(low: torch.Tensor, ref: torch.Tensor, exact: bool, what: str) -> None:
    if exact:
        assert torch.equal(bits(low), bits(ref.to(low.dtype))), what
        return
    if ref.numel() == 0:
        return
    # One rounding to the stored dtype (a subnormal one rounds to a fixed spacing), after
    # float32 arithmetic that may differ from the reference's in the last bits of its
    # operands: where m*b1 and (1-b1)*g nearly cancel, that is many units of the result.
    info = torch.finfo(low.dtype)
    atol = info.smallest_normal * info.eps + 4 * 2.0**-23 * ref.abs().max().item()
    torch.testing.assert_close(low.float(), ref, rtol=info.eps, atol=atol, msg=what)


def run_against_float32(dtype: torch.dtype, path: str, options: dict, steps: int = STEPS):
    options = dict(options)
    lr = options.pop("lr", 1e-2)
    params = make_params(dtype)
    ref_params = [torch.nn.Parameter(p.detach().float()) for p in params]
    opt = AdaBound(params, lr=lr, **PATHS[path], **options)
    ref = AdaBound(ref_params, lr=lr, foreach=False, fused=False, **options)
    for step in range(steps):
        small_gradients(params, step)
        for p, r in zip(params, ref_params, strict=True):
            r.grad = p.grad.float()
        opt.step()
        ref.step()
        with torch.no_grad():
            for i, (p, r) in enumerate(zip(params, ref_params, strict=True)):
                low_values, ref_values = stored(opt, p), stored(ref, r)
                assert low_values.keys() == ref_values.keys()
                for key, value in low_values.items():
                    assert value.dtype == dtype, key  # state stays in the parameter's dtype
                    what = f"{key} of tensor {i} after step {step + 1}"
                    assert_one_rounding(value, ref_values[key], path != "fused", what)
                    ref_values[key].copy_(value)  # continue from the rounded values
    return params, opt


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_path_rounds_the_float32_step_once(dtype, config, path):
    require_path(path, dtype)
    params, opt = run_against_float32(dtype, path, CONFIGS[config])
    assert all(s["step"].item() == STEPS for s in opt.state.values())
    if config == "lr_zero":
        assert all(torch.equal(p, q) for p, q in zip(params, make_params(dtype), strict=True))


def float32_first_step(grad: float, **options) -> torch.Tensor:
    p = torch.zeros(1, requires_grad=True)
    p.grad = torch.full((1,), grad)
    AdaBound([p], foreach=False, fused=False, **options).step()
    return p.detach()


def first_step(dtype: torch.dtype, path: str, grad: float, **options) -> torch.Tensor:
    p = torch.zeros(1, dtype=dtype, requires_grad=True)
    p.grad = torch.full((1,), grad, dtype=dtype)
    AdaBound([p], **PATHS[path], **options).step()
    return p.detach()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("grad", [5e-3, 1e-3])
@pytest.mark.parametrize("bounds", ["paper", "reference"])
def test_float16_gradient_below_7e_3_moves_like_float32(bounds, grad, path):
    # float16 arithmetic rounds (1 - b2) * g * g to 0 here (and eps = 1e-8 with it): the
    # rate became 1/0 clamped to the upper bound, a step of -0.0328 instead of -0.00316
    # for g = 5e-3 with the paper's bounds, and twice the step at g = 1e-3.
    require_path(path, torch.float16)
    got = first_step(torch.float16, path, grad, bounds=bounds)
    expected = float32_first_step(grad, bounds=bounds)
    assert_one_rounding(got, expected, path != "fused", f"{bounds}, g = {grad}")
    if bounds == "paper" and grad == 5e-3:
        assert got.item() == torch.tensor(-0.0031622780952602625).half().item()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bounds_beyond_float16_range_do_not_cap_the_rate(dtype, path):
    # lr = 1e-6 with final_lr = 0.1 puts the bounds relative to lr near 1e5. Capped at
    # float16's 65504 before lr was applied, the first step was -0.006546, not -0.00999.
    require_path(path, dtype)
    options = dict(lr=1e-6, final_lr=0.1, gamma=1000.0)
    got = first_step(dtype, path, 1.0, **options)
    expected = float32_first_step(1.0, **options)
    assert expected.item() == pytest.approx(-0.0999 * 0.1, rel=1e-3)
    assert_one_rounding(got, expected, path != "fused", "first step")


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize(("config", "options"), cases("foreach", EXTRA))
def test_foreach_equals_single_tensor_bit_for_bit(config, options, capturable):
    """Mixed dtypes in one group, complex32 too, and tensors that miss some steps."""
    options = dict(options)
    lr = options.pop("lr", 1e-2)
    if capturable:
        lr = torch.tensor(lr)
    results = []
    for foreach in (False, True):
        params = [*make_params(torch.float16), *make_params(torch.bfloat16, seed=1)]
        params += make_params(torch.float32, seed=2)[:2]
        if not options.get("box"):  # a box is a real interval
            gen = torch.Generator().manual_seed(3)
            z = torch.randn(6, 2, generator=gen, dtype=torch.complex64)
            params.append(torch.nn.Parameter(z.to(torch.complex32)))
        opt = AdaBound(params, lr=lr, foreach=foreach, capturable=capturable, **options)
        for step in range(STEPS):
            small_gradients(params, step)
            for i, p in enumerate(params):
                if (i + step) % 3 == 0:
                    p.grad = None
            opt.step()
        results.append([t for p in params for t in stored(opt, p).values()])
    single, multi = results
    for a, b in zip(single, multi, strict=True):
        if a.is_complex():
            a, b = torch.view_as_real(a), torch.view_as_real(b)
        assert a.dtype == b.dtype and torch.equal(bits(a), bits(b))


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("foreach", [False, True])
def test_complex32_is_its_float16_real_view(foreach):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(7, 3, generator=gen, dtype=torch.complex64).to(torch.complex32)
    complex_param = torch.nn.Parameter(z.clone())
    real_param = torch.nn.Parameter(torch.view_as_real(z.clone()))
    options = dict(amsbound=True, weight_decay=0.1, foreach=foreach)
    complex_opt = AdaBound([complex_param], **options)
    real_opt = AdaBound([real_param], **options)
    for step in range(STEPS):
        small_gradients([real_param], step)
        complex_param.grad = torch.view_as_complex(real_param.grad.clone())
        complex_opt.step()
        real_opt.step()
    assert torch.equal(bits(torch.view_as_real(complex_param.detach())), bits(real_param.detach()))


@pytest.mark.parametrize("amsbound", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_foreach_float32_working_copies_stay_within_the_documented_bound(dtype, amsbound):
    # Float32 copies of p, g, m, v (and vmax) for one chunk, the gradient's copy doubling as
    # the temporary: 16 (AMSBound 20) bytes per element of the largest parameter.
    sizes = [1000, 3000, 4096, 500, 2000, 4096, 10]
    params = [torch.randn(s, dtype=dtype, requires_grad=True) for s in sizes]
    opt = AdaBound(params, foreach=True, amsbound=amsbound, maximize=True, weight_decay=0.1)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # state is allocated on the first step; measure a later one
    with LiveTemporaries() as mode:
        opt.step()
    copies = 5 if amsbound else 4
    assert 0 < mode.peak <= copies * 4 * max(sizes)


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("foreach", [False, True])
def test_bounds_beyond_float32_range_keep_a_representable_rate(foreach, dtype, capturable):
    # gamma = 1e-36 makes the upper bound relative to lr 1e41, beyond float32, while the
    # rate lr * 1e41 = 1e35 is not. With eps = 0 and a gradient whose square underflows
    # float32 (v = 0, m != 0) the rate is exactly that bound. Capped at float32's largest
    # value before lr was applied it was 3.4e32, and the step 3000 times too small.
    lr, final_lr, gamma, beta1, g = 1e-6, 0.1, 1e-36, 0.9, 1e-30
    p = torch.zeros(2, dtype=dtype, requires_grad=True)
    p.grad = torch.tensor([g, 0.0], dtype=dtype)
    opt = AdaBound(
        [p],
        lr=torch.tensor(lr) if capturable else lr,
        final_lr=final_lr,
        gamma=gamma,
        eps=0.0,
        foreach=foreach,
        capturable=capturable,
    )
    opt.step()
    rate = lr * final_lr / lr * (1 + 1 / gamma)
    expected = -rate * (1 - beta1) * p.grad[0].double().item()
    assert p[0].item() == pytest.approx(expected, rel=torch.finfo(dtype).eps)
    assert p[1].item() == 0.0  # zero moments: the capped bound times m = 0, not NaN


def rates(c: StepCoefficients, x: torch.Tensor, lr: float) -> torch.Tensor:
    """The element-wise rate as the eager paths form it, in x's dtype."""
    return (x * c.numerator).clamp(c.lower, c.upper) * (lr * c.scale)


@pytest.mark.parametrize("lr", [0.0, 1e-7, 1e-3, 0.7, 3.0, 1e3])
def test_within_range_changes_no_rate_up_to_half_the_largest_value(lr):
    largest = torch.finfo(torch.float32).max
    gen = torch.Generator().manual_seed(0)
    # numerator / (sqrt(u) + eps) across float32's range, and the overflowed 1/0 of eps = 0.
    x = torch.cat([10 ** (torch.rand(4000, generator=gen) * 44 - 6), torch.tensor([math.inf])])
    bands = [(1e-3, 1e2), (1e3, 1e8), (1e-3, 3e38), (1e4, 1e40), (1e39, 1e300), (0.0, 1e300)]
    for lower, upper in bands:
        c = StepCoefficients(0.75, lower, upper, 1.0, True)
        got = rates(within_range(c, torch.float32, lr), x, lr).double()
        assert torch.isfinite(got).all(), (lower, upper)
        # The same products in float64, where nothing here is out of range.
        exact = rates(c, x.double(), lr)
        representable = exact <= largest / 2
        # Two roundings in float32 (the clamp is exact); the reference has none to speak of.
        tol = 2 * torch.finfo(torch.float32).eps
        close = (got - exact).abs() <= tol * exact.abs()
        assert close[representable].all(), (lower, upper, got[~close], exact[~close])
        assert (got[~representable] >= largest / 2 * (1 - tol)).all(), (lower, upper)


@pytest.mark.parametrize("lr", [1e-7, 1e-3, 0.3, 3.0])  # lr * scale not in [0.5, 1) already
def test_within_range_rescales_by_an_exact_power_of_two(lr):
    # Where no bound is capped, the rescaled scalars give the unscaled rate bit for bit.
    gen = torch.Generator().manual_seed(1)
    x = 10 ** (torch.rand(4000, generator=gen) * 8 - 4)
    c = StepCoefficients(0.3, 2e-2, 3e38, 1.0, True)  # the upper bound sets off the rescaling
    scaled = within_range(c, torch.float32, lr)
    assert scaled.upper != c.upper and scaled.scale * lr >= 0.5
    assert torch.equal(rates(scaled, x, lr), rates(c._replace(upper=math.inf), x, lr))
    # The same with tensor scalars, as capturable steps form them.
    tensor_lr = torch.tensor(lr)
    tc = c._replace(lower=torch.tensor([2e-2]), upper=torch.tensor([3e38]))
    ts = within_range(tc, torch.float32, tensor_lr)
    got = (x * ts.numerator).clamp(ts.lower, ts.upper) * (tensor_lr * ts.scale)
    assert torch.equal(got, rates(c._replace(upper=math.inf), x, lr))
