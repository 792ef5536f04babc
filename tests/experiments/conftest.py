"""Tiny data sets in the real on-disk formats, shared by the harness tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .fixtures import write_cifar10_archive, write_corpus, write_mnist

PTB_VOCAB = "the cat dog sat on mat a ran far away <unk> N".split()


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mnist")
    write_mnist(root, n_train=64, n_test=16)
    return root


@pytest.fixture(scope="session")
def ptb_dir(tmp_path_factory) -> Path:
    g = torch.Generator().manual_seed(1)

    def lines(n: int) -> list[str]:
        words = torch.randint(0, len(PTB_VOCAB), (n, 6), generator=g)
        return [" " + " ".join(PTB_VOCAB[i] for i in row) + " " for row in words.tolist()]

    root = tmp_path_factory.mktemp("ptb")
    write_corpus(
        root, train=[" " + " ".join(PTB_VOCAB) + " "] + lines(20), valid=lines(6), test=lines(6)
    )
    return root


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10_archive(root, per_batch=2, n_test=2)  # ResNet steps are slow on a CPU
    return root
