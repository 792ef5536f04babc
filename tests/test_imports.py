"""Frameworks do not pull each other in: the optax and Keras ports import no torch, and a
missing framework is named in one line. Each case runs in a fresh interpreter in which the
frameworks it lacks cannot be imported, as in an environment where they are not installed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = """
import importlib.abc, sys
class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _NotInstalled())
"""


def _run(code: str, blocked: set[str] = frozenset(), **env: str) -> subprocess.CompletedProcess:
    script = BLOCKER.format(blocked=set(blocked)) + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **env},
    )


def _needs(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed")


def test_optax_port_imports_no_torch():
    _needs("jax", "optax")
    result = _run(
        """
        import sys
        import jax.numpy as jnp
        import dynabound, dynabound.optax
        final_lr = dynabound.final_lr_from_sgd(0.1)
        opt = dynabound.optax.adabound(learning_rate=1e-3, final_lr=final_lr)
        state = opt.init({"w": jnp.ones(3)})
        updates, _ = opt.update({"w": jnp.ones(3)}, state, {"w": jnp.ones(3)})
        assert "torch" not in sys.modules, "torch was imported"
        print("ok", float(updates["w"][0]))
        """,
        blocked={"torch"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_keras_port_imports_no_torch():
    _needs("keras", "jax")
    result = _run(
        """
        import sys
        import dynabound.keras
        opt = dynabound.keras.AdaBound(learning_rate=1e-3, final_lr=0.1)
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
        """,
        blocked={"torch"},
        KERAS_BACKEND="jax",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_torch_optimizers_without_torch_name_the_extra_in_one_line():
    result = _run(
        """
        from dynabound import AdaBound
        """,
        blocked={"torch"},
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: dynabound's PyTorch optimizers need PyTorch")
    assert '".[torch]"' in last


def test_plain_python_helpers_need_no_framework():
    result = _run(
        """
        import sys
        import dynabound
        print(dynabound.final_lr_from_sgd(0.1), dynabound.scale_batch_size(
            {"lr": 1e-3}, 128, 512, method="adam")["lr"], dynabound.__version__)
        assert not {"torch", "jax", "keras"} & set(sys.modules)
        """,
        blocked={"torch", "jax", "optax", "keras"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:2] == ["1.0", "0.002"]


def test_torch_only_environment():
    """Without jax, optax and keras the PyTorch optimizers work, and the ports say which
    extra they need."""
    result = _run(
        """
        import torch
        from dynabound import AdaBound
        p = torch.nn.Parameter(torch.ones(3))
        p.grad = torch.ones(3)
        AdaBound([p]).step()
        try:
            import dynabound.optax
        except ImportError as error:
            print("optax:", error)
        """,
        blocked={"jax", "optax", "keras"},
    )
    assert result.returncode == 0, result.stderr
    assert "optax: dynabound.optax needs" in result.stdout


def test_unknown_attribute_is_an_attribute_error():
    import dynabound

    with pytest.raises(AttributeError, match="no attribute 'Adabound'"):
        dynabound.Adabound  # noqa: B018
    assert {"AdaBound", "final_lr_from_sgd"} <= set(dir(dynabound))


def test_version_is_defined_once():
    """pyproject reads the version from the package (hatch's dynamic version)."""
    import dynabound

    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert 'path = "src/dynabound/__init__.py"' in pyproject
    assert "\nversion =" not in pyproject
    assert dynabound.__version__.count(".") == 2
