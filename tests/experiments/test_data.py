import functools
import gzip
import hashlib
import http.server
import pickle
import tarfile
import threading

import numpy as np
import pytest
import torch

from dynabound.experiments.data import (
    DataFormatError,
    DataUnavailableError,
    DownloadError,
    batchify,
    bptt_batches,
    download,
    load_cifar10,
    load_corpus,
    load_digits_split,
    load_mnist,
    md5sum,
    normalize,
    random_crop_flip,
)
from dynabound.experiments.data import cifar10 as cifar_mod
from dynabound.experiments.data import mnist as mnist_mod
from dynabound.experiments.data import ptb as ptb_mod
from dynabound.experiments.data.download import RemoteFile

from .fixtures import (
    IMAGES_MAGIC,
    LABELS_MAGIC,
    MNIST_NAMES,
    _tar_add,
    write_cifar10_archive,
    write_corpus,
    write_idx,
    write_mnist,
    write_ptb_archive,
)


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# ----------------------------------------------------------------------------- download


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).requests.append(self.path)
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/www; yields (base_url, www_dir)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = type("Handler", (_QuietHandler,), {"requests": []})
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(www))
    )
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", www, handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_download_http_verifies_and_skips_existing(server, tmp_path):
    base, www, handler = server
    payload = bytes(range(256)) * 5000
    (www / "blob.bin").write_bytes(payload)
    dest = tmp_path / "out" / "blob.bin"
    assert download(base + "blob.bin", dest, _md5(payload), progress=False) == dest
    assert dest.read_bytes() == payload
    assert md5sum(dest) == _md5(payload)
    download(base + "blob.bin", dest, _md5(payload), progress=False)
    assert handler.requests == ["/blob.bin"]  # the verified file was not fetched again
    dest.write_bytes(payload[:1000])  # a damaged copy is replaced
    download(base + "blob.bin", dest, _md5(payload), progress=False)
    assert dest.read_bytes() == payload and len(handler.requests) == 2


def test_download_md5_mismatch_leaves_nothing(server, tmp_path):
    base, www, _ = server
    (www / "blob.bin").write_bytes(b"corrupted mirror")
    dest = tmp_path / "out" / "blob.bin"
    with pytest.raises(DownloadError, match="md5 mismatch"):
        download(base + "blob.bin", dest, _md5(b"the real file"), progress=False)
    assert list(dest.parent.iterdir()) == []  # no partial or temporary file


def test_download_tries_mirrors_in_order(server, tmp_path):
    base, www, handler = server
    (www / "good.bin").write_bytes(b"payload")
    (www / "bad.bin").write_bytes(b"wrong")
    urls = [base + "missing.bin", base + "bad.bin", base + "good.bin"]
    dest = download(urls, tmp_path / "f.bin", _md5(b"payload"), progress=False)
    assert dest.read_bytes() == b"payload"
    assert handler.requests == ["/missing.bin", "/bad.bin", "/good.bin"]
    with pytest.raises(DownloadError) as err:
        download(urls[:2], tmp_path / "g.bin", _md5(b"payload"), progress=False)
    assert "missing.bin" in str(err.value) and "bad.bin" in str(err.value)
    assert not (tmp_path / "g.bin").exists()


def test_download_file_url_and_no_checksum(tmp_path):
    src = tmp_path / "src.txt"
    src.write_bytes(b"hello")
    dest = download(src.as_uri(), tmp_path / "dst" / "copy.txt", None, progress=False)
    assert dest.read_bytes() == b"hello"
    with pytest.raises(ValueError):
        download([], tmp_path / "x", None)


# ----------------------------------------------------------------------------- MNIST


@pytest.mark.parametrize("subdir", ["", "mnist"])
def test_mnist_roundtrip(tmp_path, subdir):
    written = write_mnist(tmp_path / subdir if subdir else tmp_path, n_train=12, n_test=5)
    loaded = load_mnist(tmp_path)
    for got, want in zip(loaded, written, strict=True):
        assert got.dtype == (torch.uint8 if want.dtype == torch.uint8 else torch.int64)
        assert torch.equal(got, want)
    assert loaded.train_images.shape == (12, 28, 28)


def test_mnist_accepts_uncompressed_files(tmp_path):
    written = write_mnist(tmp_path, compress=False)
    assert torch.equal(load_mnist(tmp_path).test_images, written.test_images)


