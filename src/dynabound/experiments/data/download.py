"""Verified, atomic downloads and the error raised when data is missing offline."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DataFormatError",
    "DataUnavailableError",
    "DownloadError",
    "RemoteFile",
    "download",
    "md5sum",
    "require_files",
]

_CHUNK = 1 << 20


class DataUnavailableError(RuntimeError):
    """Data files are missing and downloading was not requested.

    The message names the missing files, every URL they can be fetched from, and the
    directory to put them in, so that users without internet access can copy them by hand.
    """

    def __init__(
        self,
        dataset: str,
        directory: Path | str,
        missing: Sequence[RemoteFile],
        note: str = "",
    ):
        self.dataset = dataset
        self.directory = Path(directory)
        self.missing = tuple(missing)
        lines = [
            f"{dataset} data not found in {self.directory} (missing: "
            f"{', '.join(f.filename for f in self.missing)}).",
            "Either pass download=True (command line: --download) to fetch it, or download "
            "these files yourself and place them in that directory (pass it as --data-dir):",
        ]
        for f in self.missing:
            checksum = f" (md5 {f.md5})" if f.md5 else ""
            lines.append(f"  {f.filename}{checksum}:")
            lines.extend(f"    {url}" for url in f.urls)
        if note:
            lines.append(note)
        super().__init__("\n".join(lines))


class DataFormatError(ValueError):
    """A data file exists but its contents are not in the expected format (corrupt or wrong)."""


class DownloadError(RuntimeError):
    """Every URL for a file failed (network error or checksum mismatch)."""


@dataclass(frozen=True)
class RemoteFile:
    """A file of a data set: its name on disk, its md5 (or None) and its mirrors, best first."""

    filename: str
    md5: str | None
    urls: tuple[str, ...]


def md5sum(path: str | os.PathLike[str]) -> str:
    """Hex md5 digest of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _progress_bar(total: int | None, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm belongs to the [experiments] extra; downloads work without it
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)


def _fetch_one(url: str, dest: Path, md5: str | None, timeout: float, progress: bool) -> None:
    # The temporary file lives next to the destination so that os.replace is atomic (same
    # file system) and an interrupted download never leaves a truncated file under the
    # final name.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            bar = _progress_bar(int(length) if length else None, dest.name, progress)
            try:
                for chunk in iter(lambda: resp.read(_CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if md5 is not None and got != md5.lower():
            raise DownloadError(f"md5 mismatch for {url}: expected {md5}, got {got}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def download(
    url: str | Iterable[str],
    dest_path: str | os.PathLike[str],
    md5: str | None,
    *,
    timeout: float = 60.0,
    progress: bool | None = None,
) -> Path:
    """Download ``url`` to ``dest_path`` and return the path.

    ``url`` may be a list of mirrors, tried in order until one yields the expected md5.
    An existing file with the right md5 is kept without touching the network. The file
    appears under its final name only when complete and verified. ``md5=None`` skips the
    check (for archives whose members are verified after extraction).
    """
    urls = [url] if isinstance(url, str) else list(url)
    if not urls:
        raise ValueError("download() needs at least one URL")
    dest = Path(dest_path)
    if dest.is_file() and (md5 is None or md5sum(dest) == md5.lower()):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if progress is None:
        progress = sys.stderr.isatty()
    errors = []
    for u in urls:
        try:
            _fetch_one(u, dest, md5, timeout, progress)
            return dest
        except (OSError, DownloadError) as exc:  # URLError and HTTPError are OSErrors
            errors.append(f"  {u}: {exc}")
    raise DownloadError(f"could not download {dest.name}; tried:\n" + "\n".join(errors))


def require_files(
    dataset: str,
    directory: str | os.PathLike[str],
    files: Sequence[RemoteFile],
    *,
    download_missing: bool,
) -> dict[str, Path]:
    """Paths of ``files`` inside ``directory``, downloading the missing ones if allowed.

    Raises DataUnavailableError listing every missing file when downloading is not allowed.
    """
    directory = Path(directory)
    missing = [f for f in files if not (directory / f.filename).is_file()]
    if missing and not download_missing:
        raise DataUnavailableError(dataset, directory, missing)
    for f in missing:
        download(f.urls, directory / f.filename, f.md5)
    return {f.filename: directory / f.filename for f in files}
