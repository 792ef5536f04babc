"""The training loop: exact resume from inside an epoch, metrics, DDP.

A run saves ``checkpoint.pt`` before training, after every epoch and inside epochs: every
``checkpoint_every`` seconds of training (60 by default), every ``checkpoint_steps``
optimizer steps if asked, and when Ctrl-C or SIGTERM stops it (the first signal stops the
run at the next step boundary, after saving that step; a second one stops it at once). A
``kill -9`` therefore costs at most ``checkpoint_every`` seconds of training.

Resuming restores the model, optimizer, scheduler, task state, epoch and step counters and
every random generator (torch, CUDA, numpy, Python; per rank under DDP), and inside an
epoch also the batch position, the task's running sums and carried state (an LSTM's hidden
state, an augmentation generator) and the bound activity recorded so far in the epoch. The
data order of an epoch is drawn from a generator seeded by (seed, epoch), so it needs no
saved state. A resumed CPU run is bit-identical to an uninterrupted one.

Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is initialised here (NCCL on CUDA,
gloo on CPU), the model is wrapped in DistributedDataParallel, ``batch_size`` is the global
batch split between the ranks, and only rank 0 writes files or prints.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import RESUMABLE_CHANGES, build_config, check_hparams, check_resume_config
from .console import PROGRESS_EVERY, Console, ProgressLines
from .devices import ensure_distributed, resolve_device, shutdown_distributed
from .environment import describe_environment
from .generators import rng_state, seed_all, set_rng_state
from .optimizers import build_optimizer, is_dynabound
from .rundir import (
    CHECKPOINT,
    CONFIG,
    METRICS,
    DamagedCheckpointError,
    RunLock,
    append_environment,
    append_metrics,
    load_checkpoint,
    load_run,
    read_metrics,
    remove_stale_temporaries,
    save_checkpoint,
    write_config,
    write_metrics,
)
from .savepoints import CHECKPOINT_EVERY, SaveSchedule, StopSignals
from .tasks import DistInfo, EpochContext, Task, get_task
from .tasks.base import EpochState, derive_seed

__all__ = [
    "CHECKPOINT",
    "CHECKPOINT_EVERY",
    "CONFIG",
    "METRICS",
    "PROGRESS_EVERY",
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
    epochs_done: int = 0  # finished epochs in the checkpoint on disk
    steps_done: int = 0  # optimizer steps in the checkpoint on disk (inside an epoch too)


class _StopRequested(Exception):
    """Unwinds an epoch after the step that a stop request was saved at."""


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value


class _Run:
    """One process's share of a run: the objects a checkpoint saves and restores."""

    def __init__(
        self,
        config: dict[str, Any],
        run_dir: Path,
        task_cls: type[Task],
        dist: DistInfo,
        device: torch.device,
        console: Console,
        ckpt: dict[str, Any] | None,
    ):
        self.config, self.run_dir, self.dist, self.device = config, run_dir, dist, device
        self.console = console
        self.amp = device.type == "cuda" if config.get("amp") is None else bool(config["amp"])
        if device.type == "cuda":
            # Fixed input shapes: let cuDNN pick the fastest kernels (GPU runs are not promised
            # to be bit-reproducible; CPU runs are).
            torch.backends.cudnn.benchmark = True
        seed = int(config["seed"])
        seed_all(derive_seed(seed, "init"))
        self._build_task(task_cls, ckpt)
        self._build_model()
        seed_all(derive_seed(seed, "train", dist.rank))
        self.record_bounds = (
            config.get("record_bounds", True) and is_dynabound(self.optimizer) and dist.is_main
        )
        self.metrics: list[dict[str, Any]] = []
        self.epochs_done, self.global_step, self.elapsed = 0, 0, 0.0
        self.inside: dict[str, Any] | None = None  # where a mid-epoch checkpoint left off
        self.saved_epochs = self.saved_steps = 0
        self.saved_inside: dict[str, Any] | None = None
        self.resumed = ckpt is not None
        if ckpt is not None:
            try:
                self._restore(ckpt)
            except (KeyError, RuntimeError, TypeError, ValueError) as exc:
                # A checkpoint of the right format whose contents do not fit the run built
                # from its own configuration: a missing entry, a tensor of another shape.
                raise DamagedCheckpointError(
                    run_dir / CHECKPOINT, f"does not fit the run it belongs to ({exc!r:.300})"
                ) from exc
        else:
            self._start()
        if dist.is_main:  # what the numbers from here on depend on besides the config
            where = describe_environment(device, dist.world_size)
            append_environment(run_dir, {"from_step": self.global_step, **where})

    def _build_task(self, task_cls: type[Task], ckpt: dict[str, Any] | None) -> None:
        self.task = task_cls(self.config, self.device, self.dist)
        self.task.load_data()
        self.spec = self.task.model_spec
        if ckpt is not None and ckpt["model_spec"] != json.loads(json.dumps(self.spec)):
            raise ValueError(
                f"the data no longer matches the run: {ckpt['model_spec']} != {self.spec}"
            )

    def _build_model(self) -> None:
        """The model, its optimizer and scheduler, and the DDP wrapper that trains it."""
        config, device = self.config, self.device
        self.model = self.task.build_model(self.spec).to(device)
        if device.type == "cuda" and any(m.__class__ is nn.Conv2d for m in self.model.modules()):
            # Module.to takes memory_format at run time; torch's overloads leave it out.
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.optimizer = build_optimizer(
            config["optim"], self.model.parameters(), config["hparams"]
        )
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=config["milestones"], gamma=config["lr_decay"]
        )
        self.train_model: nn.Module = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)

    def _start(self) -> None:
        if self.dist.is_main:
            write_config(self.run_dir, self.config)
            write_metrics(self.run_dir, [])
        self.save()  # so that a Ctrl-C during the first epoch still leaves a resumable run

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.task.load_state_dict(ckpt["task"])
        states = ckpt["rng"]
        set_rng_state(states[self.dist.rank % len(states)], self.device)
        self.epochs_done, self.global_step = ckpt["epoch"], ckpt["global_step"]
        self.elapsed = ckpt["elapsed"]
        self.inside = ckpt.get("inside")
        self.saved_epochs, self.saved_steps = self.epochs_done, self.global_step
        self.saved_inside = self.inside
        kept = [m for m in read_metrics(self.run_dir / METRICS) if m["epoch"] <= self.epochs_done]
        self.metrics = kept
        if self.dist.is_main:
            write_metrics(self.run_dir, kept)
            write_config(self.run_dir, self.config)

    def _gather(self, value: Any) -> list[Any]:
        """``value`` of every rank, in rank order."""
        if not self.dist.enabled:
            return [value]
        import torch.distributed as tdist

        values: list[Any] = [None] * self.dist.world_size
        tdist.all_gather_object(values, value)
        return values

    def save(self, global_step: int | None = None, inside: dict[str, Any] | None = None) -> None:
        """Write the checkpoint: after ``epochs_done`` epochs, or ``inside`` the next one
        at ``global_step``. Every rank must call this at the same step."""
        step = self.global_step if global_step is None else global_step
        states = self._gather(rng_state(self.device))
        if inside is not None:
            inside = {**inside, "task": self._gather(_to_cpu(inside["task"]))}
        if self.dist.is_main:
            payload = {
                "epoch": self.epochs_done,
                "global_step": step,
                "elapsed": self.elapsed,
                "inside": inside,
                "config": self.config,
                "model_spec": self.spec,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "task": self.task.state_dict(),
                "rng": states,
            }
            save_checkpoint(self.run_dir, payload)
        self.saved_epochs, self.saved_steps, self.saved_inside = self.epochs_done, step, inside

    def bound_summary(self) -> dict[str, float]:
        from dynabound.diagnostics import bound_activity

        return bound_activity(self.optimizer).summary()

    def epoch(
        self,
        epoch: int,
        schedule: SaveSchedule,
        lines: ProgressLines,
        signals: StopSignals,
        on_batch: Callable[[int, int], None] | None,
    ) -> dict[str, Any]:
        """Train and evaluate one epoch (from where a checkpoint left it), save, and return
        its metrics record."""
        inside = self.inside if self.inside and self.inside["epoch"] == epoch else None
        self.inside = None
        current = _Epoch(self, epoch, inside, schedule, lines, signals, on_batch)
        record: dict[str, Any] = {"epoch": epoch}
        record.update(self.task.train_epoch(self.train_model, self.optimizer, current.ctx))
        record.update(self.task.evaluate(self.train_model, current.ctx))
        self.scheduler.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._end_epoch(record, current)
        schedule.saved()
        return record

    def _end_epoch(self, record: dict[str, Any], current: _Epoch) -> None:
        """Complete the epoch's record, append it to the metrics and save the checkpoint."""
        epoch_time = current.time()
        self.global_step, self.elapsed = current.ctx.global_step, self.elapsed + epoch_time
        record.update(
            lr=current.lr, epoch_time=epoch_time, time=self.elapsed, steps=self.global_step
        )
        if self.record_bounds:
            record["bounds"] = self.bound_summary()
            if current.early:
                record["bounds_by_step"] = current.early
        self.metrics.append(record)
        if self.dist.is_main:
            append_metrics(self.run_dir, record)
        self.epochs_done = record["epoch"]
        self.save()

    def where_saved(self) -> str:
        if self.saved_inside is not None:
            where = self.saved_inside
            return f"{where['batch']} steps into epoch {where['epoch']}"
        return f"epoch {self.saved_epochs}"


