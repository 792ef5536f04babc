"""ZeroRedundancyOptimizer(optimizer_class=AdaBound): each rank keeps state for its own
partition of the parameters, steps it, and broadcasts the result.

Checked: the result equals one process running plain AdaBound on whole batches (to float
rounding); a consolidated checkpoint resumed into a fresh ZeRO optimizer continues exactly
like the uninterrupted run. The lr is halved at the checkpoint and the fresh optimizer is
built with the halved lr, so resuming is right only if ``base_lr`` (in the param groups)
comes back from the checkpoint rather than from the constructor. With a ``state_dtype``
each rank's partition keeps its moments encoded, and the consolidated checkpoint holds them
so (8-bit codes and block scales).
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
    # Low-precision state needs float32 parameters: these train a float32 copy of the model.
    "adabound_bf16_state": {"state_dtype": torch.bfloat16},
    "amsbound_8bit_state": {"amsbound": True, "state_dtype": "8bit"},
}
ENCODED = [name for name, extra in CONFIGS.items() if "state_dtype" in extra]


def _model(name: str, seed: int = 0) -> torch.nn.Module:
    model = make_model(seed)
    return model.float() if name in ENCODED else model


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
        model = DDP(_model(name))
        optimizer = _zero(model, extra, HYPER["lr"])
        train(model, optimizer, _as(batches[:STEPS], model), rank)
        _halve_lr(optimizer)
        train(model, optimizer, _as(batches[STEPS:], model), rank)
        uninterrupted = full_params(model)

        model = DDP(_model(name))
        optimizer = _zero(model, extra, HYPER["lr"])
        train(model, optimizer, _as(batches[:STEPS], model), rank)
        _halve_lr(optimizer)
        local_moments = _moment_dtypes(optimizer.optim)
        optimizer.consolidate_state_dict(to=0)
        path = out_dir / f"{name}.pt"
        if rank == 0:
            torch.save({"model": model.module.state_dict(), "optim": optimizer.state_dict()}, path)
        dist.barrier()

        checkpoint = torch.load(path, weights_only=True)
        saved_moments = {  # before load_state_dict, which drops other ranks' entries
            key: str(value.dtype)
            for entry in checkpoint["optim"]["state"].values()
            for key, value in entry.items()
            if "exp_avg" in key
        }
        model = DDP(_model(name, seed=99))
        model.module.load_state_dict(checkpoint["model"])
        optimizer = _zero(model, extra, HYPER["lr"] * 0.5)
        optimizer.load_state_dict(checkpoint["optim"])
        local_groups = [
            {k: v for k, v in g.items() if k != "params"} for g in optimizer.optim.param_groups
        ]
        train(model, optimizer, _as(batches[STEPS:], model), rank)
        results[name] = {
            "uninterrupted": uninterrupted,
            "resumed": full_params(model),
            "saved_groups": [
                {k: v for k, v in g.items() if k != "params"}
                for g in checkpoint["optim"]["param_groups"]
            ],
            "local_groups": local_groups,
            "local_state": len(optimizer.optim.state),
            "local_moments": local_moments,
            "saved_moments": saved_moments,
        }
    torch.save(results, out_dir / f"rank{rank}.pt")


def _as(batches: list, model: torch.nn.Module) -> list:
    dtype = next(model.parameters()).dtype
    return [tuple(t.to(dtype) for t in batch) for batch in batches]


def _moment_dtypes(optimizer: torch.optim.Optimizer) -> dict[str, str]:
    return {
        key: str(value.dtype)
        for state in optimizer.state.values()
        for key, value in state.items()
        if "exp_avg" in key
    }


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("zero")
    spawn_two(_worker, out_dir)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(2)]


def _single_process(name: str, **options: Any) -> dict[str, torch.Tensor]:
    model = _model(name)
    optimizer = AdaBound(model.parameters(), **HYPER, **{**CONFIGS[name], **options})
    batches = _as(global_batches(2 * STEPS), model)
    train(model, optimizer, batches[:STEPS])
    _halve_lr(optimizer)
    train(model, optimizer, batches[STEPS:])
    return full_params(model)


@pytest.mark.parametrize("name", [name for name in CONFIGS if name not in ENCODED])
def test_zero_matches_single_process(ranks, name):
    for result in ranks:
        torch.testing.assert_close(
            result[name]["uninterrupted"], _single_process(name), rtol=1e-10, atol=1e-12
        )


@pytest.mark.parametrize("name", ENCODED)
def test_zero_with_low_precision_state_matches_single_process_to_its_rounding(ranks, name):
    # A parameter's random bits are seeded by its place in its optimizer, which differs
    # between a rank's partition and the whole model: the runs agree to the format's rounding.
    want, exact = _single_process(name), _single_process(name, state_dtype=None)
    initial = full_params(_model(name))
    part = 0.25 if CONFIGS[name]["state_dtype"] == "8bit" else 0.02
    for result in ranks:
        for key, value in want.items():
            moved = (exact[key] - initial[key]).abs().max().item()
            assert moved > 1e-2, key
            assert (result[name]["uninterrupted"][key] - value).abs().max() <= part * moved, key


@pytest.mark.parametrize("name", ENCODED)
def test_zero_partitions_and_checkpoints_the_encoded_state(ranks, name):
    stored = {"8bit": "torch.int8", torch.bfloat16: "torch.bfloat16"}[CONFIGS[name]["state_dtype"]]
    for result in ranks:
        assert result[name]["local_moments"]["exp_avg"] == stored
        assert result[name]["saved_moments"]["exp_avg"] == stored
        if stored == "torch.int8":
            assert result[name]["saved_moments"]["exp_avg_scale"] == "torch.float32"


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