def test_mnist_bad_magic_and_truncation(tmp_path):
    write_mnist(tmp_path, n_train=12)
    images = torch.zeros(12, 28, 28, dtype=torch.uint8)
    write_idx(tmp_path / MNIST_NAMES[0], images, LABELS_MAGIC)  # labels magic on images
    with pytest.raises(DataFormatError, match="magic number is 2049, expected 2051"):
        load_mnist(tmp_path)
    good = gzip.decompress((tmp_path / MNIST_NAMES[2]).read_bytes())
    write_idx(tmp_path / MNIST_NAMES[0], images, IMAGES_MAGIC)
    (tmp_path / MNIST_NAMES[2]).write_bytes(gzip.compress(good[:-10]))
    with pytest.raises(DataFormatError, match="truncated or corrupt"):
        load_mnist(tmp_path)
    (tmp_path / MNIST_NAMES[2]).write_bytes(b"not gzip at all")
    with pytest.raises(DataFormatError, match="cannot decompress"):
        load_mnist(tmp_path)


def test_mnist_label_count_mismatch(tmp_path):
    write_mnist(tmp_path, n_train=4)
    write_idx(tmp_path / MNIST_NAMES[1], torch.zeros(3, dtype=torch.uint8), LABELS_MAGIC)
    with pytest.raises(DataFormatError, match="labels for 4 images"):
        load_mnist(tmp_path)


def test_mnist_offline_error_names_urls_and_directory(tmp_path):
    with pytest.raises(DataUnavailableError) as err:
        load_mnist(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "mnist") in msg and "--data-dir" in msg
    for name in MNIST_NAMES:
        assert f"https://ossci-datasets.s3.amazonaws.com/mnist/{name}" in msg
        assert f"http://yann.lecun.com/exdb/mnist/{name}" in msg
    assert "f68b3c2dcbeaaa9fbdd348bbdeb94873" in msg
    # Only the file still missing is listed.
    write_mnist(tmp_path)
    (tmp_path / MNIST_NAMES[3]).unlink()
    with pytest.raises(DataUnavailableError) as err:
        load_mnist(tmp_path)
    assert err.value.directory == tmp_path
    assert [f.filename for f in err.value.missing] == [MNIST_NAMES[3]]


def test_mnist_download_end_to_end(tmp_path, monkeypatch):
    src = tmp_path / "mirror"
    written = write_mnist(src)
    files = tuple(
        RemoteFile(
            name,
            md5sum(src / name),
            (src.as_uri() + "/nowhere-" + name, src.as_uri() + "/" + name),
        )
        for name in MNIST_NAMES
    )
    monkeypatch.setattr(mnist_mod, "MNIST_FILES", files)
    data_dir = tmp_path / "data"
    loaded = load_mnist(data_dir, download=True)
    assert torch.equal(loaded.train_images, written.train_images)
    assert sorted(p.name for p in (data_dir / "mnist").iterdir()) == sorted(MNIST_NAMES)


# ----------------------------------------------------------------------------- CIFAR-10


def test_cifar10_archive_roundtrip(tmp_path):
    archive, written = write_cifar10_archive(tmp_path, per_batch=3, n_test=4)
    loaded = load_cifar10(tmp_path)
    assert loaded.train_images.shape == (15, 32, 32, 3)
    assert loaded.test_images.shape == (4, 32, 32, 3)
    for got, want in zip(loaded, written, strict=True):
        assert torch.equal(got, want.to(got.dtype))
    assert loaded.train_labels.dtype == torch.int64
    assert (tmp_path / "cifar-10-batches-py" / "data_batch_5").is_file()
    # The extracted folder is used from then on, without the archive.
    archive.unlink()
    assert torch.equal(load_cifar10(tmp_path).test_labels, written.test_labels)
    assert torch.equal(
        load_cifar10(tmp_path / "cifar-10-batches-py").test_labels, written.test_labels
    )


