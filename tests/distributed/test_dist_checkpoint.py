"""Distributed checkpoint (torch.distributed.checkpoint) of an FSDP2 model with AdaBound.

Two ranks train, halve the lr, save with ``dcp.save``; a fresh model and optimizer (other
initial weights, built with the halved lr) load on two ranks and continue. Checked:

* the continuation is bit-identical to the uninterrupted run;
* the loaded parameters, optimizer state (each rank's shards) and param groups, ``base_lr``
  included, are exactly what was saved;
* the state-dict API's initialisation of an optimizer without state (one ``step()`` with
  zero gradients and lr = 0, run by ``get_optimizer_state_dict``/``get_state_dict`` and
  ``set_optimizer_state_dict``) changes no parameter and produces no NaN or inf.

Two loading flows: ``joint`` (``get_state_dict`` / ``set_state_dict`` for model and optimizer
together, the initialisation step runs on the fresh weights) and ``separate`` (the model is
loaded first, then ``get_optimizer_state_dict`` / ``set_optimizer_state_dict``: the
initialisation step runs on the loaded weights, so any change it makes survives).

The optimizer uses the single-tensor path; the foreach path on DTensors is covered in
test_dist_fsdp2.py.
"""

from __future__ import annotations

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
from torch import Tensor, nn

from dynabound import AdaBound

pytestmark = pytest.mark.distributed

STEPS = 5  # before and after the checkpoint
CONFIGS: dict[str, dict[str, Any]] = {
    # Coupled L2: the zero gradient of the initialisation step still feeds wd*p into m and v.
    "adabound": {},
    "amsbound": {"amsbound": True},
    # The authors' AdaBoundW decay p -= wd*p: lr = 0 must stop it too (DCP's init step).
    "adaboundw_unscaled": {"decoupled_weight_decay": True, "unscaled_decay": True},
}
FLOWS = ("joint", "separate")


def _local(t: Any) -> Any:
    return t.to_local() if hasattr(t, "to_local") else t


