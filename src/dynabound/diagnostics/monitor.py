"""BoundMonitor: effective-rate and bound-activity summaries every N optimizer steps."""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from torch.optim import Optimizer

from ..optim import AdaBound
from .rates import Names, bound_activity, check_supported, effective_lr, rate_statistics

__all__ = ["BoundMonitor", "read_records"]


class BoundMonitor:
    """Record effective-rate statistics (and bound fractions) every ``every`` steps.

    Registers a step post-hook on ``optimizer``. Each recorded row is a flat dict with
    ``step`` (the largest per-parameter step count, or the number of steps seen for SGD),
    ``rate_min``, ``rate_q{q}`` for each of ``quantiles``, ``rate_max`` and, for dynabound
    optimizers, everything in :meth:`BoundActivity.summary` (``lower``, ``upper``, ``free``,
    ``transition``, ``lower_bound``, ``upper_bound``, ...). ``per_param=True`` adds
    ``{name}/lower``, ``{name}/upper``, ``{name}/free`` per parameter (names from ``names``:
    a module or ``(name, param)`` pairs), which :func:`plot_transition` draws per layer.

    Rows go to :attr:`records`, to ``csv_path`` (one header, flushed after each row; an
    existing file is appended to with its own header) and to TensorBoard under
    ``tensorboard_dir`` when ``torch.utils.tensorboard`` can be imported (a warning
    otherwise). Between recordings the hook only increments a counter. Use as a context
    manager or call :meth:`remove` to detach and close the files; :meth:`record` takes a
    row immediately (e.g. at the end of an epoch).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        every: int = 100,
        csv_path: str | os.PathLike[str] | None = None,
        tensorboard_dir: str | os.PathLike[str] | None = None,
        quantiles: Sequence[float] = (0.01, 0.5, 0.99),
        *,
        names: Names = None,
        per_param: bool = False,
        rtol: float = 1e-6,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        for q in quantiles:
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"quantiles must lie in [0, 1], got {q}")
        check_supported(optimizer)
        self.optimizer = optimizer
        self.every = every
        self.quantiles = tuple(quantiles)
        self.names = names
        self.per_param = per_param
        self.rtol = rtol
        self.records: list[dict[str, float]] = []
        self.calls = 0
        self.csv_path = Path(csv_path) if csv_path is not None else None
        self._csv_file: TextIO | None = None
        self._csv_writer: csv.DictWriter | None = None
        self._warned_columns = False
        self._tensorboard = _open_tensorboard(tensorboard_dir) if tensorboard_dir else None
        self._handle = optimizer.register_step_post_hook(self._after_step)

    def _after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.calls += 1
        if self.calls % self.every == 0:
            self.record()

    def record(self) -> dict[str, float]:
        """Compute one row now, store it and write it out; returns the row."""
        row: dict[str, float] = {}
        if isinstance(self.optimizer, AdaBound):
            activity = bound_activity(
                self.optimizer, self.rtol, names=self.names, quantiles=self.quantiles
            )
            row.update(activity.summary())
            if activity.step == 0:
                row["step"] = float(self.calls)
            if self.per_param:
                row.update(activity.per_param())
        else:
            row["step"] = float(_largest_step(self.optimizer) or self.calls)
            row.update(rate_statistics(effective_lr(self.optimizer).values(), self.quantiles))
        self.records.append(row)
        self._write_csv(row)
        if self._tensorboard is not None:
            step = int(row["step"])
            for key, value in row.items():
                if key != "step" and math.isfinite(value):
                    self._tensorboard.add_scalar(f"dynabound/{key}", value, step)
            self._tensorboard.flush()
        return row

    def _write_csv(self, row: dict[str, float]) -> None:
        if self.csv_path is None:
            return
        if self._csv_writer is None:
            self.csv_path.parent.mkdir(parents=True, exist_ok=True)
            header = _existing_header(self.csv_path)
            self._csv_file = self.csv_path.open("a", newline="", encoding="utf-8")
            self._csv_writer = csv.DictWriter(
                self._csv_file, fieldnames=header or list(row), extrasaction="ignore", restval=""
            )
            if header is None:
                self._csv_writer.writeheader()
        missing = [key for key in row if key not in self._csv_writer.fieldnames]
        if missing and not self._warned_columns:
            self._warned_columns = True
            warnings.warn(
                f"{self.csv_path} has no columns for {missing[:3]} (and maybe more): those "
                "values are kept in .records only",
                UserWarning,
                stacklevel=3,
            )
        self._csv_writer.writerow(row)
        assert self._csv_file is not None
        self._csv_file.flush()

    def remove(self) -> None:
        """Detach the hook and close the CSV and TensorBoard writers (idempotent)."""
        self._handle.remove()
        if self._csv_file is not None:
            self._csv_file.close()
            self._csv_file, self._csv_writer = None, None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def __enter__(self) -> BoundMonitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def _largest_step(optimizer: Optimizer) -> float:
    steps = [float(s["step"]) for s in optimizer.state.values() if "step" in s]
    return max(steps, default=0.0)


def _existing_header(path: Path) -> list[str] | None:
    if not path.exists() or path.stat().st_size == 0:
        return None
    with path.open(newline="", encoding="utf-8") as f:
        return next(csv.reader(f), None)


def _open_tensorboard(log_dir: str | os.PathLike[str]) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        warnings.warn(
            f"TensorBoard logging is off ({error}); install the 'tensorboard' package to "
            "enable it. Records still go to .records and the CSV.",
            UserWarning,
            stacklevel=3,
        )
        return None
    return SummaryWriter(log_dir=str(log_dir))


def read_records(csv_path: str | os.PathLike[str]) -> list[dict[str, float]]:
    """Rows of a CSV written by :class:`BoundMonitor` (empty cells become NaN)."""
    with Path(csv_path).open(newline="", encoding="utf-8") as f:
        return [
            {key: float(value) if value != "" else math.nan for key, value in row.items()}
            for row in csv.DictReader(f)
        ]