def test_cifar10_channel_layout(tmp_path):
    # A row stores 1024 red, then 1024 green, then 1024 blue values.
    row = np.concatenate([np.full(1024, 10), np.full(1024, 20), np.arange(1024) % 251])
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batch = {b"data": row[None].astype(np.uint8), b"labels": [7]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    img = load_cifar10(tmp_path).test_images[0]
    assert img[..., 0].eq(10).all() and img[..., 1].eq(20).all()
    assert img[0, 1, 2] == 1 and img[1, 0, 2] == 32  # row-major H, W within a channel


def test_cifar10_reads_python2_era_pickles(tmp_path):
    # The distributed batches were written by Python 2 with numpy.core module paths.
    _, written = write_cifar10_archive(tmp_path / "src", per_batch=2, n_test=2)
    src = load_cifar10(tmp_path / "src")
    folder = tmp_path / "py2" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for p in (tmp_path / "src" / "cifar-10-batches-py").iterdir():
        raw = p.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (folder / p.name).write_bytes(raw)
    assert b"numpy.core.multiarray" in (folder / "test_batch").read_bytes()
    loaded = load_cifar10(folder.parent)
    assert all(torch.equal(a, b) for a, b in zip(loaded, src, strict=True))


def test_cifar10_extraction_is_confined(tmp_path):
    outside = tmp_path / "evil.txt"
    data_dir = tmp_path / "data"
    write_cifar10_archive(data_dir, extra_members={"../evil.txt": b"x", "/tmp/abs": b"y"})
    load_cifar10(data_dir)
    assert not outside.exists()
    assert sorted(p.name for p in data_dir.iterdir()) == [
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
    ]


def test_cifar10_rejects_link_members_and_code_in_pickles(tmp_path):
    path = tmp_path / "a" / "cifar-10-python.tar.gz"
    path.parent.mkdir()
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(DataFormatError, match="not a regular file"):
        load_cifar10(path.parent)

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    folder = tmp_path / "b" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"data": Exploit(), b"labels": []}))
    with pytest.raises(DataFormatError, match="refusing to load builtins.print"):
        load_cifar10(folder.parent)


