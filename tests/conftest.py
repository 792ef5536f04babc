"""Session-wide test settings."""

import os

# JAX takes 75% of a GPU's memory when it starts; under pytest-xdist every worker that
# imports it would, and the torch CUDA tests then run out of memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