class _Epoch:
    """One epoch in progress: the context its task's loop gets, and what happens after each
    optimizer step (bound records, progress lines, checkpoints, stop requests, on_batch)."""

    def __init__(
        self,
        run: _Run,
        epoch: int,
        inside: dict[str, Any] | None,
        schedule: SaveSchedule,
        lines: ProgressLines,
        signals: StopSignals,
        on_batch: Callable[[int, int], None] | None,
    ):
        self.run, self.epoch = run, epoch
        self.schedule, self.lines, self.signals, self.on_batch = schedule, lines, signals, on_batch
        # Resumed inside the epoch, it keeps the lr it started with, the bound activity
        # recorded so far and the time spent before the stop.
        self.early = list(inside["bounds_by_step"]) if inside else []
        self.lr = inside["lr"] if inside else float(run.optimizer.param_groups[0]["lr"])
        self.spent_before = inside["time"] if inside else 0.0
        self.t0 = time.perf_counter()
        self.ctx = EpochContext(
            epoch=epoch,
            seed=int(run.config["seed"]),
            device=run.device,
            dist=run.dist,
            amp=run.amp,
            raw_model=run.model,
            progress=self.progress,
            on_batch=self.after_step,
            global_step=run.global_step,
            start_batch=inside["batch"] if inside else 0,
            resume_state=inside["task"][run.dist.rank] if inside else None,
        )

    def time(self) -> float:
        """Seconds of training in this epoch, before a resume included."""
        return self.spent_before + time.perf_counter() - self.t0

    def progress(self, iterable: Any, **kwargs: Any) -> Any:
        self.lines.begin_epoch(self.epoch, kwargs.get("total"), kwargs.get("initial", 0))
        return self.run.console.bar(iterable, leave=False, unit="step", **kwargs)

    def after_step(self, i: int, state: Callable[[], EpochState]) -> None:
        run, step = self.run, self.ctx.global_step
        # The Adam-to-SGD transition often finishes inside the first epoch, so bound
        # activity is also recorded at global steps 1, 2, 4, 8, ... (log-many).
        if run.record_bounds and step & (step - 1) == 0:
            self.early.append(run.bound_summary())
        self.lines.step(i + 1, lambda: run.task.running_loss(state()))
        save, stop = self.schedule.after_step(step, self.signals.requested)
        if save:
            run.save(step, self.position(i + 1, state))
            self.schedule.saved()
        if stop:
            raise _StopRequested
        if self.on_batch is not None:
            self.on_batch(self.epoch, i)

    def position(self, batch: int, state: Callable[[], EpochState]) -> dict[str, Any]:
        """Where a checkpoint saved after ``batch`` batches of this epoch resumes from."""
        return {
            "epoch": self.epoch,
            "batch": batch,
            "lr": self.lr,
            "time": self.time(),
            "bounds_by_step": list(self.early),
            "task": state(),
        }