def test_cifar10_corrupt_archive_and_missing_member(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataFormatError, match="cannot read the archive"):
        load_cifar10(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    with tarfile.open(other / "cifar-10-python.tar.gz", "w:gz") as tar:
        _tar_add(tar, "cifar-10-batches-py/test_batch", b"")
    with pytest.raises(DataFormatError, match="missing members"):
        load_cifar10(other)
    assert [p.name for p in other.iterdir()] == ["cifar-10-python.tar.gz"]


def test_cifar10_offline_error_and_download(tmp_path, monkeypatch):
    with pytest.raises(DataUnavailableError) as err:
        load_cifar10(tmp_path / "data")
    msg = str(err.value)
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg
    assert "c58f30108f718f92721af3b95e74349a" in msg and str(tmp_path / "data") in msg

    archive, written = write_cifar10_archive(tmp_path / "mirror")
    remote = RemoteFile(archive.name, md5sum(archive), (archive.as_uri(),))
    monkeypatch.setattr(cifar_mod, "CIFAR10_ARCHIVE", remote)
    loaded = load_cifar10(tmp_path / "data", download=True)
    assert torch.equal(loaded.train_images, written.train_images)


# ----------------------------------------------------------------------------- corpora


def test_corpus_roundtrip_vocab_and_unk(tmp_path):
    write_corpus(tmp_path / "ptb")
    corpus = load_corpus(tmp_path)
    assert corpus.vocab[:6] == ["the", "cat", "sat", "on", "mat", "<eos>"]
    words = [corpus.vocab[i] for i in corpus.train.tolist()]
    assert (
        words == "the cat sat on the mat <eos> a dog sat <unk> <eos> the dog ran N N <eos>".split()
    )
    valid = [corpus.vocab[i] for i in corpus.valid.tolist()]
    assert valid == "the cat ran <eos> a <unk> sat <eos>".split()  # zebra is unseen
    test = [corpus.vocab[i] for i in corpus.test.tolist()]
    assert test == "dog on the mat <eos> the <unk> <eos>".split()
    assert corpus.train.dtype == torch.int64
    assert len(corpus.vocab) == len(set(corpus.vocab)) == 11


def test_corpus_any_directory_and_unknown_without_unk(tmp_path):
    write_corpus(tmp_path, train=["x y", "y z"], valid=["z x"], test=["q"], naming="{split}.txt")
    with pytest.raises(DataFormatError, match="'q' is not in the training vocabulary"):
        load_corpus(tmp_path)
    write_corpus(tmp_path, train=["x y", "y z"], valid=["z x"], test=["y"], naming="{split}.txt")
    corpus = load_corpus(tmp_path)
    assert corpus.vocab == ["x", "y", "<eos>", "z"]
    assert corpus.train.tolist() == [0, 1, 2, 1, 3, 2]


def test_corpus_offline_error(tmp_path):
    with pytest.raises(DataUnavailableError) as err:
        load_corpus(tmp_path)
    msg = str(err.value)
    assert "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz" in msg
    assert "f26c4b92c5fdc7b3f8c7cdcb991d8420" in msg and str(tmp_path / "ptb") in msg


def test_ptb_download_from_archive_and_fallback(tmp_path, monkeypatch):
    archive = write_ptb_archive(tmp_path / "mirror")
    src = tmp_path / "mirror" / "_ptb_src"
    md5s = {f"ptb.{s}.txt": md5sum(src / f"ptb.{s}.txt") for s in ("train", "valid", "test")}
    monkeypatch.setattr(ptb_mod, "_MD5", md5s)
    monkeypatch.setattr(ptb_mod, "PTB_ARCHIVE_URL", archive.as_uri())
    corpus = load_corpus(tmp_path / "a", download=True)
    assert corpus.train.numel() == 18
    assert sorted(p.name for p in (tmp_path / "a" / "ptb").iterdir()) == sorted(md5s)

    # An unreachable archive falls back to the single files, each checked by md5.
    files = tuple(RemoteFile(n, m, ((src / n).as_uri(),)) for n, m in md5s.items())
    monkeypatch.setattr(ptb_mod, "PTB_ARCHIVE_URL", (tmp_path / "gone.tgz").as_uri())
    monkeypatch.setattr(ptb_mod, "PTB_FILES", files)
    assert torch.equal(load_corpus(tmp_path / "b", download=True).test, corpus.test)


def test_batchify_and_bptt():
    tokens = torch.arange(23)
    data = batchify(tokens, 4)
    assert data.shape == (5, 4)
    assert data[:, 1].tolist() == [5, 6, 7, 8, 9]  # each column is a contiguous stretch
    windows = list(bptt_batches(data, 2))
    assert [w[0].shape[0] for w in windows] == [2, 2]
    for x, y in windows:
        assert torch.equal(y, x + 1)
    with pytest.raises(ValueError):
        batchify(tokens, 0)
    with pytest.raises(ValueError):
        batchify(torch.arange(3), 4)
    with pytest.raises(ValueError):
        batchify(tokens.reshape(1, -1), 2)


# ----------------------------------------------------------------------------- digits


def test_digits_split_is_stratified_and_deterministic():
    d = load_digits_split(test_fraction=0.25, seed=0)
    assert d.train_x.shape == (1347, 64) and d.test_x.shape == (450, 64)
    assert d.train_x.dtype == torch.float32 and d.train_y.dtype == torch.int64
    assert 0.0 <= float(d.train_x.min()) and float(d.train_x.max()) == 1.0
    counts = torch.bincount(d.test_y, minlength=10)
    totals = counts + torch.bincount(d.train_y, minlength=10)
    assert torch.all((counts.float() - 0.25 * totals.float()).abs() <= 0.5)
    again = load_digits_split(test_fraction=0.25, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(d, again, strict=True))
    other = load_digits_split(test_fraction=0.25, seed=1)
    assert not torch.equal(d.test_x, other.test_x)
    with pytest.raises(ValueError):
        load_digits_split(test_fraction=1.0)


# ----------------------------------------------------------------------------- augmentation


def test_random_crop_flip_is_a_crop_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (64, 3, 8, 8), generator=g, dtype=torch.uint8)
    out = random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(1))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flips = 0
    for img, src in zip(out, padded, strict=True):
        windows = [
            (src[:, i : i + 8, j : j + 8], flip)
            for i in range(5)
            for j in range(5)
            for flip in (False, True)
        ]
        hits = [f for w, f in windows if torch.equal(img, w.flip(-1) if f else w)]
        assert hits, "output is not a (mirrored) crop of the padded input"
        flips += hits[0]
    assert 16 < flips < 48
    same = random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, same)
    assert torch.equal(random_crop_flip(x[:, :, :, :1], padding=0), x[:, :, :, :1])


def test_normalize():
    x = torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8)  # [1, 2, 1, 2]
    y = normalize(x, (0.5, 0.2), (0.5, 0.1))
    assert torch.allclose(y, torch.tensor([[[[-1.0, 1.0]], [[0.0, 2.0]]]]))
    assert torch.allclose(
        normalize(torch.full((2, 4, 4), 255, dtype=torch.uint8), 0.5, 0.25),
        torch.full((2, 4, 4), 2.0),
    )
    with pytest.raises(ValueError):
        normalize(x, (0.5, 0.5, 0.5), (1.0, 1.0, 1.0))
