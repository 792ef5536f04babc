"""dynabound: AdaBound and AMSBound (Luo et al., ICLR 2019) for PyTorch, JAX and Keras.

The PyTorch optimizers are imported on first use, so ``import dynabound.optax`` and
``import dynabound.keras`` never import torch: a JAX or Keras user installs and loads none
of it. ``final_lr_from_sgd`` and ``scale_batch_size`` are plain Python.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .final_lr import final_lr_from_sgd
from .scaling import scale_batch_size

if TYPE_CHECKING:
    from .optim import AdaBound, AdaBoundW, AMSBound, AMSBoundW

__all__ = [
    "AdaBound",
    "AMSBound",
    "AdaBoundW",
    "AMSBoundW",
    "final_lr_from_sgd",
    "scale_batch_size",
]
__version__ = "0.1.0"

_TORCH_NAMES = frozenset({"AdaBound", "AMSBound", "AdaBoundW", "AMSBoundW"})
TORCH_MISSING = (
    "dynabound's PyTorch optimizers need PyTorch, which is not installed; install it with "
    'dynabound\'s torch extra: python -m pip install ".[torch]" from a clone of dynabound'
)


def __getattr__(name: str) -> Any:
    if name not in _TORCH_NAMES:
        raise AttributeError(f"module 'dynabound' has no attribute {name!r}")
    try:
        from . import optim
    except ModuleNotFoundError as error:
        if error.name != "torch":
            raise
        raise ModuleNotFoundError(TORCH_MISSING, name="torch") from None
    value = getattr(optim, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | _TORCH_NAMES)
