"""What a run prints while it trains: tqdm bars on a terminal, and otherwise (output going
to a file or a pipe) a progress line at a steady pace, so a log shows the run is alive."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["PROGRESS_EVERY", "Console", "ProgressLines", "format_duration"]

PROGRESS_EVERY = 30.0  # seconds between progress lines when the output is not a terminal


class Console:
    """Per-epoch lines (unless quiet) and, on a terminal, tqdm bars."""

    def __init__(self, lines: bool, bars: bool):
        self.enabled = lines
        self.bars = bars
        self._tqdm: Any = None
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
        if self.iterable is None:  # as tqdm(None): a bar without one only counts update()s
            raise TypeError("this progress bar has no iterable")
        return iter(self.iterable)

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def format_duration(seconds: float) -> str:
    """``75`` -> ``1m15s``, ``7300`` -> ``2h01m``: short enough for a log line."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressLines:
    """One line every ``every`` seconds inside an epoch:
    ``epoch 3/40 | step 120/1327 | loss 4.8123 | 12.3 steps/s | ETA 1m38s``.

    The rate counts the steps this process has taken in the epoch (a resumed epoch's
    earlier steps are not timed here), and the ETA is the epoch's remaining steps at it.
    """

    def __init__(
        self,
        every: float | None,
        epochs: int,
        write: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.every = every if every and every > 0 else None
        self.epochs = epochs
        self.write = write
        self.clock = clock
        self.epoch = 0
        self.total: int | None = None
        self.first_step = 0
        self.started = self.last = 0.0

    def begin_epoch(self, epoch: int, total: int | None, done: int) -> None:
        """``done`` steps of the epoch were taken before (a resumed epoch)."""
        self.epoch, self.total, self.first_step = epoch, total, done
        self.started = self.last = self.clock()

    def step(self, done: int, loss: Callable[[], float | None]) -> None:
        """After the epoch's ``done``-th step; ``loss()`` is called only when a line is due,
        since reading a running sum from a GPU waits for it."""
        if self.every is None:
            return
        now = self.clock()
        if now - self.last < self.every:
            return
        self.last = now
        rate = (done - self.first_step) / max(now - self.started, 1e-9)
        parts = [f"epoch {self.epoch}/{self.epochs}"]
        if self.total:
            parts.append(f"step {done}/{self.total}")
        else:
            parts.append(f"step {done}")
        value = loss()
        if value is not None:
            parts.append(f"loss {value:.4f}")
        parts.append(f"{rate:.3g} steps/s")
        if self.total:
            parts.append(f"ETA {format_duration((self.total - done) / max(rate, 1e-9))}")
        self.write(" | ".join(parts))
