"""What a run prints while it trains: per-epoch lines, and tqdm bars on a terminal."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["Console"]


class Console:
    """Per-epoch lines (unless quiet) and, on a terminal, tqdm bars."""

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
