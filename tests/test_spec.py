"""The typed description of a step and the layouts derived from it.

``dynabound.spec.StepSpec`` is the one list of a step's hyperparameters and flags: the
functional form's keywords, what the optimizer fills in from a param group, the custom
op's flattened arguments, the CPU kernel's ``hyper`` array (checked against the C++ side's
own list when the library loads) and the Triton kernels' ``hyper`` table all follow it.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from dynabound import AdaBound, functional, kernels, optim
from dynabound.spec import FLAGS, FLOATS, StepSpec, StepTensors


def test_floats_and_flags_are_the_fields_of_their_type_in_order():
    assert FLOATS == (
        "lr", "beta1", "beta2", "final_lr", "base_lr", "gamma", "eps", "weight_decay",
    )  # fmt: skip
    assert FLAGS == (
        "amsbound", "decoupled_weight_decay", "unscaled_decay", "maximize",
        "stochastic_rounding", "capturable", "differentiable", "has_complex",
    )  # fmt: skip
    assert list(StepSpec._fields[: len(FLOATS)]) == list(FLOATS)


def test_the_functional_keywords_are_the_spec_and_the_implementation_choice():
    keywords = {
        name
        for name, p in inspect.signature(functional.adabound).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    # rounding_seeds is a StepTensors field; final_lr_estimation is final_lr="auto"'s
    # record, which the caller keeps between steps.
    extra = {"foreach", "fused", "rounding_seeds", "final_lr_estimation"}
    assert keywords == {*StepSpec._fields, *extra}


def test_the_optimizer_describes_each_group_by_its_own_values(monkeypatch):
    seen = []
    monkeypatch.setattr(optim, "adabound_step", lambda t, spec, **k: seen.append((t, spec, k)))
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    group = dict(
        lr=0.02, betas=(0.8, 0.95), final_lr=0.3, gamma=0.01, eps=1e-6, weight_decay=0.1,
        amsbound=True, decoupled_weight_decay=True, unscaled_decay=True, bounds="paper",
        box=(-2.0, 2.0), base_lr=0.04, maximize=True, foreach=True, state_dtype=torch.bfloat16,
        stochastic_rounding=True,
    )  # fmt: skip
    opt = AdaBound([{"params": [p], **group}, {"params": [q]}], lr=1e-3)
    p.grad, q.grad = torch.ones(3), torch.ones(2)
    opt.step()
    (tensors, spec, how), (_, default_spec, _) = seen
    assert isinstance(tensors, StepTensors) and tensors.params == [p]
    assert how == dict(foreach=True, fused=False)
    assert (spec.beta1, spec.beta2) == group["betas"]
    for name in StepSpec._fields:
        if name in group:
            assert getattr(spec, name) == group[name], name
    # Every field the group holds under the field's name comes from the group.
    for name in set(StepSpec._fields) & set(opt.param_groups[1]):
        assert getattr(default_spec, name) == opt.param_groups[1][name], name


def test_the_op_flattens_and_rebuilds_every_field(monkeypatch):
    from dynabound.kernels import ops

    received = []
    monkeypatch.setattr(ops, "fused_step", lambda tensors, spec: received.append(spec))
    spec = StepSpec(
        lr=torch.tensor(0.03), beta1=0.7, beta2=0.97, final_lr=0.2, base_lr=0.05, gamma=0.02,
        eps=1e-7, weight_decay=0.01, amsbound=True, decoupled_weight_decay=True,
        unscaled_decay=False, maximize=True, bounds="paper", box=(-1.0, 3.0),
        capturable=True, has_complex=True, grad_scale=torch.tensor(2.0),
        found_inf=torch.tensor(0.0),
    )  # fmt: skip
    p = torch.zeros(2)
    tensors = StepTensors(
        [p], [p.clone()], [p.clone()], [p.clone()], [p.clone()], [torch.zeros(())]
    )
    ops.call_fused_op(tensors, spec)
    (rebuilt,) = received
    for name in StepSpec._fields:
        value, got = getattr(spec, name), getattr(rebuilt, name)
        if isinstance(value, torch.Tensor):
            assert torch.equal(got, value), name
        else:
            assert got == value, name


def test_a_field_that_is_neither_float_nor_flag_needs_an_op_argument():
    from dynabound.kernels import ops

    assert ops._without_argument(StepSpec._fields) == []
    assert ops._without_argument((*StepSpec._fields, "momentum_dtype")) == ["momentum_dtype"]


def test_the_triton_hyper_table_is_the_spec_floats_but_lr():
    triton_common = pytest.importorskip("dynabound.kernels.triton_common")
    assert triton_common.HYPER == (*FLOATS[1:], "box_lo", "box_hi", "largest")


@pytest.fixture
def cpu_kernel():
    if not kernels.is_available("cpu"):
        pytest.skip(f"CPU kernel unavailable: {kernels.unavailable_reason('cpu')}")
    from dynabound.kernels import cpu

    return cpu


def test_the_cpu_kernel_reads_the_arrays_python_writes(cpu_kernel):
    assert cpu_kernel.HYPER[: len(FLOATS)] == FLOATS
    cpu_kernel._check_layouts(cpu_kernel.load())  # what load() did


def test_a_field_on_one_side_only_refuses_the_library(cpu_kernel, monkeypatch):
    layouts = dict(cpu_kernel._LAYOUTS, hyper=(*FLOATS, "momentum_decay", *cpu_kernel.HYPER[8:]))
    monkeypatch.setattr(cpu_kernel, "_LAYOUTS", layouts)
    with pytest.raises(RuntimeError, match="hyper array as .*'weight_decay', 'decay'.* but"):
        cpu_kernel._check_layouts(cpu_kernel.load())
