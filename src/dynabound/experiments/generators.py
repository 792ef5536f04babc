"""Every random generator a run draws from, as data that ``torch.load(weights_only=True)``
accepts: tensors, numbers, strings, lists and dicts.

numpy's state is a tuple holding a numpy array and Python's a tuple of 625 ints; the
weights-only loader refuses numpy arrays, so both are taken apart into a tensor, lists and
numbers here and put back together exactly.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = [
    "numpy_state",
    "python_state",
    "rng_state",
    "seed_all",
    "set_rng_state",
]


def numpy_state(raw: tuple[Any, ...]) -> dict[str, Any]:
    """numpy's legacy ``get_state()`` tuple (algorithm, 624 uint32 words, position,
    has_gauss, cached_gaussian) as plain data."""
    algorithm, key, pos, has_gauss, cached_gaussian = raw
    return {
        "algorithm": str(algorithm),
        "key": torch.from_numpy(np.asarray(key, dtype=np.int64).copy()),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _numpy_raw(state: dict[str, Any]) -> tuple[Any, ...]:
    key = state["key"].cpu().numpy().astype(np.uint32)
    return (
        state["algorithm"],
        key,
        int(state["pos"]),
        int(state["has_gauss"]),
        float(state["cached_gaussian"]),
    )


def python_state(raw: tuple[Any, ...]) -> dict[str, Any]:
    """``random.getstate()`` (version, 625 ints, gauss_next) as plain data."""
    version, internal, gauss_next = raw
    return {
        "version": int(version),
        "internal": [int(v) for v in internal],
        "gauss_next": None if gauss_next is None else float(gauss_next),
    }


def _python_raw(state: dict[str, Any]) -> tuple[Any, ...]:
    return state["version"], tuple(int(v) for v in state["internal"]), state["gauss_next"]


def rng_state(device: torch.device) -> dict[str, Any]:
    """torch's, numpy's and Python's global generators (and ``device``'s on CUDA)."""
    legacy = np.random.get_state(legacy=True)
    if not isinstance(legacy, tuple):  # numpy's global generator is always MT19937
        raise TypeError(f"numpy's global generator is not MT19937: {legacy!r}")
    state = {
        "torch": torch.get_rng_state(),
        "numpy": numpy_state(legacy),
        "python": python_state(random.getstate()),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(_numpy_raw(state["numpy"]))
    random.setstate(_python_raw(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
