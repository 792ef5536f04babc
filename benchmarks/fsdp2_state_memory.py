"""Optimizer-state bytes per rank of a GPT-2 124M model under FSDP2, by state_dtype.

Two gloo processes on this machine (CPU) shard a randomly initialised GPT-2 (transformers'
``GPT2LMHeadModel(GPT2Config())``: nothing is downloaded) with ``fully_shard`` per block and
at the root, build AdaBound with ``state_dtype`` None (float32), bfloat16 and "8bit", take
one step (zero gradients: the state exists from then on) and count the bytes of every
tensor in ``optimizer.state`` on each rank (a DTensor's local shard; 8-bit block scales and
step counters included). Writes JSON (``--out``).

    python benchmarks/fsdp2_state_memory.py      # -> benchmarks/results_fsdp2_state_memory.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import socket
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
FORMATS = {"float32": None, "bfloat16": torch.bfloat16, "8bit": "8bit"}


def _gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config())


def _state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """This rank's bytes of optimizer state: moments (bf16 values or 8-bit codes), 8-bit
    block scales, step counters."""
    out = {"moments": 0, "scales": 0, "steps": 0}
    for state in optimizer.state.values():
        for key, value in state.items():
            local = value.to_local() if hasattr(value, "to_local") else value
            kind = "steps" if key == "step" else "scales" if key.endswith("_scale") else "moments"
            out[kind] += local.numel() * local.element_size()
    out["total"] = sum(out.values())
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
        timeout=timedelta(minutes=10),
    )  # fmt: skip
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from dynabound import AdaBound

        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        result = {}
        for name, state_dtype in FORMATS.items():
            model = _gpt2()
            for block in model.transformer.h:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            params = list(model.parameters())
            optimizer = AdaBound(params, lr=1e-3, final_lr=0.1, state_dtype=state_dtype)
            for p in params:
                p.grad = torch.zeros_like(p)
            optimizer.step()
            result[name] = {
                **_state_bytes(optimizer),
                "local_parameters": sum(p.to_local().numel() for p in params),
            }
            if rank == 0:
                result[name]["parameters"] = sum(p.numel() for p in params)
            del model, optimizer, params
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {platform.machine()}"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or Path(__file__).with_name("results_fsdp2_state_memory.json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(port, tmp), nprocs=WORLD_SIZE, start_method="spawn")
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    parameters = ranks[0]["float32"]["parameters"]
    report = {
        "model": "GPT-2 124M: transformers GPT2LMHeadModel(GPT2Config()), random init",
        "parameters": parameters,
        "sharding": f"FSDP2 fully_shard per block and root, {WORLD_SIZE} gloo ranks (CPU)",
        "optimizer": "dynabound.AdaBound (exp_avg, exp_avg_sq), default fused CPU step",
        "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"),
        "machine": _cpu_name(),
        "python": sys.version.split()[0],
        "per_rank": {
            name: [{k: v for k, v in r[name].items() if k != "parameters"} for r in ranks]
            for name in FORMATS
        },
        "ratio_to_float32": {
            name: round(
                sum(r[name]["total"] for r in ranks) / sum(r["float32"]["total"] for r in ranks),
                4,
            )
            for name in FORMATS
        },
    }
    print(json.dumps(report, indent=1))
    out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