def _optimizer_snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
    """This rank's shards of the optimizer state (by parameter name) and the param groups."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer)
    state = {
        fqn: {key: _local(value).clone() for key, value in entry.items()}
        for fqn, entry in osd["state"].items()
    }
    groups = [{k: v for k, v in g.items() if k != "params"} for g in osd["param_groups"]]
    return state, groups


def _nonfinite(tensors: dict[str, dict[str, Tensor]]) -> list[str]:
    return [
        f"{fqn}.{key}"
        for fqn, entry in tensors.items()
        for key, value in entry.items()
        if not torch.isfinite(value).all()
    ]


def _max_change(before: dict[str, Tensor], after: dict[str, Tensor]) -> float:
    return max((after[k] - before[k]).abs().max().item() for k in before)


def _resume(flow: str, build, batches, checkpoint: Path) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as sd

    model, optimizer = build(seed=0, lr=HYPER["lr"])
    train(model, optimizer, batches[:STEPS], torch.distributed.get_rank())
    for group in optimizer.param_groups:
        group["lr"] *= 0.5
    saved_params = full_params(model)
    saved_state, saved_groups = _optimizer_snapshot(model, optimizer)
    model_sd, optim_sd = sd.get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)

    model, optimizer = build(seed=99, lr=HYPER["lr"] * 0.5)
    if flow == "joint":
        before = full_params(model)
        model_sd, optim_sd = sd.get_state_dict(model, optimizer)  # runs the lr = 0 step
        init_change = _max_change(before, full_params(model))
        init_state, _ = _optimizer_snapshot(model, optimizer)
        loaded = {"model": model_sd, "optim": optim_sd}
        dcp.load(loaded, checkpoint_id=checkpoint)
        sd.set_state_dict(
            model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"]
        )
    else:
        loaded = {"model": sd.get_model_state_dict(model)}
        dcp.load(loaded, checkpoint_id=checkpoint)
        sd.set_model_state_dict(model, loaded["model"])
        before = full_params(model)
        loaded = {"optim": sd.get_optimizer_state_dict(model, optimizer)}  # runs the lr = 0 step
        init_change = _max_change(before, full_params(model))
        init_state, _ = _optimizer_snapshot(model, optimizer)
        dcp.load(loaded, checkpoint_id=checkpoint)
        sd.set_optimizer_state_dict(model, optimizer, loaded["optim"])

    loaded_state, loaded_groups = _optimizer_snapshot(model, optimizer)
    params_restored = _max_change(saved_params, full_params(model)) == 0
    train(model, optimizer, batches[STEPS:], torch.distributed.get_rank())
    return {
        "init_change": init_change,
        "init_nonfinite": _nonfinite(init_state),
        "init_state_created": bool(init_state),
        "params_restored": params_restored,
        "state_mismatch": [
            f"{fqn}.{key}"
            for fqn, entry in saved_state.items()
            for key, value in entry.items()
            if not torch.equal(loaded_state.get(fqn, {}).get(key, torch.empty(0)), value)
        ],
        "saved_groups": saved_groups,
        "loaded_groups": loaded_groups,
        "resumed": full_params(model),
    }


def _worker(rank: int, out_dir: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2,))
    batches = global_batches(2 * STEPS)
    results: dict[Any, Any] = {}
    for name, extra in CONFIGS.items():

        def build(seed: int, lr: float, extra=extra) -> tuple[nn.Module, AdaBound]:
            model = make_model(seed)
            shard_fsdp2(model, mesh)
            kwargs = {**HYPER, **extra, "lr": lr}
            return model, AdaBound(model.parameters(), **kwargs, foreach=False)

        model, optimizer = build(seed=0, lr=HYPER["lr"])
        train(model, optimizer, batches[:STEPS], rank)
        for group in optimizer.param_groups:
            group["lr"] *= 0.5
        train(model, optimizer, batches[STEPS:], rank)
        results[name] = full_params(model)
        for flow in FLOWS:
            try:
                results[name, flow] = _resume(flow, build, batches, out_dir / f"{name}-{flow}")
            except Exception:  # reported by this case's tests, not fatal to the others
                results[name, flow] = traceback.format_exc()
    torch.save(results, out_dir / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[Any, Any]]:
    require_fully_shard()
    out_dir = tmp_path_factory.mktemp("dcp")
    spawn_two(_worker, out_dir)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(2)]


def _outcomes(ranks: list[dict[Any, Any]], name: str, flow: str) -> list[dict[str, Any]]:
    outcomes = []
    for rank, result in enumerate(ranks):
        outcome = result[name, flow]
        if isinstance(outcome, str):
            pytest.fail(f"rank {rank} failed:\n{outcome}")
        outcomes.append(outcome)
    return outcomes


CASES = [(name, flow) for name in CONFIGS for flow in FLOWS]


@pytest.mark.parametrize(("name", "flow"), CASES)
def test_dcp_resume_is_bit_identical(ranks, name, flow):
    for rank, outcome in enumerate(_outcomes(ranks, name, flow)):
        assert outcome["params_restored"], f"rank {rank}: loaded parameters differ from saved"
        assert outcome["state_mismatch"] == [], f"rank {rank}: {outcome['state_mismatch']}"
        for key, value in ranks[rank][name].items():
            assert torch.equal(outcome["resumed"][key], value), f"rank {rank}: {key} differs"


@pytest.mark.parametrize(("name", "flow"), CASES)
def test_dcp_initialisation_step_changes_nothing(ranks, name, flow):
    for rank, outcome in enumerate(_outcomes(ranks, name, flow)):
        assert outcome["init_state_created"], f"rank {rank}: the lr = 0 step created no state"
        assert outcome["init_nonfinite"] == [], f"rank {rank}: {outcome['init_nonfinite']}"
        assert outcome["init_change"] == 0, f"rank {rank}: params moved {outcome['init_change']}"


@pytest.mark.parametrize(("name", "flow"), CASES)
def test_dcp_param_groups_survive(ranks, name, flow):
    for outcome in _outcomes(ranks, name, flow):
        assert outcome["loaded_groups"] == outcome["saved_groups"]
        for group in outcome["loaded_groups"]:
            assert group["base_lr"] == HYPER["lr"]
            assert group["lr"] == HYPER["lr"] * 0.5
