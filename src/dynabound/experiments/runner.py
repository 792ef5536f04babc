"""The training loop: atomic checkpoints, exact resume, metrics, DDP.

A run directory holds ``config.json``, ``metrics.jsonl`` (one JSON object per epoch),
``checkpoint.pt`` (rewritten atomically after every epoch, and at epoch 0 before training)
and the figures drawn when the run finishes. Resuming restores the model, optimizer,
scheduler, task state, epoch and step counters and every random generator (torch, CUDA,
numpy, Python; per rank under DDP). The data order of an epoch is drawn from a generator
seeded by (seed, epoch), so it needs no saved state. A resumed CPU run is bit-identical to
an uninterrupted one.

Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is initialised here (NCCL on CUDA,
gloo on CPU), the model is wrapped in DistributedDataParallel, ``batch_size`` is the global
batch split between the ranks, and only rank 0 writes files or prints.
"""

from __future__ import annotations

import functools
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import RESUMABLE_CHANGES, build_config, check_hparams, check_resume_config
from .devices import ensure_distributed, resolve_device, shutdown_distributed
from .optimizers import build_optimizer, is_dynabound
from .rundir import (
    CHECKPOINT,
    CONFIG,
    METRICS,
    RunLock,
    append_metrics,
    load_checkpoint,
    load_run,
    read_metrics,
    remove_stale_temporaries,
    save_checkpoint,
    write_config,
    write_metrics,
)
from .tasks import DistInfo, EpochContext, Task, get_task
from .tasks.base import derive_seed

__all__ = [
    "CHECKPOINT",
    "CONFIG",
    "METRICS",
    "RESUMABLE_CHANGES",
    "RunResult",
    "build_config",
    "ensure_distributed",
    "load_run",
    "read_metrics",
    "resolve_device",
    "restore",
    "shutdown_distributed",
    "train",
]


@dataclass
class RunResult:
    run_dir: Path
    metrics: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    epochs_done: int = 0


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- progress and output ------------------------------------------------------------------------


class _Console:
    def __init__(self, lines: bool, bars: bool):
        self.enabled = lines
        self.bars = bars
        self._tqdm = None
        if self.bars:
            try:
                from tqdm.auto import tqdm

                self._tqdm = tqdm
            except ImportError:
                self.bars = False

    def bar(self, iterable: Iterable[Any] | None = None, **kwargs: Any) -> Any:
        if not self.bars:
            return _NoBar(iterable)
        return self._tqdm(iterable, dynamic_ncols=True, **kwargs)

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bars:
            self._tqdm.write(text)
        else:
            print(text, flush=True)


class _NoBar:
    def __init__(self, iterable: Iterable[Any] | None):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


# --- the run ------------------------------------------------------------------------------------


def train(
    config: dict[str, Any],
    run_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    quiet: bool = False,
    progress: bool | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    figures: bool = True,
) -> RunResult:
    """Train ``config`` in ``run_dir``; with ``resume`` continue the run saved there.

    ``progress`` shows tqdm bars (default: when stderr is a terminal and not ``quiet``);
    ``quiet`` silences the per-epoch lines. ``on_batch(epoch, batch)`` is called after
    every optimizer step. A KeyboardInterrupt stops training, keeps the checkpoint of the
    last finished epoch and returns with ``interrupted=True``.
    """
    run_dir = Path(run_dir)
    ckpt_path = run_dir / CHECKPOINT
    ckpt = None
    if resume:
        if not ckpt_path.is_file():
            raise ValueError(f"nothing to resume: {ckpt_path} does not exist")
        ckpt = load_checkpoint(ckpt_path, torch.device("cpu"))
        config = check_resume_config(ckpt["config"], config)
    elif ckpt_path.exists():
        raise ValueError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another --out"
        )
    dist, device = ensure_distributed(config.get("device"))
    cls = get_task(config["task"])
    if dist.enabled and not cls.supports_distributed:
        raise ValueError(
            f"task {cls.name!r} runs in a single process; do not launch it with torchrun"
        )
    check_hparams(config["optim"], config["hparams"])
    if progress is None:
        progress = sys.stderr.isatty() and not quiet
    console = _Console(lines=dist.is_main and not quiet, bars=dist.is_main and bool(progress))
    amp = device.type == "cuda" if config.get("amp") is None else bool(config["amp"])
    if device.type == "cuda":
        # Fixed input shapes: let cuDNN pick the fastest kernels (GPU runs are not promised
        # to be bit-reproducible; CPU runs are).
        torch.backends.cudnn.benchmark = True

    created = dist.is_main and not run_dir.exists()
    lock = RunLock(run_dir) if dist.is_main else None
    try:
        if lock is not None:
            remove_stale_temporaries(run_dir)
        return _train(config, run_dir, ckpt, cls, dist, device, console, amp, on_batch, figures)
    finally:
        if lock is not None:
            lock.release()
        if created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # a run that failed before writing anything leaves no trace


