"""When a run saves inside an epoch, and how Ctrl-C or ``kill`` stops it without loss.

After every optimizer step the runner asks :class:`SaveSchedule` whether to write a
checkpoint: every ``every_seconds`` of wall time, every ``every_steps`` optimizer steps,
or because a stop was asked for. :class:`StopSignals` turns the first SIGINT or SIGTERM
into such a request, so the run stops at a step boundary with that step saved; a second
signal interrupts at once (keeping the last checkpoint written).

Under DDP every rank must save at the same step (the save gathers every rank's state), but
clocks and signals differ between ranks: those two reasons are agreed on with one small
all-reduce every ``SYNC_STEPS`` steps. A step count needs no agreement.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from .tasks.base import DistInfo

__all__ = ["CHECKPOINT_EVERY", "SYNC_STEPS", "SaveSchedule", "StopSignals"]

CHECKPOINT_EVERY = 60.0  # seconds of training a kill -9 can cost at most (plus one save)
SYNC_STEPS = 16


class SaveSchedule:
    def __init__(
        self,
        every_seconds: float | None,
        every_steps: int | None,
        dist: DistInfo,
        device: torch.device,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.every_seconds = every_seconds if every_seconds and every_seconds > 0 else None
        self.every_steps = every_steps if every_steps and every_steps > 0 else None
        self.dist = dist
        self.device = device
        self.clock = clock
        self.last = clock()

    def saved(self) -> None:
        """A checkpoint was just written (inside or at the end of an epoch)."""
        self.last = self.clock()

    def after_step(self, global_step: int, stop_requested: bool) -> tuple[bool, bool]:
        """(save now, then stop) after optimizer step ``global_step``."""
        by_steps = self.every_steps is not None and global_step % self.every_steps == 0
        by_time = self.every_seconds is not None and self.clock() - self.last >= self.every_seconds
        stop = stop_requested
        if self.dist.enabled:
            if global_step % SYNC_STEPS:
                return by_steps, False
            by_time, stop = self._any_rank(by_time, stop)
        return by_steps or by_time or stop, stop

    def stop_at_epoch_end(self, stop_requested: bool) -> bool:
        if not self.dist.enabled:
            return stop_requested
        return self._any_rank(False, stop_requested)[1]

    def _any_rank(self, *flags: bool) -> tuple[bool, ...]:
        import torch.distributed as tdist

        t = torch.tensor([float(f) for f in flags], device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())


class StopSignals:
    """While active (a context manager), the first SIGINT or SIGTERM sets ``requested``
    and a second raises KeyboardInterrupt. Signals can only be caught in the main thread;
    elsewhere this does nothing and the signals keep their handlers."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            # None: a handler installed outside Python, which cannot be put back as such.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()
