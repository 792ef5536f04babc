"""FSDP2 with low-precision optimizer state (``state_dtype`` bfloat16 and "8bit").

Each rank encodes its own shard: 8-bit blocks are blocks of the local shard, and a shard's
random bits are seeded by its offset (:mod:`dynabound.sharded_state`). Both ranks are fed the
same global gradients each step, so the sharded run can be checked exactly: it must equal,
bit for bit, the functional single-tensor step run in one process on each shard as a plain
tensor with that shard's seed; and it must equal an unsharded run to the format's rounding
(the shard at offset 0 has the unsharded seed, so in bfloat16 its elements agree exactly).

The model is dist_helpers.make_float32_model (uneven shards, one of them empty).
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_helpers import (
    WORLD_SIZE,
    fed_gradients,
    feed,
    require_fully_shard,
    shard_fsdp2,
    spawn_two,
)
from dist_helpers import make_float32_model as make_model
from kernel_required import require_cpu_kernel, require_tested_triton
from torch import Tensor

from dynabound import AdaBound, sharded_state
from dynabound import state_formats as formats
from dynabound.functional import adabound

pytestmark = pytest.mark.distributed

STEPS = 6
HYPER: dict[str, Any] = dict(lr=1e-2, final_lr=0.3, gamma=0.2, weight_decay=1e-3)
FORMATS = {"bf16": torch.bfloat16, "8bit": formats.EIGHT_BIT}
CONFIGS: dict[str, dict[str, Any]] = {
    "adabound": {},
    "amsboundw": {"amsbound": True, "decoupled_weight_decay": True},
}
IMPLS = {"single": {"foreach": False}, "fused": {"fused": True}}


def _layout_problems(optimizer: AdaBound) -> list[str]:
    from torch.distributed.tensor import DTensor

    problems = []
    for p, state in optimizer.state.items():
        for key in formats.MOMENTS:
            if key not in state:
                continue
            t = state[key]
            if not isinstance(t, DTensor) or t.placements != p.placements:
                problems.append(f"{key} of a {tuple(p.shape)} param is not placed like it")
                continue
            scale = state.get(formats.scale_key(key))
            if scale is not None:
                want = formats.scale_count(p.to_local().numel())
                if isinstance(scale, DTensor) or scale.numel() != want:
                    problems.append(f"{key}'s scales are not this shard's {want} blocks")
    return problems


def _worker(rank: int, out_dir: Path, triton: bool = False) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    results: dict[Any, Any] = {}
    cases = [(i, f, n) for i in IMPLS for f in FORMATS for n in CONFIGS]
    if triton:
        _route_fused_steps_to_triton()
        cases = [("fused", fmt, "amsboundw") for fmt in FORMATS]
    for impl, fmt, name in cases:
        try:
            model = make_model()
            fed = fed_gradients(model, STEPS)
            shard_fsdp2(model, mesh)
            optimizer = AdaBound(
                model.parameters(), **HYPER, **CONFIGS[name], **IMPLS[impl],
                state_dtype=FORMATS[fmt],
            )  # fmt: skip
            feed(model, optimizer, fed)
            results[impl, fmt, name] = {
                "params": {n: p.full_tensor() for n, p in model.named_parameters()},
                "layout": _layout_problems(optimizer),
            }
        except Exception:  # reported by the test of this case, not fatal to the others
            results[impl, fmt, name] = traceback.format_exc()
    if triton:
        import sys

        results["triton_interpreted"] = os.environ.get("TRITON_INTERPRET") == "1" and (
            "dynabound.kernels.triton_encoded" in sys.modules
        )
    else:
        results["complex"] = _complex_run(mesh)
    torch.save(results, out_dir / f"{'triton-' if triton else ''}rank{rank}.pt")


def _route_fused_steps_to_triton() -> None:
    """Run fused steps of CPU tensors with the CUDA (Triton) kernels, as the interpreter
    tests do (``run_kernels("cuda", ...)``); the DTensors are unwrapped before."""
    from dynabound import kernels
    from dynabound.kernels.dispatch import run_kernels

    kernels.fused_step = lambda tensors, spec: run_kernels("cuda", tensors, spec)


def _complex_run(mesh: Any) -> Tensor:
    """A complex DTensor parameter (its moments encoded as real and imaginary parts)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    param = torch.nn.Parameter(distribute_tensor(_complex_start(), mesh, [Shard(0)]))
    optimizer = AdaBound([param], **HYPER, state_dtype=torch.bfloat16, foreach=False)
    for grad in _complex_gradients():
        param.grad = distribute_tensor(grad, mesh, [Shard(0)])
        optimizer.step()
    return param.full_tensor().detach()


