"""Data sets of the paper's experiments: download, verification, loading, augmentation."""

from .augment import normalize, random_crop_flip
from .cifar10 import CIFAR10, CIFAR10_MEAN, CIFAR10_PIXEL_STD, CIFAR10_STD, load_cifar10
from .digits import Digits, load_digits_split
from .download import (
    DataFormatError,
    DataUnavailableError,
    DownloadError,
    RemoteFile,
    download,
    md5sum,
)
from .mnist import MNIST, MNIST_MEAN, MNIST_STD, load_mnist
from .ptb import Corpus, batchify, bptt_batches, load_corpus

__all__ = [
    "CIFAR10",
    "CIFAR10_MEAN",
    "CIFAR10_PIXEL_STD",
    "CIFAR10_STD",
    "MNIST",
    "MNIST_MEAN",
    "MNIST_STD",
    "Corpus",
    "DataFormatError",
    "DataUnavailableError",
    "Digits",
    "DownloadError",
    "RemoteFile",
    "batchify",
    "bptt_batches",
    "download",
    "load_cifar10",
    "load_corpus",
    "load_digits_split",
    "load_mnist",
    "md5sum",
    "normalize",
    "random_crop_flip",
]
