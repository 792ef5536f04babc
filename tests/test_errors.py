"""Bad input gets a clear error naming the problem, never NaN or a silent no-op."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from reference_adabound import ReferenceAdaBound
from torch import Tensor
from torch.optim import lr_scheduler

from dynabound import AdaBound, AdaBoundW, AMSBound, AMSBoundW


def param(shape=(3,), dtype=torch.float32) -> Tensor:
    return torch.randn(shape, dtype=dtype, requires_grad=True)


INVALID = {
    "negative_lr": (dict(lr=-1e-3), ValueError, r"Invalid learning rate: -0\.001"),
    "nan_lr": (dict(lr=math.nan), ValueError, "Invalid learning rate: nan"),
    "negative_tensor_lr": (dict(lr=torch.tensor(-0.1)), ValueError, "Invalid learning rate"),
    "zero_base_lr": (dict(base_lr=0.0), ValueError, r"Invalid base_lr: 0\.0 \(must be > 0"),
    "negative_base_lr": (dict(base_lr=-0.1), ValueError, r"Invalid base_lr: -0\.1"),
    "zero_lr_without_base_lr": (
        dict(lr=0.0), ValueError, r"Invalid base_lr: 0\.0 .*pass base_lr explicitly"
    ),
    "negative_final_lr": (dict(final_lr=-0.1), ValueError, r"Invalid final learning rate: -0\.1"),
    "zero_final_lr": (
        dict(final_lr=0.0), ValueError,
        r"Invalid final learning rate: 0\.0 \(must be > 0: both bounds are proportional to it, "
        "so 0 clips every step's rate to 0 and no parameter ever moves",
    ),
    "zero_final_lr_paper_bounds": (
        dict(final_lr=0, bounds="paper"), ValueError, r"Invalid final learning rate: 0 \(must be"
    ),
    "zero_gamma": (dict(gamma=0.0), ValueError, r"Invalid gamma .*: 0\.0 \(must be > 0\)"),
    "negative_gamma": (dict(gamma=-1e-3), ValueError, "Invalid gamma"),
    "negative_eps": (dict(eps=-1e-8), ValueError, "Invalid epsilon value: -1e-08"),
    "beta1_one": (dict(betas=(1.0, 0.999)), ValueError, "Invalid beta parameter at index 0: 1.0"),
    "beta1_negative": (dict(betas=(-0.1, 0.999)), ValueError, "beta parameter at index 0: -0.1"),
    "beta2_one": (dict(betas=(0.9, 1.0)), ValueError, "Invalid beta parameter at index 1: 1.0"),
    "negative_weight_decay": (dict(weight_decay=-1), ValueError, "Invalid weight_decay value: -1"),
    "bounds_string": (dict(bounds="sgd"), ValueError, "bounds must be 'reference', 'paper' or a"),
    "bounds_number": (dict(bounds=0.1), ValueError, "bounds must be .* got 0.1"),
    "box_reversed": (dict(box=(1.0, -1.0)), ValueError, r"box must be a pair \(low, high\) with"),
    "box_empty_interval": (dict(box=(0.5, 0.5)), ValueError, "box must be a pair"),
    "box_three_values": (dict(box=(0.0, 1.0, 2.0)), ValueError, "box must be a pair"),
    "fused_and_foreach": (
        dict(fused=True, foreach=True), RuntimeError, "`fused` and `foreach` cannot be `True`"
    ),
    "fused_and_differentiable": (
        dict(fused=True, differentiable=True), RuntimeError, "`fused` does not support `diff"
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", INVALID.values(), ids=INVALID.keys())
def test_invalid_hyperparameters(case) -> None:
    kwargs, error, message = case
    with pytest.raises(error, match=message):
        AdaBound([param()], **kwargs)


@pytest.mark.parametrize("cls", [AdaBound, AMSBound, AdaBoundW, AMSBoundW])
def test_messages_name_the_class(cls) -> None:
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: Invalid gamma"):
        cls([param()], gamma=0)


def test_tensor_lr_with_more_than_one_element() -> None:
    with pytest.raises(ValueError, match="Tensor lr must have exactly one element"):
        AdaBound([param()], lr=torch.tensor([1e-3, 1e-3]))


def test_tensor_lr_with_more_than_one_element_and_base_lr() -> None:
    with pytest.raises(ValueError, match="Tensor lr must have exactly one element"):
        AdaBound([param()], lr=torch.tensor([1e-3, 1e-3]), base_lr=1e-3)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_non_floating_params(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match=rf"floating-point or complex parameters, got {dtype}"):
        AdaBound([torch.zeros(3, dtype=dtype)])


@pytest.mark.parametrize("cls", [AdaBound, AMSBound, AdaBoundW])
@pytest.mark.parametrize("foreach", [False, True])
def test_sparse_gradients(cls, foreach: bool) -> None:
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    embedding(torch.tensor([1, 4])).sum().backward()
    opt = cls(embedding.parameters(), foreach=foreach)
    with pytest.raises(RuntimeError, match=rf"^{cls.__name__} does not support sparse") as info:
        opt.step()
    assert "Adam " not in str(info.value)


def test_the_reference_names_adam_for_sparse_gradients() -> None:
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    embedding(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="^Adam does not support sparse"):
        ReferenceAdaBound(embedding.parameters()).step()


def test_the_reference_divides_by_zero_with_gamma_zero() -> None:
    p = param()
    opt = ReferenceAdaBound([p], gamma=0.0)  # accepted by the reference's own checks
    p.grad = torch.ones(3)
    with pytest.raises(ZeroDivisionError):
        opt.step()


def test_bound_function_returning_invalid_bounds() -> None:
    p = param()
    opt = AdaBound([p], bounds=lambda step: (0.2, 0.1))
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"invalid bounds at step 1.*0 <= lower <= upper"):
        opt.step()


BAD_GROUPS = {
    "negative_lr": (dict(lr=-1.0), ValueError, "Invalid learning rate"),
    "zero_gamma": (dict(gamma=0.0), ValueError, "Invalid gamma"),
    "zero_base_lr": (dict(base_lr=0.0), ValueError, "Invalid base_lr"),
    "zero_lr_no_base_lr": (dict(lr=0.0), ValueError, "pass base_lr explicitly"),
    "bad_betas": (dict(betas=(0.9, 1.5)), ValueError, "beta parameter at index 1"),
    "bad_bounds": (dict(bounds="sgdm"), ValueError, "bounds must be"),
    "bad_box": (dict(box=(2.0, 1.0)), ValueError, "box must be a pair"),
    "int_param": (dict(params=[torch.zeros(2, dtype=torch.long)]), ValueError, "floating-point"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_GROUPS.values(), ids=BAD_GROUPS.keys())
def test_add_param_group_rejects_a_bad_group(case) -> None:
    overrides, error, message = case
    opt = AdaBound([param()])
    with pytest.raises(error, match=message):
        opt.add_param_group({"params": [param()], **overrides})


def test_a_rejected_group_is_not_added() -> None:
    opt = AdaBound([param()])
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [param()], "lr": -1.0})
    assert len(opt.param_groups) == 1


def test_add_param_group_rejects_duplicate_params() -> None:
    p = param()
    opt = AdaBound([p])
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter"):
        opt.add_param_group({"params": [p]})


def test_valid_edge_values_are_accepted() -> None:
    groups = AdaBound(
        [param()], lr=0.0, base_lr=1e-3, final_lr=1e-12, eps=0.0, betas=(0.0, 0.0), box=(-1, 1)
    ).param_groups
    assert groups[0]["box"] == (-1, 1) and groups[0]["lr"] == 0.0


def test_zero_final_lr_is_accepted_with_a_bound_function_which_ignores_it() -> None:
    p = param()
    opt = AdaBound([p], final_lr=0.0, bounds=lambda step: (0.01, 0.1))
    start = p.detach().clone()
    p.grad = torch.ones_like(p)
    opt.step()
    assert not torch.equal(p.detach(), start)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("kwargs", [{}, dict(amsbound=True, weight_decay=0.1, eps=0.0)])
def test_zero_lr_from_a_warmup_is_a_no_op_update(foreach: bool, kwargs: dict) -> None:
    params = [param((4, 3)), param(()), param((5,), torch.float64)]
    start = [p.detach().clone() for p in params]
    opt = AdaBound(params, lr=1e-2, foreach=foreach, **kwargs)
    warmup = lr_scheduler.LambdaLR(opt, lambda k: min(k / 2, 1.0))
    assert opt.param_groups[0]["lr"] == 0.0
    for p in params:
        p.grad = torch.zeros_like(p)  # a zero gradient with eps=0 divides 0 by 0 if unguarded
    params[0].grad[0] = 1.0
    opt.step()
    warmup.step()
    for p, s in zip(params, start, strict=True):
        assert torch.equal(p.detach(), s)
        assert all(torch.isfinite(t).all() for t in opt.state[p].values())
    assert opt.state[params[0]]["step"].item() == 1.0
    assert opt.param_groups[0]["base_lr"] == 1e-2

    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()  # lr is now 5e-3: the warm-up ends and the update resumes
    assert not torch.equal(params[0].detach(), start[0])
    assert all(torch.isfinite(p).all() for p in params)


def test_fused_on_an_unsupported_device_fails_before_any_state_exists() -> None:
    p = torch.nn.Parameter(torch.zeros(3, device="meta"))
    with pytest.raises(RuntimeError, match=r"fused=True\) supports parameters on cpu and cuda"):
        AdaBound([p], fused=True)
    opt = AdaBound([torch.nn.Parameter(torch.zeros(2))], fused=True)
    with pytest.raises(RuntimeError, match="meta"):
        opt.add_param_group({"params": [p]})
    assert len(opt.param_groups) == 1 and not opt.state


def test_default_warns_once_with_the_reason_when_the_cpu_kernel_is_unavailable(
    monkeypatch,
) -> None:
    from dynabound import kernels
    from dynabound.kernels import cpu

    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_error", "RuntimeError: ninja is not installed (pip install ninja)")
    monkeypatch.setattr(kernels, "_warned_unavailable", set())
    monkeypatch.setattr(kernels, "_fusable_by_type", {})
    p = torch.nn.Parameter(torch.ones(3))
    opt = AdaBound([p])
    p.grad = torch.ones(3)
    with pytest.warns(RuntimeWarning, match="foreach path: RuntimeError: ninja is not installed"):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # once is enough
    assert opt.state[p]["step"].item() == 2


@pytest.mark.parametrize("cuda_build", [None, "12.8"])
def test_kernel_status_without_a_cuda_device_says_so(monkeypatch, capsys, cuda_build) -> None:
    """Without a CUDA device, the missing device is the reason, whether Triton imports
    or not (a CPU build of torch comes without Triton)."""
    from dynabound.kernels import __main__ as status
    from dynabound.kernels import triton_common

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", cuda_build)
    monkeypatch.setattr(triton_common, "IMPORT_ERROR", "triton is not importable (test)")
    triton_common.unavailable_reason.cache_clear()
    try:
        status.main(["status"])
        lines = capsys.readouterr().out.splitlines()
    finally:
        triton_common.unavailable_reason.cache_clear()
    expected = (
        f"no CUDA device (this torch, {torch.__version__}, is built without CUDA)"
        if cuda_build is None
        else "no CUDA device (torch.cuda.is_available() is False)"
    )
    assert f"cuda: unavailable: {expected}" in lines
