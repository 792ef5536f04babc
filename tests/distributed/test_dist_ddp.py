"""DistributedDataParallel: two ranks end identical and equal to one process on whole batches.

DDP averages the two half-batch gradients, which is the gradient of the mean loss over the
whole batch; each rank then runs the same optimizer step on the same numbers. So the ranks
must agree bit for bit, and the single process (which sums in a different order) to float
rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from dist_helpers import HYPER, full_params, global_batches, make_model, spawn_two, train
from torch.nn.parallel import DistributedDataParallel as DDP

from dynabound import AdaBound

pytestmark = pytest.mark.distributed

STEPS = 10
CONFIGS: dict[str, dict[str, Any]] = {
    "adabound": {},
    "amsbound": {"amsbound": True},
    "adaboundw": {"decoupled_weight_decay": True},
}


def _worker(rank: int, out_dir: Path) -> None:
    results = {}
    for name, extra in CONFIGS.items():
        model = DDP(make_model())
        optimizer = AdaBound(model.parameters(), **HYPER, **extra)
        train(model, optimizer, global_batches(STEPS), rank)
        results[name] = full_params(model)
    torch.save(results, out_dir / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("ddp")
    spawn_two(_worker, out_dir)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.parametrize("name", CONFIGS)
def test_ddp_ranks_identical_and_equal_to_single_process(ranks, name):
    rank0, rank1 = ranks[0][name], ranks[1][name]
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between ranks"

    model = make_model()
    train(model, AdaBound(model.parameters(), **HYPER, **CONFIGS[name]), global_batches(STEPS))
    expected = full_params(model)
    torch.testing.assert_close(rank0, expected, rtol=1e-10, atol=1e-12)

    # The comparison means something only if training moved the parameters well past it.
    initial = full_params(make_model())
    assert max((expected[k] - initial[k]).abs().max().item() for k in initial) > 1e-2
