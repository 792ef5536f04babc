"""Writers of tiny data sets in the exact on-disk formats of the real ones.

Each writer returns what it wrote so that tests can compare a loader's output with it.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from dynabound.experiments.data.cifar10 import CIFAR10
from dynabound.experiments.data.mnist import MNIST

# Written out rather than imported so that a wrong constant in the loader is caught.
IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
MNIST_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def idx_bytes(array: torch.Tensor, magic: int) -> bytes:
    """An unsigned-byte IDX file: big-endian magic, one big-endian int32 per dimension, data."""
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.to(torch.uint8).contiguous().numpy().tobytes()


def write_idx(path: Path, array: torch.Tensor, magic: int, compress: bool = True) -> Path:
    data = idx_bytes(array, magic)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def write_mnist(
    directory: Path, n_train: int = 12, n_test: int = 5, seed: int = 0, compress: bool = True
) -> MNIST:
    """The four MNIST IDX files (gzip'd unless ``compress`` is false) with random pixels."""
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    data = MNIST(
        torch.randint(0, 256, (n_train, 28, 28), generator=g, dtype=torch.uint8),
        torch.randint(0, 10, (n_train,), generator=g),
        torch.randint(0, 256, (n_test, 28, 28), generator=g, dtype=torch.uint8),
        torch.randint(0, 10, (n_test,), generator=g),
    )
    magics = (IMAGES_MAGIC, LABELS_MAGIC, IMAGES_MAGIC, LABELS_MAGIC)
    for name, array, magic in zip(MNIST_NAMES, data, magics, strict=True):
        write_idx(directory / (name if compress else name[:-3]), array, magic, compress)
    return data


def cifar_batch_bytes(images_nhwc: torch.Tensor, labels: torch.Tensor, label: str) -> bytes:
    """One CIFAR-10 python batch: a pickled dict with bytes keys, channel-major uint8 rows."""
    rows = images_nhwc.permute(0, 3, 1, 2).reshape(images_nhwc.shape[0], -1).numpy()
    batch = {
        b"batch_label": label.encode(),
        b"labels": [int(v) for v in labels],
        b"data": np.ascontiguousarray(rows, dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    return pickle.dumps(batch, protocol=2)


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_cifar10_archive(
    directory: Path,
    per_batch: int = 3,
    n_test: int = 4,
    seed: int = 0,
    extra_members: dict[str, bytes] | None = None,
) -> tuple[Path, CIFAR10]:
    """``cifar-10-python.tar.gz`` holding ``cifar-10-batches-py/`` with five training
    batches of ``per_batch`` images, a test batch and ``batches.meta``."""
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    n_train = 5 * per_batch
    data = CIFAR10(
        torch.randint(0, 256, (n_train, 32, 32, 3), generator=g, dtype=torch.uint8),
        torch.randint(0, 10, (n_train,), generator=g),
        torch.randint(0, 256, (n_test, 32, 32, 3), generator=g, dtype=torch.uint8),
        torch.randint(0, 10, (n_test,), generator=g),
    )
    path = directory / "cifar-10-python.tar.gz"
    meta = {
        b"label_names": [
            b"airplane",
            b"automobile",
            b"bird",
            b"cat",
            b"deer",
            b"dog",
            b"frog",
            b"horse",
            b"ship",
            b"truck",
        ]
    }
    with tarfile.open(path, "w:gz") as tar:
        for i in range(5):
            sl = slice(i * per_batch, (i + 1) * per_batch)
            payload = cifar_batch_bytes(data.train_images[sl], data.train_labels[sl], f"b{i}")
            _tar_add(tar, f"cifar-10-batches-py/data_batch_{i + 1}", payload)
        test = cifar_batch_bytes(data.test_images, data.test_labels, "test")
        _tar_add(tar, "cifar-10-batches-py/test_batch", test)
        _tar_add(tar, "cifar-10-batches-py/batches.meta", pickle.dumps(meta, protocol=2))
        for name, payload in (extra_members or {}).items():
            _tar_add(tar, name, payload)
    return path, data


PTB_TRAIN = [" the cat sat on the mat ", " a dog sat <unk> ", " the dog ran N N "]
PTB_VALID = [" the cat ran ", " a zebra sat "]
PTB_TEST = [" dog on the mat ", " the emu "]


def write_corpus(
    directory: Path,
    train: list[str] = PTB_TRAIN,
    valid: list[str] = PTB_VALID,
    test: list[str] = PTB_TEST,
    naming: str = "ptb.{split}.txt",
) -> dict[str, Path]:
    """Three tokenised text files, one sentence per line, in Mikolov's PTB layout
    (leading and trailing spaces included, as in the real files)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, lines in (("train", train), ("valid", valid), ("test", test)):
        paths[split] = directory / naming.format(split=split)
        paths[split].write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return paths


def write_ptb_archive(directory: Path, **corpus) -> Path:
    """``simple-examples.tgz`` with the corpus under ``./simple-examples/data/``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "simple-examples.tgz"
    src = write_corpus(directory / "_ptb_src", **corpus)
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "valid", "test"):
            _tar_add(tar, f"./simple-examples/data/ptb.{split}.txt", src[split].read_bytes())
    return path
