"""A run directory on disk: its files, how they are written, read back and locked.

``config.json`` (the run's configuration), ``metrics.jsonl`` (one JSON object per finished
epoch, appended), ``checkpoint.pt`` (replaced atomically: at the start, inside epochs and
after every epoch), ``environment.jsonl`` (one line per start or resume: the code, versions,
threads and machine, see :mod:`.environment`) and ``.lock`` (the pid of the process
training there). Every other module
of the harness reads and writes run directories through this one.

A checkpoint holds only tensors, numbers, strings, lists and dicts, and is loaded with
``torch.load(weights_only=True)``: resuming a run directory someone else shared cannot run
code from it. One written in the earlier format (``dynabound-run/1``, which held numpy's
generator state as a numpy array) is refused with a message; :func:`convert_checkpoint`
rewrites it on request, for a file the user trusts. A file that is not a checkpoint at all
(empty, truncated, text, another zip archive) is a :class:`DamagedCheckpointError`, never
mistaken for one that would run code.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import secrets
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHECKPOINT",
    "CONFIG",
    "FORMAT",
    "DamagedCheckpointError",
    "METRICS",
    "RunLock",
    "UnsafeCheckpointError",
    "append_environment",
    "append_metrics",
    "atomic_write",
    "convert_checkpoint",
    "estimated_final_lr",
    "find_runs",
    "load_checkpoint",
    "load_run",
    "read_metrics",
    "remove_stale_temporaries",
    "save_checkpoint",
    "write_config",
    "write_metrics",
]

CONFIG, METRICS, CHECKPOINT = "config.json", "metrics.jsonl", "checkpoint.pt"
ENVIRONMENT = "environment.jsonl"
LOCK = ".lock"
# The checkpoint's layout; a change that older code cannot read gets a new number.
FORMAT = "dynabound-run/2"
FORMAT_1 = "dynabound-run/1"
_TEMPORARY = ".{name}.{pid}.{token}.tmp"


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write ``path`` through ``write(file)`` so that a reader, or a kill at any moment,
    sees either the old content or the new, never a mix."""
    path = Path(path)
    # Next to the target, so that os.replace is an atomic rename on the same file system.
    tmp = path.with_name(
        _TEMPORARY.format(name=path.name, pid=os.getpid(), token=secrets.token_hex(4))
    )
    # Created like any other new file (0666 less the umask); tempfile.mkstemp would make
    # it 0600 whatever the umask, and the rename keeps the mode.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete the half-written temporaries a killed process left behind; call it only
    while holding the run's lock, when no other writer can exist."""
    for name in (CONFIG, METRICS, CHECKPOINT):
        for tmp in Path(run_dir).glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    text = json.dumps(config, indent=2) + "\n"
    atomic_write(Path(run_dir) / CONFIG, lambda fh: fh.write(text), mode="w")


