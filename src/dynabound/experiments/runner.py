"""The training loop: run directories, atomic checkpoints, exact resume, metrics, DDP.

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
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .optimizers import build_optimizer, is_dynabound
from .presets import preset
from .tasks import DistInfo, EpochContext, Task, get_task
from .tasks.base import derive_seed

__all__ = [
    "CHECKPOINT",
    "CONFIG",
    "METRICS",
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

CONFIG, METRICS, CHECKPOINT = "config.json", "metrics.jsonl", "checkpoint.pt"
_FORMAT = "dynabound-run/1"
# Options that may differ when a run is resumed; everything else must match the saved run.
RESUMABLE_CHANGES = ("epochs", "device", "amp", "data_dir", "download")


@dataclass
class RunResult:
    run_dir: Path
    metrics: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    epochs_done: int = 0


def build_config(
    task: str,
    optim: str,
    *,
    hparams: dict[str, Any] | None = None,
    task_args: dict[str, Any] | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    milestones: list[int] | None = None,
    lr_decay: float | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    device: str = "auto",
    amp: bool | None = None,
    record_bounds: bool = True,
) -> dict[str, Any]:
    """A complete run configuration: the task's defaults and the paper's presets, with
    every value given here taking precedence."""
    cls = get_task(task)
    args = {k: v for k, v in (task_args or {}).items() if v is not None}
    values = preset(task, optim, hparams, model=cls.preset_model(args))
    values = cls.adjust_hparams(optim.lower(), values, args)
    d = cls.defaults
    config = {
        "task": task,
        "optim": optim.lower(),
        "hparams": values,
        "task_args": args,
        "epochs": int(d["epochs"] if epochs is None else epochs),
        "batch_size": int(d["batch_size"] if batch_size is None else batch_size),
        "seed": int(seed),
        "milestones": list(d["milestones"] if milestones is None else milestones),
        "lr_decay": float(d["lr_decay"] if lr_decay is None else lr_decay),
        "data_dir": str(data_dir if data_dir is not None else "data"),
        "download": bool(download),
        "device": device,
        "amp": amp,
        "record_bounds": bool(record_bounds),
    }
    if config["epochs"] < 1 or config["batch_size"] < 1:
        raise ValueError("epochs and batch size must be positive")
    return json.loads(json.dumps(config))  # tuples become lists, as after a reload


# --- devices and processes ------------------------------------------------------------------


def resolve_device(request: str | None, dist: DistInfo | None = None) -> torch.device:
    request = request or "auto"
    if request not in ("auto", "cpu", "cuda") and not request.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda, got {request!r}")
    if request == "auto":
        request = "cuda" if torch.cuda.is_available() else "cpu"
    if request.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but CUDA is not available")
        if request == "cuda":
            index = dist.local_rank if dist is not None else 0
            request = f"cuda:{index}"
        device = torch.device(request)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def _env_dist() -> DistInfo:
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
    info = _env_dist()
    device = resolve_device(device_request, info)
    if info.enabled:
        import torch.distributed as tdist

        if not tdist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            tdist.init_process_group(backend=backend)
    return info, device


def shutdown_distributed() -> None:
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


# --- files ------------------------------------------------------------------------------------


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    # The temporary file sits next to the target so that os.replace is an atomic rename.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The epochs recorded in a ``metrics.jsonl`` (a torn last line from a kill is skipped)."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def load_run(run_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(config, metrics) of a run directory."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise ValueError(f"{run_dir} is not a run directory (no {CONFIG})")
    config = json.loads((run_dir / CONFIG).read_text())
    return config, read_metrics(run_dir / METRICS)


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


class _RunLock:
    """``run_dir/.lock`` holding our pid: two processes must not train into one run
    directory. A lock whose process has died (a ``kill -9``) is taken over."""

    def __init__(self, run_dir: Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / ".lock"
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise ValueError(f"{run_dir} is in use by process {pid}") from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            return
        raise ValueError(f"cannot lock {run_dir}")

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    # Checkpoints hold numpy and Python RNG states, which the weights-only loader refuses;
    # they are files this program wrote, so the full loader is used.
    ckpt = torch.load(path, map_location=device, weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a dynabound run checkpoint")
    return ckpt


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


def _check_resume_config(saved: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    merged = dict(saved)
    diffs = []
    for key, value in given.items():
        if key in RESUMABLE_CHANGES:
            merged[key] = value
        elif saved.get(key) != value:
            diffs.append(f"{key}: saved {saved.get(key)!r}, given {value!r}")
    if diffs:
        raise ValueError(
            "cannot resume with a different configuration (only "
            f"{', '.join(RESUMABLE_CHANGES)} may change):\n  " + "\n  ".join(diffs)
        )
    return merged


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
        ckpt = _load_checkpoint(ckpt_path, torch.device("cpu"))
        config = _check_resume_config(ckpt["config"], config)
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
    if progress is None:
        progress = sys.stderr.isatty() and not quiet
    console = _Console(lines=dist.is_main and not quiet, bars=dist.is_main and bool(progress))
    amp = device.type == "cuda" if config.get("amp") is None else bool(config["amp"])
    if device.type == "cuda":
        # Fixed input shapes: let cuDNN pick the fastest kernels (GPU runs are not promised
        # to be bit-reproducible; CPU runs are).
        torch.backends.cudnn.benchmark = True

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

    lock = _RunLock(run_dir) if dist.is_main else None
    try:
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
                lines = "".join(json.dumps(m) + "\n" for m in metrics)
                _atomic_write(run_dir / METRICS, lambda fh: fh.write(lines), mode="w")
                (run_dir / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        elif dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(
                run_dir / CONFIG, lambda fh: fh.write(json.dumps(config, indent=2) + "\n"), "w"
            )
            _atomic_write(run_dir / METRICS, lambda fh: None, mode="w")

        def save(epoch: int) -> None:
            states = [_rng_state(device)]
            if dist.enabled:
                import torch.distributed as tdist

                states = [None] * dist.world_size
                tdist.all_gather_object(states, _rng_state(device))
            if not dist.is_main:
                return
            payload = {
                "format": _FORMAT,
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
            _atomic_write(ckpt_path, lambda fh: torch.save(payload, fh))

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
        record_bounds = (
            config.get("record_bounds", True) and is_dynabound(optimizer) and dist.is_main
        )
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
                    with open(run_dir / METRICS, "a") as fh:
                        fh.write(json.dumps(record) + "\n")
                save(epoch)
                saved = epoch
                epoch_bar.update(1)
                console.line(
                    f"epoch {epoch:>3}/{epochs} | {task.summary(record)} | {epoch_time:.1f}s"
                )
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
    finally:
        if lock is not None:
            lock.release()


def restore(
    run_dir: str | os.PathLike[str], device: str = "cpu"
) -> tuple[Task, nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    """Rebuild a run's task, model and optimizer from its checkpoint (no data is loaded)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise ValueError(f"{run_dir} has no {CHECKPOINT}")
    dev = resolve_device(device)
    ckpt = _load_checkpoint(path, dev)
    config = ckpt["config"]
    task = get_task(config["task"])(config, dev, DistInfo())
    model = task.build_model(ckpt["model_spec"]).to(dev)
    model.load_state_dict(ckpt["model"])
    optimizer = build_optimizer(config["optim"], model.parameters(), config["hparams"])
    optimizer.load_state_dict(ckpt["optimizer"])
    return task, model, optimizer, ckpt