def train(
    config: dict[str, Any],
    run_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    quiet: bool = False,
    progress: bool | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    figures: bool = True,
    checkpoint_every: float | None = CHECKPOINT_EVERY,
    checkpoint_steps: int | None = None,
    progress_every: float | None = PROGRESS_EVERY,
) -> RunResult:
    """Train ``config`` in ``run_dir``; with ``resume`` continue the run saved there.

    ``progress`` shows tqdm bars (default: when stderr is a terminal and not ``quiet``);
    without bars, a progress line is printed every ``progress_every`` seconds inside an
    epoch; ``quiet`` silences both and the per-epoch lines. ``on_batch(epoch, batch)`` is
    called after every optimizer step (after any checkpoint of that step). The checkpoint is
    also written inside epochs every ``checkpoint_every`` seconds and every
    ``checkpoint_steps`` optimizer steps (None or 0: not on that account). A
    KeyboardInterrupt, SIGINT or SIGTERM stops training and returns with
    ``interrupted=True``; the checkpoint then holds the step the signal was handled at, or
    for a KeyboardInterrupt raised elsewhere the last one saved.
    """
    run_dir = Path(run_dir)
    ckpt = None
    if resume:
        if not (run_dir / CHECKPOINT).is_file():
            raise ValueError(f"nothing to resume: {run_dir / CHECKPOINT} does not exist")
        ckpt = load_checkpoint(run_dir / CHECKPOINT, torch.device("cpu"))
        config = check_resume_config(ckpt["config"], config)
    elif (run_dir / CHECKPOINT).exists():
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
    inside = ckpt.get("inside") if ckpt is not None else None
    if inside is not None and len(inside["task"]) != dist.world_size:
        raise ValueError(
            f"{run_dir / CHECKPOINT} was saved inside epoch {inside['epoch']} by "
            f"{len(inside['task'])} process(es); resume it with as many"
        )
    if progress is None:
        progress = sys.stderr.isatty() and not quiet
    console = Console(lines=dist.is_main and not quiet, bars=dist.is_main and bool(progress))
    lines = ProgressLines(
        progress_every if console.enabled and not console.bars else None,
        int(config["epochs"]),
        console.line,
    )
    created = dist.is_main and not run_dir.exists()
    lock = RunLock(run_dir) if dist.is_main else None
    try:
        if lock is not None:
            remove_stale_temporaries(run_dir)
        run = _Run(config, run_dir, cls, dist, device, console, ckpt)
        schedule = SaveSchedule(checkpoint_every, checkpoint_steps, dist, device)
        return _fit(run, schedule, lines, on_batch, figures)
    finally:
        if lock is not None:
            lock.release()
        if created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # a run that failed before writing anything leaves no trace