def write_metrics(run_dir: Path, records: list[dict[str, Any]]) -> None:
    """Replace ``metrics.jsonl`` with ``records``."""
    text = "".join(json.dumps(m) + "\n" for m in records)
    atomic_write(Path(run_dir) / METRICS, lambda fh: fh.write(text), mode="w")


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(Path(run_dir) / METRICS, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def append_environment(run_dir: Path, record: dict[str, Any]) -> None:
    with open(Path(run_dir) / ENVIRONMENT, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The epochs recorded in a ``metrics.jsonl`` (a torn last line from a kill is skipped)."""
    records: list[dict[str, Any]] = []
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


def read_config(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """A run directory's ``config.json``; a damaged one is a ValueError naming the file."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a run directory (no {CONFIG})")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is damaged: it is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or "task" not in config or "optim" not in config:
        raise ValueError(f"{path} is not a dynabound run configuration (no task and optim)")
    return config


def load_run(run_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(config, metrics) of a run directory."""
    return read_config(run_dir), read_metrics(Path(run_dir) / METRICS)


def estimated_final_lr(metrics: list[dict[str, Any]]) -> float:
    """The final_lr a ``final_lr="auto"`` run used at the end of its last recorded epoch
    (its fixed estimate, once fixed): ``bounds.final_lr`` of the last metrics record, or the
    first param group's ``bounds.final_lr/0``. NaN when the run recorded no bounds."""
    for record in reversed(metrics):
        bounds = record.get("bounds") or {}
        value = bounds.get("final_lr", bounds.get("final_lr/0"))
        if value is not None:
            return float(value)
    return float("nan")


def find_runs(path: str | os.PathLike[str]) -> list[Path]:
    """``path`` if it is a run directory, else the run directories below it (a compare's or
    sweep's output: OUT/<optimizer>, OUT/<optimizer>/seed-<SEED>), sorted by path with
    numbers in order (seed-2 before seed-10)."""
    import re

    path = Path(path)
    if (path / CONFIG).is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"{path} is not a run directory (no {CONFIG})")
    found = [p.parent for p in path.rglob(CONFIG)]
    if not found:
        raise ValueError(f"{path} holds no run directories (no {CONFIG} below it)")

    def key(p: Path) -> list[Any]:
        parts = re.split(r"(\d+)", str(p.relative_to(path)))
        return [int(x) if x.isdigit() else x for x in parts]

    return sorted(found, key=key)


def save_checkpoint(run_dir: Path, payload: dict[str, Any]) -> None:
    payload = {"format": FORMAT, **payload}
    atomic_write(Path(run_dir) / CHECKPOINT, lambda fh: torch.save(payload, fh))


class DamagedCheckpointError(ValueError):
    """A file that cannot be read as a checkpoint at all: empty, truncated, or not what
    ``torch.save`` writes. Unlike :class:`UnsafeCheckpointError`, trusting it cannot help."""

    def __init__(self, path: Path, problem: str):
        path = Path(path)
        super().__init__(
            f"damaged checkpoint: {path} {problem}. It cannot be loaded, with or without "
            "--trust; restore it from a copy, or start the run again with another --out"
        )


class UnsafeCheckpointError(ValueError):
    """A checkpoint the weights-only loader refuses: loading it would run code from it."""

    def __init__(self, path: Path):
        path = Path(path)
        held = _unsafe_globals(path)
        super().__init__(
            f"{path} cannot be loaded safely: it holds objects other than tensors, numbers, "
            f"strings, lists and dicts{f' ({held})' if held else ''}, and unpickling those "
            f"can run any code. A checkpoint written before format {FORMAT} holds numpy's "
            f"generator state that way; if you trust this file, convert it once with "
            f"`dynabound convert-checkpoint {path.parent} --trust`"
        )


def _unsafe_globals(path: Path) -> str:
    """What the file would import when unpickled, found without unpickling it."""
    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if scan is None:  # torch < 2.5
        return ""
    try:
        return ", ".join(sorted(scan(path)))
    except Exception:
        return ""


# How every zip archive, and so every file torch.save writes, begins.
_ZIP_MAGIC = b"PK\x03\x04"


def _damage(path: Path) -> str | None:
    """What makes ``path`` unreadable as a ``torch.save`` file, found from its layout
    alone (nothing is unpickled), or None when it looks like one."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    with open(path, "rb") as fh:
        head = fh.read(16)
    if not head.startswith(_ZIP_MAGIC):
        return (
            f"is not a checkpoint: torch.save writes a zip archive, and this file starts "
            f"with {head!r}"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return (
            f"is truncated: a zip archive that stops after {size} bytes, without the "
            "directory that ends one"
        )
    if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
        return "is a zip archive that torch.save did not write (no data.pkl in it)"
    return None


def _torch_load(path: Path, device: torch.device | str, *, trust: bool = False) -> Any:
    """``torch.load`` with the weights-only unpickler (the full one with ``trust``), its
    failures sorted into a damaged file and one that would run code."""
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    problem = _damage(path)
    if problem is not None:
        raise DamagedCheckpointError(path, problem)
    try:
        return torch.load(path, map_location=device, weights_only=not trust)
    except pickle.UnpicklingError as exc:
        can_scan = hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint")
        if not trust and (not can_scan or _unsafe_globals(path)):
            raise UnsafeCheckpointError(path) from exc
        # Refused with no import to run (or by the full unpickler): the data is broken.
        raise DamagedCheckpointError(
            path, f"holds data that cannot be unpickled ({_first_line(exc)})"
        ) from exc
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise DamagedCheckpointError(path, f"cannot be read ({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    path = Path(path)
    ckpt = _torch_load(path, device)
    if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT_1:
        raise ValueError(
            f"{path} was written in the earlier format {FORMAT_1}; convert it once with "
            f"`dynabound convert-checkpoint {path.parent}`"
        )
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a dynabound run checkpoint ({_what(ckpt)})")
    return ckpt


def _what(ckpt: Any) -> str:
    """What a loaded file holds instead of a run checkpoint, for an error message."""
    if not isinstance(ckpt, dict):
        return f"it holds a {type(ckpt).__name__}"
    keys = ", ".join(map(str, list(ckpt)[:6])) + (", ..." if len(ckpt) > 6 else "")
    if "format" in ckpt:
        return f"its format is {ckpt['format']!r}, not {FORMAT!r}"
    return f"it holds a dict with keys {keys or '(none)'} and no format entry"


def convert_checkpoint(run_dir: str | os.PathLike[str], *, trust: bool = False) -> bool:
    """Rewrite ``run_dir``'s checkpoint from format ``dynabound-run/1`` into the current one;
    False if it is current already. A file the weights-only loader refuses is unpickled in
    full only with ``trust``: that runs whatever code the file holds."""
    from .generators import numpy_state, python_state

    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise ValueError(f"{run_dir} has no {CHECKPOINT}")
    lock = RunLock(run_dir)
    try:
        try:
            ckpt = _torch_load(path, "cpu")
        except UnsafeCheckpointError:
            if not trust:
                raise
            ckpt = _torch_load(path, "cpu", trust=True)
        if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT:
            return False
        if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_1:
            raise ValueError(f"{path} is not a dynabound run checkpoint ({_what(ckpt)})")
        rng = [
            {**s, "numpy": numpy_state(s["numpy"]), "python": python_state(s["python"])}
            for s in ckpt["rng"]
        ]
        buffer = io.BytesIO()
        torch.save({**ckpt, "format": FORMAT, "rng": rng}, buffer)
        data = buffer.getvalue()
        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ValueError(
                f"{path} holds objects besides the generator states that a safe checkpoint "
                "cannot hold; it was left unchanged"
            ) from exc
        atomic_write(path, lambda fh: fh.write(data))
        return True
    finally:
        lock.release()


class RunLock:
    """``run_dir/.lock`` holding our pid: two processes must not train into one run
    directory. A lock whose process has died (a ``kill -9``) is taken over."""

    def __init__(self, run_dir: Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / LOCK
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
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
