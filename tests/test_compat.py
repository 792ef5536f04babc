"""dynabound.kernels.compat: both ways of each difference between torch releases, on the
torch installed here, and the gate that keeps the CUDA default off a Triton too old for it."""

from __future__ import annotations

import ctypes
import types
import warnings

import pytest
import torch
from kernel_required import require_cpu_kernel

from dynabound import kernels
from dynabound.kernels import compat


@pytest.mark.parametrize("takes_lists", [True, False], ids=["list", "one by one"])
def test_bump_versions_tells_autograd_every_tensor_changed(monkeypatch, takes_lists):
    if takes_lists and not compat._LISTS:
        pytest.skip(f"torch {torch.__version__} takes one tensor at a time")
    monkeypatch.setattr(compat, "_LISTS", takes_lists)
    tensors = [torch.zeros(3), torch.ones(()), torch.zeros(0)]
    before = [t._version for t in tensors]
    compat.bump_versions(tensors)
    assert [t._version for t in tensors] == [v + 1 for v in before]


def test_a_bumped_tensor_saved_for_backward_is_an_error_in_backward():
    w = torch.ones(3, requires_grad=True)
    p = torch.ones(3)
    loss = (w * p).sum()  # saves p for the gradient of w
    compat.bump_versions([p])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_compile_library_builds_plain_cpp_and_returns_its_path(monkeypatch, tmp_path):
    require_cpu_kernel()  # the same compiler and ninja
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    source = '#include "answer.h"\nextern "C" int dynabound_answer() { return ANSWER; }\n'
    headers = {"answer.h": "#define ANSWER 42\n"}
    options = dict(cflags=["-O2"], ldflags=[])
    path = compat.compile_library("dynabound_compat_test", source, headers, **options)
    assert path == str(compat.library_path("dynabound_compat_test"))
    assert path.startswith(str(tmp_path))
    assert ctypes.CDLL(path).dynabound_answer() == 42
    main = tmp_path / "dynabound_compat_test" / "main.cpp"
    assert main.read_text() == source  # no torch header prepended
    written = main.stat().st_mtime_ns
    assert compat.compile_library("dynabound_compat_test", source, headers, **options) == path
    assert main.stat().st_mtime_ns == written  # an unchanged source is not rewritten


@pytest.mark.parametrize(
    ("version", "parsed"),
    [("3.0.0", (3, 0)), ("3.8.0", (3, 8)), ("3.1.0+git1234", (3, 1)), ("3.2rc1", (3, 2)),
     ("unknown", (0, 0))],
)  # fmt: skip
def test_triton_version(version, parsed):
    assert compat.triton_version(types.SimpleNamespace(__version__=version)) == parsed
    assert compat.triton_version(types.SimpleNamespace()) == (0, 0)


@pytest.fixture
def old_triton(monkeypatch):
    """Triton 3.0 (what torch 2.4 ships) in place of the installed one, on a CUDA machine."""
    from dynabound.kernels import triton_common

    monkeypatch.setattr(triton_common, "IMPORT_ERROR", None)
    monkeypatch.setattr(triton_common, "triton", types.SimpleNamespace(__version__="3.0.0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(kernels, "_fusable_by_type", {})
    monkeypatch.setattr(kernels, "_warned_unavailable", set())
    triton_common.unavailable_reason.cache_clear()
    yield
    triton_common.unavailable_reason.cache_clear()


def test_a_triton_too_old_for_the_cuda_kernel_leaves_the_default_on_foreach(old_triton):
    oldest = ".".join(map(str, compat.MIN_TRITON))
    reason = kernels.unavailable_reason("cuda")
    assert f"Triton 3.0.0 is older than {oldest}" in reason
    assert f"torch {compat.TORCH_WITH_MIN_TRITON}" in reason
    assert not kernels.is_available("cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not kernels.default_kernel_ready("cuda")
        assert not kernels.default_kernel_ready("cuda")  # warned once only
    assert len(caught) == 1
    assert issubclass(caught[0].category, RuntimeWarning)
    assert f"slower foreach path: Triton 3.0.0 is older than {oldest}" in str(caught[0].message)


def test_a_recent_triton_passes_the_gate(old_triton, monkeypatch):
    from dynabound.kernels import triton_common

    oldest = ".".join(map(str, compat.MIN_TRITON)) + ".0"
    monkeypatch.setattr(triton_common, "triton", types.SimpleNamespace(__version__=oldest))
    assert kernels.unavailable_reason("cuda") is None
