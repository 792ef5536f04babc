"""Two gloo processes on this machine, and the small problem they train.

``spawn_two(fn, *args)`` starts two fresh interpreters (the ``spawn`` start method, as
torchrun would give), joins them in a gloo process group that meets through a file store in
a fresh temporary directory, runs ``fn(rank, *args)`` in each and raises if either fails or
the pair outlives the timeout (``spawn(fn, *args, world_size=n)`` does the same for another
number of processes). Workers write what is to be checked with ``torch.save``; the test
process reads it and compares with a single-process run over the same global batches.

A file store rather than a TCP one: no rank hosts a server that the others still talk to
while it exits, and no port can be taken by another test process in between. The harness's
own multi-process tests (tests/experiments) keep torchrun's TCP rendezvous.

The model is float64, so "equal to float rounding" can be checked tightly, and its layer
widths are odd so that FSDP2 shards unevenly (the last bias has a single row: one rank holds
an empty shard).
"""

from __future__ import annotations

import faulthandler
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

WORLD_SIZE = 2
GLOBAL_BATCH = 8
IN_FEATURES = 6
# Over the first ten steps of this problem these bounds (quick to close: large gamma) clip
# about a fifth of the rates from below and a quarter from above; weight decay is on.
HYPER: dict[str, Any] = dict(lr=1e-2, final_lr=0.3, gamma=0.2, weight_decay=1e-3)


def _entry(
    rank: int,
    fn: Callable[..., None],
    store_file: str,
    args: tuple,
    timeout_s: float,
    world_size: int,
) -> None:
    # A worker killed by a signal (an abort in C++) prints where each of its threads was.
    faulthandler.enable(all_threads=True)
    # Two ranks share the test machine's cores; more threads each only oversubscribe.
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        fn(rank, *args)
        # No rank tears down while another may still be in a collective with it.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Everything to be checked is on disk and the group is gone: leave without the
    # interpreter's finalization, where C++ threads of the communication libraries may still
    # release Python objects and abort the process after its work succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_two(fn: Callable[..., None], *args: Any, timeout_s: float = 300.0) -> None:
    """Run ``fn(rank, *args)`` on ranks 0 and 1; ``fn`` must be importable (module level)."""
    spawn(fn, *args, timeout_s=timeout_s)


def spawn(
    fn: Callable[..., None], *args: Any, world_size: int = WORLD_SIZE, timeout_s: float = 300.0
) -> None:
    """Run ``fn(rank, *args)`` on each rank of a fresh gloo group of ``world_size``."""
    store_dir = tempfile.mkdtemp(prefix="dynabound-dist-")
    try:
        context = mp.start_processes(
            _entry,
            args=(fn, str(Path(store_dir) / "store"), args, timeout_s / 2, world_size),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        try:
            # join raises ProcessRaisedException (with the worker's traceback) on a failure.
            while not context.join(timeout=0.5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"distributed workers still running after {timeout_s} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join()
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(IN_FEATURES, 7),
        nn.Tanh(),
        nn.Linear(7, 5),
        nn.Tanh(),
        nn.Linear(5, 1),
    ).double()


def global_batches(steps: int, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(GLOBAL_BATCH, IN_FEATURES, generator=generator, dtype=torch.float64)
        y = torch.randn(GLOBAL_BATCH, 1, generator=generator, dtype=torch.float64)
        out.append((x, y))
    return out


def local_part(batch: tuple[Tensor, Tensor], rank: int) -> tuple[Tensor, Tensor]:
    """This rank's half of a global batch (DDP and FSDP average the halves' gradients)."""
    per_rank = GLOBAL_BATCH // WORLD_SIZE
    return tuple(t[rank * per_rank : (rank + 1) * per_rank] for t in batch)  # type: ignore[return-value]


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[tuple[Tensor, Tensor]],
    rank: int | None = None,
) -> None:
    """Mean squared error steps; ``rank=None`` is the single process seeing whole batches."""
    for batch in batches:
        x, y = batch if rank is None else local_part(batch, rank)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def require_fully_shard() -> None:
    """Skip unless FSDP2 runs on CPU here: ``fully_shard`` is public from torch 2.6, and it
    records events on its streams, which CPU streams take from torch 2.7 on."""
    import pytest
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard") or not hasattr(torch.cpu.Stream, "record_event"):
        pytest.skip(f"FSDP2 does not run on CPU in torch {torch.__version__} (2.7 and later do)")


def shard_fsdp2(model: nn.Module, mesh: Any) -> None:
    """FSDP2 as usually applied: each Linear its own unit, then the root."""
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full_params(model: nn.Module) -> dict[str, Tensor]:
    """Unsharded copies of the parameters by name (DTensors gathered, DDP prefix removed)."""
    out = {}
    for name, p in model.named_parameters():
        tensor = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.removeprefix("module.")] = tensor.detach().clone()
    return out


def tensors_in(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors_in(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from tensors_in(value)


# Low-precision optimizer state needs float32 (or 16-bit) parameters, and 8-bit blocks of
# 256 elements need a layer larger than make_model's: 41 x 24 shards into 21 rows (one whole
# block and a part) and 20 rows; 1 x 13 leaves rank 1 an empty shard.
def make_float32_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(24, 41), nn.Tanh(), nn.Linear(41, 13), nn.Tanh(), nn.Linear(13, 1)
    )


def fed_gradients(model: nn.Module, steps: int, seed: int = 1) -> list[dict[str, Tensor]]:
    """Global gradients by parameter name for each step: every rank, and a single process,
    feeds the same ones (no data split, so the runs differ only in the optimizer)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    return [
        {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
        for _ in range(steps)
    ]


def feed(model: nn.Module, optimizer: torch.optim.Optimizer, steps: list[dict[str, Tensor]]):
    """Step ``optimizer`` with the given global gradients (as DTensors like each parameter)."""
    for step in steps:
        for name, p in model.named_parameters():
            grad = step[name]
            if hasattr(p, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                grad = distribute_tensor(grad, p.device_mesh, p.placements)
            p.grad = grad
        optimizer.step()
