"""dynabound: AdaBound and AMSBound (Luo et al., ICLR 2019) for PyTorch and JAX."""

from .final_lr import final_lr_from_sgd
from .optim import AdaBound, AdaBoundW, AMSBound, AMSBoundW
from .scaling import scale_batch_size

__all__ = [
    "AdaBound",
    "AMSBound",
    "AdaBoundW",
    "AMSBoundW",
    "final_lr_from_sgd",
    "scale_batch_size",
]
__version__ = "0.1.0"
