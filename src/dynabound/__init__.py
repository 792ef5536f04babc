"""dynabound: AdaBound and AMSBound (Luo et al., ICLR 2019) for PyTorch and JAX."""

from .optim import AdaBound, AdaBoundW, AMSBound, AMSBoundW

__all__ = ["AdaBound", "AMSBound", "AdaBoundW", "AMSBoundW"]
__version__ = "0.1.0"
