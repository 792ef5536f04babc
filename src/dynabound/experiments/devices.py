"""Devices and processes: checking a ``--device`` request, picking the device, and
torch.distributed set up from ``torchrun``'s environment."""

from __future__ import annotations

import os

import torch

from .tasks.base import DistInfo

__all__ = [
    "check_device",
    "ensure_distributed",
    "env_dist",
    "resolve_device",
    "shutdown_distributed",
]


def check_device(request: str | None) -> None:
    """Refuse a device request that cannot be honoured here, without touching the device,
    so that a command fails before it does any work."""
    request = request or "auto"
    if request in ("auto", "cpu"):
        return
    if request != "cuda" and not request.startswith("cuda:"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {request!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {request} was asked for but CUDA is not available")
    if request != "cuda":
        index = request.partition(":")[2]
        if not index.isdigit():
            raise ValueError(f"--device {request}: N in cuda:N must be a GPU number")
        if int(index) >= torch.cuda.device_count():
            raise ValueError(
                f"--device {request}: this machine has {torch.cuda.device_count()} GPU(s)"
            )


def resolve_device(request: str | None, dist: DistInfo | None = None) -> torch.device:
    request = request or "auto"
    check_device(request)
    if request == "auto":
        request = "cuda" if torch.cuda.is_available() else "cpu"
    if request.startswith("cuda"):
        if request == "cuda":
            index = dist.local_rank if dist is not None else 0
            request = f"cuda:{index}"
        device = torch.device(request)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def env_dist() -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(
        rank=int(os.environ["RANK"]),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", os.environ["RANK"])),
    )


def ensure_distributed(device_request: str | None) -> tuple[DistInfo, torch.device]:
    """Initialise torch.distributed from torchrun's environment (once) and pick the device."""
    info = env_dist()
    device = resolve_device(device_request, info)
    if info.enabled:
        import torch.distributed as tdist

        if not tdist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            tdist.init_process_group(backend=backend)
    return info, device


def shutdown_distributed(wait_for_peers: bool = False) -> None:
    """Tear down the process group; after a normal end, ``wait_for_peers`` first waits for
    every rank to get there, so that no rank (rank 0 hosts the rendezvous store) exits
    while another still talks to it, which can abort that rank at exit."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        if wait_for_peers:
            tdist.barrier()
        tdist.destroy_process_group()