def _train(
    config: dict[str, Any],
    run_dir: Path,
    ckpt: dict[str, Any] | None,
    cls: type[Task],
    dist: DistInfo,
    device: torch.device,
    console: _Console,
    amp: bool,
    on_batch: Callable[[int, int], None] | None,
    figures: bool,
) -> RunResult:
    """The run itself, once its directory is locked."""
    seed = int(config["seed"])
    _seed_all(derive_seed(seed, "init"))
    task: Task = cls(config, device, dist)
    task.load_data()
    spec = task.model_spec
    if ckpt is not None and ckpt["model_spec"] != json.loads(json.dumps(spec)):
        raise ValueError(f"the data no longer matches the run: {ckpt['model_spec']} != {spec}")
    model = task.build_model(spec).to(device)
    if device.type == "cuda" and any(m.__class__ is nn.Conv2d for m in model.modules()):
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(config["optim"], model.parameters(), config["hparams"])
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=config["milestones"], gamma=config["lr_decay"]
    )
    train_model: nn.Module = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=ids)
    _seed_all(derive_seed(seed, "train", dist.rank))

    metrics: list[dict[str, Any]] = []
    start, global_step, elapsed = 1, 0, 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        task.load_state_dict(ckpt["task"])
        states = ckpt["rng"]
        _set_rng_state(states[dist.rank % len(states)], device)
        start, global_step, elapsed = ckpt["epoch"] + 1, ckpt["global_step"], ckpt["elapsed"]
        metrics = [m for m in read_metrics(run_dir / METRICS) if m["epoch"] <= ckpt["epoch"]]
        if dist.is_main:
            write_metrics(run_dir, metrics)
            write_config(run_dir, config)
    elif dist.is_main:
        write_config(run_dir, config)
        write_metrics(run_dir, [])

    def save(epoch: int) -> None:
        states = [_rng_state(device)]
        if dist.enabled:
            import torch.distributed as tdist

            states = [None] * dist.world_size
            tdist.all_gather_object(states, _rng_state(device))
        if not dist.is_main:
            return
        payload = {
            "epoch": epoch,
            "global_step": global_step,
            "elapsed": elapsed,
            "config": config,
            "model_spec": spec,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "task": task.state_dict(),
            "rng": states,
        }
        save_checkpoint(run_dir, payload)

    if ckpt is None:
        save(0)  # so that a Ctrl-C during the first epoch still leaves a resumable run

    epochs = int(config["epochs"])
    if start <= epochs:
        verb = "resuming" if ckpt is not None else "training"
        console.line(
            f"{verb} {cls.name} with {config['optim']} on {device}"
            + (f" x{dist.world_size} processes" if dist.enabled else "")
            + f": epochs {start}..{epochs} -> {run_dir}"
        )
    record_bounds = config.get("record_bounds", True) and is_dynabound(optimizer) and dist.is_main
    if record_bounds:
        from dynabound.diagnostics import bound_activity

    def batch_hook(ctx: EpochContext, early: list[dict[str, float]], i: int) -> None:
        # The Adam-to-SGD transition often finishes inside the first epoch, so bound
        # activity is also recorded at global steps 1, 2, 4, 8, ... (log-many).
        step = ctx.global_step
        if record_bounds and step & (step - 1) == 0:
            early.append(bound_activity(optimizer).summary())
        if on_batch is not None:
            on_batch(ctx.epoch, i)

    saved = start - 1  # the epoch the checkpoint on disk holds
    epoch_bar = console.bar(total=epochs, initial=start - 1, desc=cls.name, unit="epoch")
    interrupted = False
    try:
        for epoch in range(start, epochs + 1):
            early_bounds: list[dict[str, float]] = []
            ctx = EpochContext(
                epoch=epoch,
                seed=seed,
                device=device,
                dist=dist,
                amp=amp,
                raw_model=model,
                progress=lambda it, **kw: console.bar(it, leave=False, unit="step", **kw),
                on_batch=lambda i: None,
                global_step=global_step,
            )
            ctx.on_batch = functools.partial(batch_hook, ctx, early_bounds)
            lr = float(optimizer.param_groups[0]["lr"])
            t0 = time.perf_counter()
            record: dict[str, Any] = {"epoch": epoch}
            record.update(task.train_epoch(train_model, optimizer, ctx))
            record.update(task.evaluate(train_model, ctx))
            scheduler.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            epoch_time = time.perf_counter() - t0
            global_step, elapsed = ctx.global_step, elapsed + epoch_time
            record.update(lr=lr, epoch_time=epoch_time, time=elapsed, steps=global_step)
            if record_bounds:
                record["bounds"] = bound_activity(optimizer).summary()
                if early_bounds:
                    record["bounds_by_step"] = early_bounds
            metrics.append(record)
            if dist.is_main:
                append_metrics(run_dir, record)
            save(epoch)
            saved = epoch
            epoch_bar.update(1)
            console.line(f"epoch {epoch:>3}/{epochs} | {task.summary(record)} | {epoch_time:.1f}s")
    except KeyboardInterrupt:
        interrupted = True
    finally:
        epoch_bar.close()
    # An interrupt while saving leaves the previous checkpoint; the epoch without one is
    # redone on resume, so it does not count as done.
    metrics = [m for m in metrics if m["epoch"] <= saved]
    done = saved
    if interrupted:
        if dist.is_main:
            print(
                f"\ninterrupted: {run_dir / CHECKPOINT} holds epoch {done}; continue with "
                f"--resume --out {run_dir}",
                file=sys.stderr,
                flush=True,
            )
        return RunResult(run_dir, metrics, True, done)
    if figures and dist.is_main and metrics and start <= epochs:
        paths = task.figures(run_dir, metrics)
        if any("bounds" in m for m in metrics):
            from .plots import plot_run_transition

            paths.append(plot_run_transition(run_dir, run_dir / "transition.png"))
        console.line("figures: " + ", ".join(str(p) for p in paths))
    return RunResult(run_dir, metrics, False, done)


def restore(
    run_dir: str | os.PathLike[str], device: str = "cpu"
) -> tuple[Task, nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    """Rebuild a run's task, model and optimizer from its checkpoint (no data is loaded)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise ValueError(f"{run_dir} has no {CHECKPOINT}")
    dev = resolve_device(device)
    ckpt = load_checkpoint(path, dev)
    config = ckpt["config"]
    task = get_task(config["task"])(config, dev, DistInfo())
    model = task.build_model(ckpt["model_spec"]).to(dev)
    model.load_state_dict(ckpt["model"])
    optimizer = build_optimizer(config["optim"], model.parameters(), config["hparams"])
    optimizer.load_state_dict(ckpt["optimizer"])
    return task, model, optimizer, ckpt
