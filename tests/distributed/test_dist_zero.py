"""ZeroRedundancyOptimizer(optimizer_class=AdaBound): each rank keeps state for its own
partition of the parameters, steps it, and broadcasts the result.

Checked: the result equals one process running plain AdaBound on whole batches (to float
rounding); a consolidated checkpoint resumed into a fresh ZeRO optimizer continues exactly
like the uninterrupted run. The lr is halved at the checkpoint and the fresh optimizer is
built with the halved lr, so resuming is right only if ``base_lr`` (in the param groups)
comes back from the checkpoint rather than from the constructor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_helpers import HYPER, full_params, global_batches, make_model, spawn_two, train
from torch.nn.parallel import DistributedDataParallel as DDP

from dynabound import AdaBound

pytestmark = pytest.mark.distributed

STEPS = 6  # before and after the checkpoint
CONFIGS: dict[str, dict[str, Any]] = {
    "adabound": {},
    "amsbound": {"amsbound": True},
}


def _halve_lr(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        group["lr"] *= 0.5


def _zero(model: torch.nn.Module, extra: dict[str, Any], lr: float) -> Any:
    # Imported here: torch.distributed.optim warns about torch.jit on import.
    from torch.distributed.optim import ZeroRedundancyOptimizer

    kwargs = {**HYPER, **extra, "lr": lr}
    return ZeroRedundancyOptimizer(model.parameters(), optimizer_class=AdaBound, **kwargs)


def _worker(rank: int, out_dir: Path) -> None:
    batches = global_batches(2 * STEPS)
    results: dict[str, Any] = {}
    for name, extra in CONFIGS.items():
        model = DDP(make_model())
        optimizer = _zero(model, extra, HYPER["lr"])
        train(model, optimizer, batches[:STEPS], rank)
        _halve_lr(optimizer)
        train(model, optimizer, batches[STEPS:], rank)
        uninterrupted = full_params(model)

        model = DDP(make_model())
        optimizer = _zero(model, extra, HYPER["lr"])
        train(model, optimizer, batches[:STEPS], rank)
        _halve_lr(optimizer)
        optimizer.consolidate_state_dict(to=0)
        path = out_dir / f"{name}.pt"
        if rank == 0:
            torch.save({"model": model.module.state_dict(), "optim": optimizer.state_dict()}, path)
        dist.barrier()

        checkpoint = torch.load(path, weights_only=True)
        model = DDP(make_model(seed=99))
        model.module.load_state_dict(checkpoint["model"])
        optimizer = _zero(model, extra, HYPER["lr"] * 0.5)
        optimizer.load_state_dict(checkpoint["optim"])
        local_groups = [
            {k: v for k, v in g.items() if k != "params"} for g in optimizer.optim.param_groups
        ]
        train(model, optimizer, batches[STEPS:], rank)
        results[name] = {
            "uninterrupted": uninterrupted,
            "resumed": full_params(model),
            "saved_groups": [
                {k: v for k, v in g.items() if k != "params"}
                for g in checkpoint["optim"]["param_groups"]
            ],
            "local_groups": local_groups,
            "local_state": len(optimizer.optim.state),
        }
    torch.save(results, out_dir / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("zero")
    spawn_two(_worker, out_dir)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.parametrize("name", CONFIGS)
def test_zero_matches_single_process(ranks, name):
    model = make_model()
    optimizer = AdaBound(model.parameters(), **HYPER, **CONFIGS[name])
    batches = global_batches(2 * STEPS)
    train(model, optimizer, batches[:STEPS])
    _halve_lr(optimizer)
    train(model, optimizer, batches[STEPS:])
    for result in ranks:
        torch.testing.assert_close(
            result[name]["uninterrupted"], full_params(model), rtol=1e-10, atol=1e-12
        )


@pytest.mark.parametrize("name", CONFIGS)
def test_zero_consolidate_and_resume_continues_identically(ranks, name):
    for rank, result in enumerate(ranks):
        result = result[name]
        # Both ranks must own part of the state, or this is not testing the sharding.
        assert result["local_state"] > 0, f"rank {rank} holds no optimizer state"
        for group in result["saved_groups"] + result["local_groups"]:
            assert group["base_lr"] == HYPER["lr"]
            assert group["lr"] == HYPER["lr"] * 0.5
        for key, value in result["uninterrupted"].items():
            assert torch.equal(result["resumed"][key], value), f"rank {rank}: {key} differs"
