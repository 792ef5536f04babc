"""FSDP2 (``fully_shard``): the optimizer steps DTensor shards and matches an unsharded run.

Each rank holds a row-shard of every parameter (uneven: 7, 5 and 1 rows over two ranks, so
rank 1 holds an empty shard of the last bias) and steps it with its own optimizer state,
which must be sharded the same way. Gathering the shards after training must give the
single-process result to float rounding, for every implementation path.
"""

from __future__ import annotations

import importlib.util
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_helpers import (
    HYPER,
    full_params,
    global_batches,
    make_model,
    require_fully_shard,
    shard_fsdp2,
    spawn_two,
    train,
)
from kernel_required import require_cpu_kernel

from dynabound import AdaBound

pytestmark = pytest.mark.distributed

STEPS = 8
IMPLS: dict[str, dict[str, bool]] = {
    "single": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}
CONFIGS: dict[str, dict[str, Any]] = {
    "adabound": {},  # coupled L2 weight decay
    "amsboundw": {"amsbound": True, "decoupled_weight_decay": True},
}
HAS_FUSED = importlib.util.find_spec("dynabound.kernels") is not None


def _state_layout_problems(optimizer: torch.optim.Optimizer) -> list[str]:
    """Optimizer state must be sharded like its parameter (that is the memory saving)."""
    from torch.distributed.tensor import DTensor

    problems = []
    for p, state in optimizer.state.items():
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if key not in state:
                continue
            t = state[key]
            if not isinstance(t, DTensor) or t.placements != p.placements:
                problems.append(f"{key} of a {tuple(p.shape)} param is not sharded like it")
            elif t.to_local().shape != p.to_local().shape:
                problems.append(f"{key} local shape {t.to_local().shape} != param's")
        if isinstance(state["step"], DTensor) or state["step"].dtype != torch.float32:
            problems.append("step should be a plain float32 tensor")
    return problems


def _worker(rank: int, out_dir: Path, impls: list[str]) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2,))
    results: dict[str, Any] = {}
    for impl in impls:
        for name, extra in CONFIGS.items():
            try:
                model = make_model()
                shard_fsdp2(model, mesh)
                optimizer = AdaBound(model.parameters(), **HYPER, **extra, **IMPLS[impl])
                train(model, optimizer, global_batches(STEPS), rank)
                results[impl, name] = {
                    "params": full_params(model),
                    "layout": _state_layout_problems(optimizer),
                }
            except Exception:  # reported by the test of this case, not fatal to the others
                results[impl, name] = traceback.format_exc()
    torch.save(results, out_dir / f"rank{rank}.pt")


def _run(tmp_path_factory: pytest.TempPathFactory, impls: list[str]) -> list[dict[Any, Any]]:
    require_fully_shard()
    out_dir = tmp_path_factory.mktemp("fsdp2")
    spawn_two(_worker, out_dir, impls)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(2)]


@pytest.fixture(scope="module")
def eager_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[Any, Any]]:
    return _run(tmp_path_factory, ["single", "foreach"])


@pytest.fixture(scope="module")
def fused_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[Any, Any]]:
    # Apart from the eager paths, so that a crashing kernel takes only these cases down.
    if not HAS_FUSED:
        pytest.skip("dynabound.kernels (the fused paths) is not in this build")
    require_cpu_kernel()  # builds the kernel once, before the workers load it
    return _run(tmp_path_factory, ["fused"])


def _check(ranks: list[dict[Any, Any]], impl: str, name: str) -> None:
    for rank, result in enumerate(ranks):
        outcome = result[impl, name]
        if isinstance(outcome, str):
            pytest.fail(f"rank {rank} failed:\n{outcome}")
        assert outcome["layout"] == [], outcome["layout"]

    model = make_model()
    optimizer = AdaBound(model.parameters(), **HYPER, **CONFIGS[name], foreach=False)
    train(model, optimizer, global_batches(STEPS))
    expected = full_params(model)
    for result in ranks:
        torch.testing.assert_close(result[impl, name]["params"], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("impl", "name"),
    [
        ("single", "adabound"),
        ("single", "amsboundw"),
        ("foreach", "adabound"),
        ("foreach", "amsboundw"),
    ],
)
def test_fsdp2_matches_unsharded_run(eager_ranks, impl, name):
    _check(eager_ranks, impl, name)


@pytest.mark.parametrize("name", CONFIGS)
def test_fsdp2_fused_matches_unsharded_run(fused_ranks, name):
    _check(fused_ranks, "fused", name)
