"""Imports inside the library run one way: no module imports, directly or through others,
a module that imports it back. Function-level (lazy) imports count too: a lazy import
hides a circle from Python's import machinery, not from a reader.

The graph is read from the source with ``ast``, so it sees every import statement, run or
not. An edge goes from a module to each module its imports execute or read names from:
``import a.b.c`` and ``from a.b.c import x`` execute the packages ``a`` and ``a.b`` and the
module ``a.b.c``, except the packages the importing module lives in, which are already
being executed when it runs; ``from a.b import c`` also reaches the module ``a.b.c`` when
there is one, and ``from . import helper`` reads a name from the package's ``__init__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "dynabound"


def module_files() -> dict[str, Path]:
    files = {}
    for path in sorted((SRC / ROOT).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def imported_modules(name: str, path: Path, modules: set[str]) -> set[str]:
    """The library modules that executing ``name`` (at ``path``) imports or reads from."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    if path.name == "__init__.py":
        ancestors.add(name)
    found: set[str] = set()

    def reach(target: str) -> None:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in modules and (prefix not in ancestors or prefix == target):
                found.add(prefix)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                reach(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in modules:
                    reach(submodule)
                else:
                    reach(target)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_library_has_no_import_circle():
    circles = cycles(import_graph())
    assert not circles, "import circles (lazy imports included): " + "; ".join(
        " <-> ".join(c) for c in circles
    )


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from . import helper", {"pkg"}),  # a name of the package's __init__
        ("from . import other", {"pkg.other"}),  # a submodule: the package is running
        ("from .other import x", {"pkg.other"}),
        ("def f():\n    from ..top import y", {"top"}),  # lazy imports count
        ("import pkg.sub.deep", {"pkg.sub", "pkg.sub.deep"}),
    ],
)
def test_the_graph_sees_each_kind_of_import(tmp_path, source, expected):
    modules = {"top", "pkg", "pkg.mod", "pkg.other", "pkg.sub", "pkg.sub.deep"}
    path = tmp_path / "mod.py"
    path.write_text(source + "\n")
    assert imported_modules("pkg.mod", path, modules) == expected


def test_a_circle_is_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
