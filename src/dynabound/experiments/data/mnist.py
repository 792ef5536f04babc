"""MNIST from the original IDX files (gzip-compressed or not)."""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import NamedTuple

import torch

from .download import DataFormatError, RemoteFile, require_files

__all__ = ["MNIST", "MNIST_FILES", "MNIST_MEAN", "MNIST_STD", "load_mnist", "read_idx"]

# Pixel statistics of the 60000 training images scaled to [0, 1].
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_FILES = tuple(
    RemoteFile(name, md5, tuple(m + name for m in _MIRRORS)) for name, md5 in _MD5.items()
)

IMAGES_MAGIC = 2051  # 0x0803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x0801: unsigned bytes, 1 dimension


class MNIST(NamedTuple):
    train_images: torch.Tensor  # uint8 [N, 28, 28]
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor
    test_labels: torch.Tensor


def read_idx(path: str | os.PathLike[str], magic: int) -> torch.Tensor:
    """Read an unsigned-byte IDX file (``.gz`` or raw) and check its magic number and size."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = bytearray(fh.read())
        else:
            raw = bytearray(path.read_bytes())
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DataFormatError(f"{path}: cannot decompress ({exc}); the file is corrupt") from exc
    if len(raw) < 4:
        raise DataFormatError(f"{path}: {len(raw)} bytes is too short for an IDX header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataFormatError(
            f"{path}: IDX magic number is {found}, expected {magic}; wrong or corrupt file"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    payload = math.prod(dims)
    if len(raw) - header != payload:
        raise DataFormatError(
            f"{path}: header declares shape {dims} ({payload} bytes) but the file holds "
            f"{len(raw) - header} bytes of data; the file is truncated or corrupt"
        )
    if payload == 0:  # torch.frombuffer rejects empty views
        return torch.empty(dims, dtype=torch.uint8)
    data = torch.frombuffer(raw, dtype=torch.uint8, offset=header, count=payload)
    return data.clone().reshape(dims)


def _existing(directory: Path, f: RemoteFile) -> Path | None:
    # torchvision and other tools keep decompressed copies; accept those too.
    for candidate in (directory / f.filename, directory / f.filename.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _pick_dir(root: Path) -> Path:
    # Users point --data-dir either at the folder holding the files or at its parent.
    for candidate in (root, root / "mnist"):
        if any(_existing(candidate, f) for f in MNIST_FILES):
            return candidate
    return root / "mnist"


def _load_pair(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        raise DataFormatError(
            f"{images_path}: images have shape {list(images.shape)}, not N x 28 x 28"
        )
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise DataFormatError(
            f"{labels_path}: {list(labels.shape)} labels for {images.shape[0]} images"
        )
    if labels.numel() and int(labels.max()) > 9:
        raise DataFormatError(f"{labels_path}: label {int(labels.max())} is outside 0..9")
    return images, labels.to(torch.int64)


def load_mnist(root: str | os.PathLike[str], download: bool = False) -> MNIST:
    """Load MNIST from ``root`` (or ``root/mnist``), downloading it there if asked.

    Raises DataUnavailableError (with URLs and the target directory) when files are missing
    and ``download`` is false, and DataFormatError for corrupt files.
    """
    directory = _pick_dir(Path(root))
    found: dict[str, Path] = {}
    missing = []
    for f in MNIST_FILES:
        path = _existing(directory, f)
        if path is None:
            missing.append(f)
        else:
            found[f.filename] = path
    if missing:
        found.update(require_files("MNIST", directory, missing, download_missing=download))
    p = [found[f.filename] for f in MNIST_FILES]
    train_images, train_labels = _load_pair(p[0], p[1])
    test_images, test_labels = _load_pair(p[2], p[3])
    return MNIST(train_images, train_labels, test_images, test_labels)
