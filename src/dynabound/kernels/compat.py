"""What the kernels need from torch and Triton, written once for every supported release.

torch 2.4, the oldest release dynabound supports, lacks what newer ones offer: a
``load_inline`` that adds no torch headers, an ``increment_version`` taking a list, DTensor
under its public name, and torch.compile of an operator that mutates lists of tensors; and
the CUDA kernels need a newer Triton than torch 2.4 to 2.6 ship (older compilers take no
tuples, older interpreters run the kernels wrongly). This module holds each difference
once; it imports nothing from the package, so any kernel module may use it.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "COMPILES_FUSED_OP",
    "MIN_TRITON",
    "TORCH_WITH_MIN_TRITON",
    "bump_versions",
    "compile_library",
    "dtensor_type",
    "library_path",
    "triton_version",
]

# The oldest Triton the CUDA kernels pass their tests with (in Triton's interpreter and
# compiled for sm_90), and the torch release that ships it. With an older one the default
# runs foreach on CUDA, saying why once.
MIN_TRITON = (3, 3)
TORCH_WITH_MIN_TRITON = "2.7"

# torch 2.4 cannot compile a graph holding an operator that mutates lists of tensors
# (AOTAutograd functionalizes only single mutated tensors), so there a compiled step runs
# the fused step eagerly between graphs instead of as one node of the graph.
COMPILES_FUSED_OP = torch.__version__ >= "2.5"


def _increment_version_takes_lists() -> bool:
    try:
        torch.autograd.graph.increment_version([])
    except (RuntimeError, TypeError):  # torch before 2.5: "expect a Tensor as input"
        return False
    return True


_LISTS = _increment_version_takes_lists()


def bump_versions(tensors: list[Tensor]) -> None:
    """Tell autograd that ``tensors`` changed in place: the kernels write through raw
    pointers, which autograd cannot see. One call where torch takes a list."""
    if _LISTS:
        torch.autograd.graph.increment_version(tensors)
        return
    for tensor in tensors:
        torch.autograd.graph.increment_version(tensor)


def dtensor_type() -> type[Any] | None:
    """DTensor's class, where torch.distributed's tensor module is loaded (no DTensor can
    exist otherwise); torch 2.4 has it under ``torch.distributed._tensor`` only."""
    for module in ("torch.distributed.tensor", "torch.distributed._tensor"):
        found = getattr(sys.modules.get(module), "DTensor", None)
        if found is not None:
            return found
    return None


def library_path(name: str) -> Path:
    """Where :func:`compile_library` puts the shared library ``name`` (torch's extension
    cache, ``TORCH_EXTENSIONS_DIR``); the folder is created if missing."""
    from torch.utils import cpp_extension

    folder = Path(cpp_extension._get_build_directory(name, verbose=False))
    return folder / f"{name}{cpp_extension.LIB_EXT}"


def compile_library(
    name: str,
    source: str,
    headers: Mapping[str, str],
    *,
    cflags: list[str],
    ldflags: list[str],
) -> str:
    """Compile C++ ``source``, which includes only ``headers`` (file name: text) and no
    torch headers, into a shared library; its path. Built once: later calls and processes
    reuse the build in torch's extension cache.

    This is what ``load_inline(..., is_python_module=False, no_implicit_headers=True)``
    does in recent torch releases: the source goes to ``main.cpp`` in the build folder and
    ``load`` builds it. Done here for every release, since older ones (2.4 to 2.6 at
    least) have no ``no_implicit_headers``, so their ``load_inline`` adds torch's headers,
    which makes the build several times slower, and 2.4 returns no path. The
    headers are copied beside ``main.cpp``, so the build command names no folder of the
    package: another copy of it using the same torch reuses the build instead of rebuilding
    it in turn.
    """
    from torch.utils import cpp_extension

    library = library_path(name)
    main = library.with_name("main.cpp")
    for file, text in [*headers.items(), (main.name, source)]:
        _write_if_changed(library.with_name(file), text)
    cpp_extension.load(
        name,
        sources=[str(main)],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        build_directory=str(main.parent),
        is_python_module=False,
    )
    return str(library)


def _write_if_changed(path: Path, text: str) -> None:
    if path.exists() and path.read_text() == text:
        return  # an unchanged file keeps its time stamp: ninja does not rebuild
    # Written whole and renamed, so a concurrent first build never reads half a file.
    partial = path.with_name(f"{path.name}.{os.getpid()}")
    partial.write_text(text)
    os.replace(partial, path)


def triton_version(module) -> tuple[int, int]:
    """Major and minor release of an imported ``triton`` module (0, 0 when unreadable)."""
    found = re.match(r"(\d+)\.(\d+)", str(getattr(module, "__version__", "")))
    return (int(found[1]), int(found[2])) if found else (0, 0)
