"""What a task provides to the runner, and the pieces the classification tasks share."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dynabound.diagnostics.sign import SignMonitor

__all__ = [
    "ClassificationTask",
    "DistInfo",
    "EpochContext",
    "EpochState",
    "Task",
    "check_positive",
    "derive_seed",
]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any mix of values, stable across processes and Python versions
    (``hash()`` of a string is salted per process, so it cannot be used)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a torch.distributed job (a single process: 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


EpochState = dict[str, Any]


@dataclass
class EpochContext:
    """What a task's epoch loop gets from the runner.

    After every optimizer step the loop calls ``on_batch(i, state)``: ``i`` is the batch
    index in the epoch and ``state()`` returns everything the rest of the epoch depends on
    besides the model, optimizer and global RNGs (running sums, a carried hidden state, a
    generator's state). The runner calls it only when it saves a mid-epoch checkpoint. A
    run resumed from such a checkpoint starts the epoch at batch ``start_batch`` with that
    ``resume_state``, and must then continue exactly as if it had never stopped.
    """

    epoch: int  # 1-based
    seed: int
    device: torch.device
    dist: DistInfo
    amp: bool
    raw_model: nn.Module  # the model without its DDP wrapper
    progress: Callable[..., Iterable[Any]]
    on_batch: Callable[[int, Callable[[], EpochState]], None]
    global_step: int = 0
    start_batch: int = 0
    resume_state: EpochState | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def generator(self, *purpose: Any) -> torch.Generator:
        """A CPU generator seeded from (seed, epoch, purpose): an epoch's data order depends
        only on these and needs no saved state; a generator drawn from batch by batch
        (augmentation) goes into the epoch state for a mid-epoch resume."""
        return torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, *purpose))


class Task:
    """A reproducible experiment: data, model, one training epoch, evaluation.

    Subclasses set the class attributes and implement :meth:`load_data`,
    :meth:`build_model`, :meth:`train_epoch` and :meth:`evaluate`. ``metric`` names the
    figure of merit: ``"accuracy"``, ``"perplexity"`` or ``"regret"``.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    metric: ClassVar[str]
    defaults: ClassVar[dict[str, Any]]  # epochs, batch_size, milestones, lr_decay
    optimizers: ClassVar[tuple[str, ...]]  # what `compare` runs
    supports_distributed: ClassVar[bool] = True

    def __init__(self, config: dict[str, Any], device: torch.device, dist: DistInfo):
        self.config = config
        self.args: dict[str, Any] = dict(config.get("task_args", {}))
        self.device = device
        self.dist = dist
        self.model_spec: dict[str, Any] = {}

    # --- command line -------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse._ArgumentGroup) -> None:
        """Task-specific options; their values land in ``config["task_args"]``."""

    @classmethod
    def task_args(cls, ns: argparse.Namespace) -> dict[str, Any]:
        return {}

    @classmethod
    def check_args(cls, args: dict[str, Any]) -> None:
        """Raise ValueError for a bad task option, before any data is loaded."""

    @classmethod
    def run_name(cls, config: dict[str, Any]) -> str:
        return f"{cls.name}-{config['optim']}"

    @classmethod
    def preset_model(cls, task_args: dict[str, Any]) -> str | None:
        return task_args.get("model")

    # --- the experiment -----------------------------------------------------------------
    @classmethod
    def adjust_hparams(
        cls, optim: str, hparams: dict[str, Any], task_args: dict[str, Any]
    ) -> dict[str, Any]:
        """Final say on the hyperparameters after presets and overrides."""
        return hparams

    def load_data(self) -> None:
        raise NotImplementedError

    def build_model(self, spec: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    def train_epoch(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: EpochContext
    ) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, ctx: EpochContext) -> dict[str, float]:
        raise NotImplementedError

    def running_loss(self, state: EpochState) -> float | None:
        """The mean training loss so far in an epoch, from its ``on_batch`` state (None when
        the task keeps none), for the progress lines."""
        return None

    def summary(self, metrics: dict[str, Any]) -> str:
        """The per-epoch line after the epoch number."""
        return " ".join(
            f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float) and "time" not in k
        )

    def state_dict(self) -> dict[str, Any]:
        """Task state carried across epochs (saved in the checkpoint); state inside an
        epoch goes through ``on_batch`` instead."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def figures(self, run_dir: Path, metrics: list[dict[str, Any]]) -> list[Path]:
        """Figures drawn when a run finishes; the default draws the paper-style curves."""
        from ..plots import plot_runs

        return [plot_runs([run_dir], run_dir / "curves.png")]


def check_positive(args: dict[str, Any], *keys: str) -> None:
    """Each of ``keys`` that is set in ``args`` must be a positive number."""
    for key in keys:
        value = args.get(key)
        if value is not None and not value > 0:
            raise ValueError(f"--{key.replace('_', '-')} must be positive, got {value}")


def _all_reduce_sums(values: list[float], dist: DistInfo, device: torch.device) -> list[float]:
    if not dist.enabled:
        return values
    import torch.distributed as tdist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return t.tolist()


class ClassificationTask(Task):
    """Image or feature classification with the whole data set held in memory.

    Each epoch draws a permutation from a generator seeded by (seed, epoch); under DDP the
    permutation is padded to a multiple of the world size and rank r takes every
    world-size-th index from r, as ``DistributedSampler`` does, so that the ranks' batches
    together are exactly the single-process batch of ``batch_size`` samples.
    """

    metric = "accuracy"
    eval_batch_size: ClassVar[int] = 1000
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def prepare(self, x: torch.Tensor, train: bool, generator: torch.Generator) -> torch.Tensor:
        """Turn stored samples into model inputs (augmentation, normalisation)."""
        return x

    def local_batch_size(self) -> int:
        batch = int(self.config["batch_size"])
        if batch % self.dist.world_size:
            raise ValueError(
                f"batch size {batch} is not divisible by the {self.dist.world_size} processes"
            )
        return batch // self.dist.world_size

    def _shard(self, perm: torch.Tensor) -> torch.Tensor:
        world = self.dist.world_size
        if world == 1:
            return perm
        padded = math.ceil(perm.numel() / world) * world
        if padded > perm.numel():
            perm = torch.cat([perm, perm[: padded - perm.numel()]])
        return perm[self.dist.rank :: world]

    def _batches(self, indices: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
        for start in range(0, indices.numel(), size):
            yield indices[start : start + size]

    def train_epoch(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: EpochContext
    ) -> dict[str, float]:
        model.train()
        n = self.train_x.shape[0]
        order = self._shard(torch.randperm(n, generator=ctx.generator("order")))
        augment = ctx.generator("augment", self.dist.rank)
        size = self.local_batch_size()
        total = math.ceil(order.numel() / size)
        # Sums stay on the device so that a GPU never waits for the host inside the loop.
        loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        correct = torch.zeros((), dtype=torch.int64, device=ctx.device)
        count = 0
        sign = self.sign_monitor(optimizer, total)
        if ctx.resume_state is not None:
            loss_sum = ctx.resume_state["loss_sum"].to(ctx.device).clone()
            correct = ctx.resume_state["correct"].to(ctx.device).clone()
            count = int(ctx.resume_state["count"])
            augment.set_state(ctx.resume_state["augment"])
            if sign is not None and "sign" in ctx.resume_state:
                sign.load_state_dict(ctx.resume_state["sign"])

        def state() -> dict[str, Any]:
            return {
                "loss_sum": loss_sum.clone(),
                "correct": correct.clone(),
                "count": count,
                "augment": augment.get_state(),
                **({"sign": sign.state_dict()} if sign is not None else {}),
            }

        first = ctx.start_batch
        batches = ctx.progress(
            self._batches(order[first * size :], size),
            total=total,
            initial=first,
            desc=f"epoch {ctx.epoch}",
        )
        try:
            for i, idx in enumerate(batches, start=first):
                idx = idx.to(self.train_x.device)
                x = self.prepare(self.train_x[idx], True, augment)
                x = x.to(ctx.device, non_blocking=True)
                y = self.train_y[idx].to(ctx.device, non_blocking=True)
                if self.channels_last(ctx):
                    x = x.contiguous(memory_format=torch.channels_last)
                optimizer.zero_grad(set_to_none=True)
                with ctx.autocast():
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
                loss.backward()
                optimizer.step()
                ctx.global_step += 1
                loss_sum += loss.detach() * y.numel()
                correct += (logits.detach().argmax(1) == y).sum()
                count += y.numel()
                ctx.on_batch(i, state)
        finally:
            if sign is not None:
                sign.remove()
        loss_total, correct_total, count_total = _all_reduce_sums(
            [float(loss_sum), float(correct), float(count)], ctx.dist, ctx.device
        )
        metrics: dict[str, Any] = {
            "train_loss": loss_total / count_total,
            "train_acc": 100.0 * correct_total / count_total,
        }
        if sign is not None:
            metrics["sign"] = sign.summary()
        return metrics

    def running_loss(self, state: EpochState) -> float | None:
        return float(state["loss_sum"]) / state["count"] if state["count"] else None

    # Steps measured per epoch for the sign-descent record: enough for a stable mean, few
    # enough that copying the parameters for them costs nothing noticeable.
    sign_samples: ClassVar[int] = 16

    def sign_monitor(self, optimizer: torch.optim.Optimizer, steps: int) -> SignMonitor | None:
        """A :class:`SignMonitor` on about :attr:`sign_samples` evenly spaced steps of the
        epoch, recorded with the bound activity (not with ``--no-bounds-record``), on the
        main process only."""
        if not self.config.get("record_bounds", True) or not self.dist.is_main:
            return None
        return SignMonitor(optimizer, every=max(1, steps // self.sign_samples))

    def channels_last(self, ctx: EpochContext) -> bool:
        return False

    @torch.no_grad()
    def evaluate(self, model: nn.Module, ctx: EpochContext) -> dict[str, float]:
        model.eval()
        n = self.test_x.shape[0]
        idx_all = torch.arange(n)[self.dist.rank :: self.dist.world_size]
        gen = torch.Generator().manual_seed(0)  # unused: evaluation does not augment
        loss_sum = correct = 0.0
        for idx in self._batches(idx_all, self.eval_batch_size):
            idx = idx.to(self.test_x.device)
            x = self.prepare(self.test_x[idx], False, gen).to(ctx.device, non_blocking=True)
            y = self.test_y[idx].to(ctx.device, non_blocking=True)
            if self.channels_last(ctx):
                x = x.contiguous(memory_format=torch.channels_last)
            with ctx.autocast():
                logits = model(x)
            loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            correct += float((logits.argmax(1) == y).sum())
        loss_sum, correct, count = _all_reduce_sums(
            [loss_sum, correct, float(idx_all.numel())], ctx.dist, ctx.device
        )
        return {"test_loss": loss_sum / count, "test_acc": 100.0 * correct / count}

    def summary(self, metrics: dict[str, Any]) -> str:
        return (
            f"train loss {metrics['train_loss']:.4f} acc {metrics['train_acc']:.2f}% | "
            f"test loss {metrics['test_loss']:.4f} acc {metrics['test_acc']:.2f}%"
        )
