"""The documented code runs: every ```python block of the README and of the documentation
site's pages executes in a fresh interpreter, and the quick start's test command is the one
CI runs."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI_SCRIPT = ROOT / ".ci" / "run"
# The README and every page of the site (mkdocs.yml's docs_dir).
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
# Pages whose ```python blocks are excerpts of multi-process scripts, shown and not run;
# tests/distributed runs what they show.
EXCERPTS = {ROOT / "docs" / "distributed.md"}

# Extras that a plain install lacks: a block needing one of them skips without it.
OPTIONAL = {
    "jax": ("jax",),
    "optax": ("optax",),
    "dynabound.optax": ("jax", "optax"),
    "transformers": ("transformers",),
    "lightning": ("lightning",),
    "keras": ("keras",),
    "dynabound.keras": ("keras",),
}
# Languages of blocks that are shown, not run; any other fence (```py, ```python3) would
# silently escape the run below, so it fails test_every_block_is_run_or_known_to_be_shell.
NOT_RUN = {"bash", "bibtex"}

_FENCE = re.compile(r"^```(\S*)\n(.*?)^```\s*$", re.M | re.S)


def _blocks(page: Path = README) -> list[tuple[str, str, str]]:
    """(language, section heading, code) for each fenced block of ``page``, in order."""
    text = page.read_text(encoding="utf-8")
    out = []
    for match in _FENCE.finditer(text):
        headings = re.findall(r"^#{1,3} (.+)$", text[: match.start()], re.M)
        out.append((match.group(1), headings[-1] if headings else "top", match.group(2)))
    return out


def _python_blocks() -> list[pytest.param]:
    params, seen = [], {}
    for page in PAGES:
        if page in EXCERPTS:
            continue
        name = page.relative_to(ROOT).with_suffix("").as_posix()
        for lang, heading, code in _blocks(page):
            if lang != "python":
                continue
            slug = re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")[:40]
            key = f"{name}:{slug}"
            seen[key] = seen.get(key, 0) + 1
            params.append(pytest.param(code, id=f"{key}-{seen[key]}"))
    return params


def _missing_extras(code: str) -> list[str]:
    modules = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.append(node.module)
    needed = {
        dist
        for module in modules
        for prefix, dists in OPTIONAL.items()
        if module == prefix or module.startswith(prefix + ".")
        for dist in dists
    }
    return sorted(d for d in needed if importlib.util.find_spec(d) is None)


def _run_snippet(code: str, cwd: Path) -> None:
    env = dict(os.environ, MPLBACKEND="Agg")
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        pytest.fail(
            f"documented snippet exited with {result.returncode}:\n{code}\n--- stderr ---\n"
            f"{result.stderr[-4000:]}",
            pytrace=False,
        )


@pytest.mark.parametrize("code", _python_blocks())
def test_python_block_runs(code, tmp_path):
    missing = _missing_extras(code)
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    _run_snippet(code, tmp_path)


def test_a_broken_snippet_fails(tmp_path):
    with pytest.raises(pytest.fail.Exception, match="ZeroDivisionError"):
        _run_snippet("import torch\n1 / 0\n", tmp_path)


def test_the_sections_with_code_have_runnable_blocks():
    """Guards the extraction: a changed fence or heading must not leave nothing to run."""
    headings = {heading for lang, heading, _ in _blocks() if lang == "python"}
    for section in ("PyTorch", "JAX / optax", "Keras 3"):
        assert section in headings, (section, headings)
    ids = [p.id for p in _python_blocks()]
    pages = ["usage", "api/optax", "api/keras", "api/diagnostics", "api/scaling"]
    pages += ["api/state_formats", "api/kernels", "api/final_lr"]
    for page in pages:
        assert any(i.startswith(f"docs/{page}:") for i in ids), (page, ids)
    assert sum("inject_hyperparams" in p.values[0] for p in _python_blocks()) == 1


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_block_is_run_or_known_to_be_shell(page):
    unknown = [
        (lang, heading) for lang, heading, _ in _blocks(page) if lang not in NOT_RUN | {"python"}
    ]
    assert not unknown


def test_missing_extras_are_detected():
    assert _missing_extras("import torch\nfrom dynabound import AdaBound\n") == []
    code = "import jax.numpy as jnp\nfrom dynabound.optax import adabound\n"
    expected = sorted(d for d in ("jax", "optax") if importlib.util.find_spec(d) is None)
    assert _missing_extras(code) == expected


def test_quick_start_is_two_commands_and_the_second_is_what_ci_runs():
    quick = [code for lang, heading, code in _blocks() if heading == "Quick start"]
    assert len(quick) == 1
    commands = [line for line in quick[0].splitlines() if line.strip()]
    assert len(commands) == 2
    assert commands[0].endswith("&& dynabound demo")
    assert commands[1] == (
        'python -m pip install "torch==2.13.0" -e ".[dev]" && python -m pytest -q -n auto'
    )
    ci_lines = [line.strip() for line in CI_SCRIPT.read_text(encoding="utf-8").splitlines()]
    assert commands[1] in ci_lines
