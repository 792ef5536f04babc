"""Session-wide test settings, and ``--core``: the library's own tests alone."""

import os
import sys
from pathlib import Path

import pytest

# JAX takes 75% of a GPU's memory when it starts; under pytest-xdist every worker that
# imports it would, and the torch CUDA tests then run out of memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# What `--core` leaves out: the reproduction harness, the frameworks' examples, and the
# JAX and Keras ports (whose frameworks the environments that test older torch releases do
# not install). Everything else here tests the PyTorch library and needs only `[experiments]`
# and the test tools.
NOT_CORE = ("experiments", "test_examples.py", "test_keras.py", "test_optax.py")
_HERE = Path(__file__).parent


def pytest_addoption(parser):
    parser.addoption(
        "--core",
        action="store_true",
        help="only the library's own tests: not tests/experiments (the harness) nor the "
        "frameworks' tests (" + ", ".join(NOT_CORE[1:]) + ")",
    )


def pytest_ignore_collect(collection_path, config):
    if config.getoption("--core") and collection_path.parent == _HERE:
        return collection_path.name in NOT_CORE or None
    return None


@pytest.fixture(autouse=True)
def _keep_subnormals():
    """Start every test with subnormal numbers kept, as IEEE arithmetic has them. Inductor
    in torch 2.4 and 2.5 loads code built with -ffast-math, which turns on flush-to-zero
    for the rest of the process, and tests of subnormal values would then depend on which
    test ran before them in the same process."""
    torch = sys.modules.get("torch")  # nothing to undo before torch is imported
    if torch is not None:
        torch.set_flush_denormal(False)