def _complex_start() -> Tensor:
    return torch.randn(9, 5, dtype=torch.complex64, generator=torch.Generator().manual_seed(2))


def _complex_gradients() -> list[Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(9, 5, dtype=torch.complex64, generator=generator) for _ in range(STEPS)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[Any, Any]]:
    require_fully_shard()
    require_cpu_kernel()  # builds the kernel once, before the workers load it
    out_dir = tmp_path_factory.mktemp("fsdp2_low_precision")
    spawn_two(_worker, out_dir)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def triton_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[Any, Any]]:
    # Apart from the others: TRITON_INTERPRET must be set before the workers import Triton.
    require_fully_shard()
    require_tested_triton()
    out_dir = tmp_path_factory.mktemp("fsdp2_low_precision_triton")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        spawn_two(_worker, out_dir, True)
    return [torch.load(out_dir / f"triton-rank{rank}.pt") for rank in range(WORLD_SIZE)]


def _outcome(ranks: list[dict[Any, Any]], key: tuple) -> dict[str, Any]:
    for rank, result in enumerate(ranks):
        if isinstance(result[key], str):
            pytest.fail(f"rank {rank} failed:\n{result[key]}")
        assert result[key]["layout"] == [], result[key]["layout"]
    return ranks[0][key]


def _rows(rows: int, rank: int) -> slice:
    """FSDP2's rows of dim 0 on ``rank``: torch.chunk's split."""
    per_rank = -(-rows // WORLD_SIZE)
    return slice(min(rank * per_rank, rows), min((rank + 1) * per_rank, rows))


def _run_shards_in_one_process(state_dtype, name: str) -> dict[str, Tensor]:
    """Every rank's shard of every parameter stepped as a plain tensor by the functional
    single-tensor path, each with the seed its shard has under FSDP2."""
    model = make_model()
    fed = fed_gradients(model, STEPS)
    config = {**HYPER, **CONFIGS[name]}
    shards = []  # (name, rows, tensor, state, seed)
    for position, (param_name, p) in enumerate(model.named_parameters()):
        for rank in range(WORLD_SIZE):
            rows = _rows(p.shape[0], rank)
            shard = p.detach()[rows].clone()
            row_size = p[0].numel()
            seed = sharded_state.seed_at_offset(position, rows.start * row_size)
            state = {"step": torch.tensor(0.0)}
            moments = formats.MOMENTS if config.get("amsbound") else formats.MOMENTS[:2]
            for moment in moments:
                state.update(formats.new_moment(shard, moment, state_dtype))
            shards.append((param_name, rows, shard, state, seed))

    def moment(state: dict, key: str):
        if formats.scale_key(key) in state:
            return formats.Quantized(state[key], state[formats.scale_key(key)])
        return state[key]

    for step in fed:
        states = [s for _, _, _, s, _ in shards]
        adabound(
            [t for _, _, t, _, _ in shards],
            [step[n][rows] for n, rows, _, _, _ in shards],
            [moment(s, "exp_avg") for s in states],
            [moment(s, "exp_avg_sq") for s in states],
            [moment(s, "max_exp_avg_sq") for s in states] if config.get("amsbound") else [],
            [s["step"] for s in states],
            amsbound=config.get("amsbound", False),
            beta1=0.9, beta2=0.999, lr=config["lr"], final_lr=config["final_lr"],
            base_lr=config["lr"], gamma=config["gamma"], eps=1e-8,
            weight_decay=config["weight_decay"],
            decoupled_weight_decay=config.get("decoupled_weight_decay", False),
            unscaled_decay=False, bounds="reference", box=None, maximize=False,
            state_dtype=state_dtype, rounding_seeds=[seed for *_, seed in shards],
        )  # fmt: skip
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    for param_name, rows, shard, _, _ in shards:
        out[param_name][rows] = shard
    return out


def _unsharded_run(state_dtype, name: str) -> dict[str, Tensor]:
    model = make_model()
    optimizer = AdaBound(
        model.parameters(), **HYPER, **CONFIGS[name], foreach=False, state_dtype=state_dtype
    )
    feed(model, optimizer, fed_gradients(model, STEPS))
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_rank_encodes_its_own_shard(ranks, fmt, name):
    got = _outcome(ranks, ("single", fmt, name))["params"]
    assert ranks[1]["single", fmt, name]["params"].keys() == got.keys()
    want = _run_shards_in_one_process(FORMATS[fmt], name)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
        assert torch.equal(ranks[1]["single", fmt, name]["params"][key], value), key


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_sharded_equals_unsharded_to_the_formats_rounding(ranks, fmt, name):
    got = _outcome(ranks, ("single", fmt, name))["params"]
    unsharded = _unsharded_run(FORMATS[fmt], name)
    exact = _unsharded_run(None, name)
    initial = {n: p.detach() for n, p in make_model().named_parameters()}
    # An encoded moment is within 1/8 (8-bit) or 1/256 (bfloat16) of its value, relative:
    # over a few steps the runs differ by a small part of how far the parameters moved.
    part = 0.25 if fmt == "8bit" else 0.02
    for key, value in unsharded.items():
        moved = (exact[key] - initial[key]).abs().max().item()
        assert moved > 1e-2, key
        assert (got[key] - value).abs().max().item() <= part * moved, key
        if fmt == "bf16":  # rank 0's shard has the unsharded seed: the same bits
            rows = _rows(value.shape[0], 0)
            assert torch.equal(got[key][rows], value[rows]), key


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_matches_single_tensor_on_shards(ranks, fmt, name):
    single = _outcome(ranks, ("single", fmt, name))["params"]
    fused = _outcome(ranks, ("fused", fmt, name))["params"]
    for key, value in single.items():
        # As unsharded (tests/test_state_formats.py): the kernel's float32 arithmetic may
        # differ by an ulp, which can move an 8-bit code by one step.
        torch.testing.assert_close(fused[key], value, rtol=1e-5, atol=2e-5)


def test_complex_dtensor_parameter(ranks):
    param = torch.nn.Parameter(_complex_start())
    optimizer = AdaBound([param], **HYPER, state_dtype=torch.bfloat16, foreach=False)
    for grad in _complex_gradients():
        param.grad = grad
        optimizer.step()
    moved = (param.detach() - _complex_start()).abs().max().item()
    for result in ranks:
        got = result["complex"]
        assert torch.equal(got[:5], param.detach()[:5])  # rank 0's rows: the unsharded bits
        assert (got - param.detach()).abs().max().item() <= 0.02 * moved


@pytest.mark.parametrize("fmt", FORMATS)
def test_triton_kernel_matches_the_cpu_kernel_on_shards(ranks, triton_ranks, fmt):
    # Run by Triton's interpreter: the same float32 operations in the same order as the CPU
    # kernel (tests/test_triton_encoded.py), so every bit agrees.
    cpu = _outcome(ranks, ("fused", fmt, "amsboundw"))["params"]
    triton = _outcome(triton_ranks, ("fused", fmt, "amsboundw"))["params"]
    assert all(result["triton_interpreted"] for result in triton_ranks)
    for key, value in cpu.items():
        assert torch.equal(triton[key], value), key
