"""Tests that start their own two-process gloo group; deselect with ``-m "not distributed"``."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "distributed: spawns two gloo processes on this machine (CPU only, a few seconds each)",
    )
