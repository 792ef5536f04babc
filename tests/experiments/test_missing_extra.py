"""Without the [experiments] extra (a plain ``pip install .``), every command that needs it
says so in one line, naming what is missing and how to install it; --help still works.

The extra's modules are hidden by an import blocker in a fresh interpreter, as if they had
never been installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# Hides the modules named in argv[1] (comma-separated) from the import system, then runs
# the command in argv[2:]. With "--checked-late", the up-front check is skipped, so that a
# module found missing only when imported is reported too.
_RUN_WITHOUT = """
import importlib.abc, sys

hidden = set(sys.argv[1].split(","))

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Blocker())
from dynabound.experiments import cli
argv = sys.argv[2:]
if argv[0] == "--checked-late":
    cli._missing_extra = lambda ns: []
    argv = argv[1:]
sys.exit(cli.main(argv))
"""
EXTRA = "numpy,matplotlib,tqdm,sklearn"
INSTALL = 'in a dynabound checkout, python -m pip install ".[experiments]"'


def _run_without(hidden: str, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    # torch warns on import that it cannot find numpy; that line is torch's, not ours.
    return subprocess.run(
        [sys.executable, "-W", "ignore:Failed to initialize NumPy", "-c", _RUN_WITHOUT, hidden,
         *argv],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


COMMANDS = {
    "demo": (["demo", "--quick"], "numpy, matplotlib, tqdm and scikit-learn are"),
    "run": (["run", "convex", "--optim", "adam"], "numpy, matplotlib and tqdm are"),
    "run-digits": (["run", "digits", "--optim", "adam"], "numpy, matplotlib, tqdm and scikit-"),
    "compare": (["compare", "convex"], "numpy, matplotlib and tqdm are"),
    "sweep": (["sweep", "digits", "--final-lr", "0.1", "--gamma", "1e-3"], "numpy, matplotli"),
    "plot": (["plot", "somewhere"], "numpy, matplotlib and tqdm are"),
    "probe": (["probe", "somewhere"], "numpy, matplotlib and tqdm are"),
    "convert-checkpoint": (["convert-checkpoint", "somewhere"], "numpy, matplotlib and tqdm"),
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_command_names_the_extra_in_one_line(name, tmp_path):
    argv, missing = COMMANDS[name]
    result = _run_without(EXTRA, *argv, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"dynabound {argv[0]}: error: {missing}"), lines[0]
    assert lines[0].endswith(f"this command needs the [experiments] extra; {INSTALL}")
    assert not any(tmp_path.iterdir())  # nothing was started


def test_only_what_is_missing_is_named(tmp_path):
    result = _run_without("sklearn", "run", "digits", "--optim", "adam", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "dynabound run: error: scikit-learn is not installed: this command needs the "
        f"[experiments] extra; {INSTALL}"
    )


def test_a_module_found_missing_only_on_import_is_reported_the_same_way(tmp_path):
    result = _run_without(EXTRA, "--checked-late", "demo", "--quick", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"dynabound demo: error: numpy is not installed: this command needs the [experiments] "
        f"extra; {INSTALL}"
    ]


def test_help_needs_no_extra(tmp_path):
    result = _run_without(EXTRA, "run", "digits", "--help", cwd=tmp_path)
    assert result.returncode == 0 and "--final-lr" in result.stdout, result.stderr