def _fit(
    run: _Run,
    schedule: SaveSchedule,
    lines: ProgressLines,
    on_batch: Callable[[int, int], None] | None,
    figures: bool,
) -> RunResult:
    console, dist, run_dir = run.console, run.dist, run.run_dir
    epochs = int(run.config["epochs"])
    start = run.epochs_done + 1
    if start <= epochs:
        verb = "resuming" if run.resumed else "training"
        console.line(
            f"{verb} {run.task.name} with {run.config['optim']} on {run.device}"
            + (f" x{dist.world_size} processes" if dist.enabled else "")
            + f": epochs {start}..{epochs} -> {run_dir}"
        )
    epoch_bar = console.bar(total=epochs, initial=start - 1, desc=run.task.name, unit="epoch")
    interrupted = False
    with StopSignals() as signals:
        try:
            for epoch in range(start, epochs + 1):
                record = run.epoch(epoch, schedule, lines, signals, on_batch)
                epoch_bar.update(1)
                console.line(
                    f"epoch {epoch:>3}/{epochs} | {run.task.summary(record)} | "
                    f"{record['epoch_time']:.1f}s"
                )
                if epoch < epochs and schedule.stop_at_epoch_end(signals.requested):
                    raise _StopRequested
        except (KeyboardInterrupt, _StopRequested):
            interrupted = True
        finally:
            epoch_bar.close()
    # An interrupt while saving leaves the previous checkpoint; the metrics of an epoch it
    # does not hold are written again on resume, so they do not count as done.
    metrics = [m for m in run.metrics if m["epoch"] <= run.saved_epochs]
    result = RunResult(run_dir, metrics, interrupted, run.saved_epochs, run.saved_steps)
    if interrupted:
        if dist.is_main:
            print(
                f"\ninterrupted: {run_dir / CHECKPOINT} holds {run.where_saved()} "
                f"(step {run.saved_steps}); continue with --resume --out {run_dir}",
                file=sys.stderr,
                flush=True,
            )
        return result
    if figures and dist.is_main and metrics and start <= epochs:
        paths = run.task.figures(run_dir, metrics)
        if any("bounds" in m for m in metrics):
            from .plots import plot_run_transition

            paths.append(plot_run_transition(run_dir, run_dir / "transition.png"))
        console.line("figures: " + ", ".join(str(p) for p in paths))
    return result


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
