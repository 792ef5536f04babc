"""CIFAR-10 from the python pickle batches of ``cifar-10-python.tar.gz``."""

from __future__ import annotations

import importlib
import os
import pickle
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from .download import DataFormatError, DataUnavailableError, RemoteFile
from .download import download as fetch

__all__ = [
    "CIFAR10",
    "CIFAR10_ARCHIVE",
    "CIFAR10_MEAN",
    "CIFAR10_PIXEL_STD",
    "CIFAR10_STD",
    "extract_cifar10",
    "load_cifar10",
]

CIFAR10_ARCHIVE = RemoteFile(
    "cifar-10-python.tar.gz",
    "c58f30108f718f92721af3b95e74349a",
    ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
)
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"

# Per-channel (RGB) statistics of the training images scaled to [0, 1]. CIFAR10_STD is the
# normalisation of the paper's reference training script (kept so that runs reproduce it);
# the true per-channel pixel standard deviation is CIFAR10_PIXEL_STD.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR10_PIXEL_STD = (0.2470, 0.2435, 0.2616)


class CIFAR10(NamedTuple):
    train_images: torch.Tensor  # uint8 [N, 32, 32, 3] (NHWC, as stored)
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor
    test_labels: torch.Tensor


# The batches are pickles, and unpickling can run arbitrary code, so only what a pickled
# dict of numpy arrays and lists needs is allowed. numpy 2 renamed numpy.core to numpy._core.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data batch")
        if module.startswith("numpy.core."):
            try:
                return getattr(importlib.import_module("numpy._core." + module[11:]), name)
            except ImportError:  # numpy < 2
                pass
        return getattr(importlib.import_module(module), name)


def _read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with open(path, "rb") as fh:
            batch = _SafeUnpickler(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DataFormatError(f"{path}: not a CIFAR-10 pickle batch ({exc})") from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataFormatError(f"{path}: expected a dict with b'data' and b'labels'")
    data = torch.as_tensor(batch[b"data"])
    labels = torch.as_tensor(list(batch[b"labels"]), dtype=torch.int64)
    if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataFormatError(
            f"{path}: data has dtype {data.dtype} and shape {list(data.shape)}, "
            "expected uint8 [N, 3072]"
        )
    if labels.shape != (data.shape[0],):
        raise DataFormatError(f"{path}: {labels.numel()} labels for {data.shape[0]} images")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > 9):
        raise DataFormatError(f"{path}: labels outside 0..9")
    # Rows are stored channel-major (1024 red, 1024 green, 1024 blue values).
    images = data.reshape(-1, 3, 32, 32).permute(0, 2, 3, 1).contiguous()
    return images, labels


def _read_folder(folder: Path, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [_read_batch(folder / name) for name in names]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def extract_cifar10(archive: str | os.PathLike[str], dest_root: str | os.PathLike[str]) -> Path:
    """Extract the six batches of ``archive`` into ``dest_root/cifar-10-batches-py``.

    Only the expected members are read and written under fixed names, so a hostile archive
    cannot write elsewhere (no path traversal, no links). The folder appears atomically.
    """
    dest_root = Path(dest_root)
    target = dest_root / FOLDER
    wanted = {f"{FOLDER}/{name}" for name in (*TRAIN_BATCHES, TEST_BATCH)}
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER}.", dir=dest_root))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar:
                    name = member.name.removeprefix("./")
                    if name not in wanted:
                        continue
                    src = tar.extractfile(member) if member.isfile() else None
                    if src is None:
                        raise DataFormatError(f"{archive}: {name} is not a regular file")
                    with src, open(tmp / name.rsplit("/", 1)[1], "wb") as out:
                        shutil.copyfileobj(src, out)
                    wanted.discard(name)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DataFormatError(f"{archive}: cannot read the archive ({exc})") from exc
        if wanted:
            raise DataFormatError(f"{archive}: missing members {sorted(wanted)}")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _find(root: Path) -> tuple[Path | None, Path | None]:
    folder = archive = None
    for base in (root, root / "cifar10", root / "cifar-10"):
        if folder is None and (base / FOLDER / TEST_BATCH).is_file():
            folder = base / FOLDER
        if archive is None and (base / CIFAR10_ARCHIVE.filename).is_file():
            archive = base / CIFAR10_ARCHIVE.filename
    if folder is None and root.name == FOLDER and (root / TEST_BATCH).is_file():
        folder = root
    return folder, archive


def load_cifar10(root: str | os.PathLike[str], download: bool = False) -> CIFAR10:
    """Load CIFAR-10 from ``root``.

    Looks for an extracted ``cifar-10-batches-py`` folder, then for ``cifar-10-python.tar.gz``
    (extracted next to it), in ``root``, ``root/cifar10`` or ``root/cifar-10``. With
    ``download=True`` a missing archive is fetched into ``root`` and checked against its md5.
    """
    root = Path(root)
    folder, archive = _find(root)
    if folder is None:
        if archive is None:
            if not download:
                raise DataUnavailableError("CIFAR-10", root, [CIFAR10_ARCHIVE])
            archive = fetch(
                CIFAR10_ARCHIVE.urls, root / CIFAR10_ARCHIVE.filename, CIFAR10_ARCHIVE.md5
            )
        folder = extract_cifar10(archive, archive.parent)
    train_images, train_labels = _read_folder(folder, TRAIN_BATCHES)
    test_images, test_labels = _read_folder(folder, (TEST_BATCH,))
    return CIFAR10(train_images, train_labels, test_images, test_labels)
