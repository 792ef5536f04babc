"""Diagnostics: per-element effective learning rates, bound activity, and their figures.

* :func:`effective_lr`: the rate each element's update got in the last step, for
  dynabound's optimizers and torch.optim's Adam, AdamW, Adamax, RMSprop, Adagrad and SGD.
* :func:`bound_activity`: how many elements sit at the lower bound, the upper bound or
  between (the "how far along the Adam to SGD transition" meter).
* :class:`BoundMonitor`: both, every N steps, to a list, a CSV and TensorBoard.
* :func:`sign_alignment` / :class:`SignMonitor`: how sign-like an update is (cosine with
  sign(g), fraction of steps near lr): the sign-descent view of Adam-type methods.
* :func:`plot_rate_heatmap` / :func:`select_figure1_params`: the paper's Figure 1;
  :func:`plot_transition`: bound fractions over training (these need matplotlib).
"""

from .figures import plot_rate_heatmap, plot_transition, select_figure1_params
from .monitor import BoundMonitor, read_records
from .rates import (
    SUPPORTED_OPTIMIZERS,
    BoundActivity,
    ParamActivity,
    bound_activity,
    effective_lr,
    rate_statistics,
)
from .sign import SIGN_KEYS, SignMonitor, sign_alignment

__all__ = [
    "SIGN_KEYS",
    "SUPPORTED_OPTIMIZERS",
    "BoundActivity",
    "BoundMonitor",
    "ParamActivity",
    "SignMonitor",
    "bound_activity",
    "effective_lr",
    "plot_rate_heatmap",
    "plot_transition",
    "rate_statistics",
    "read_records",
    "select_figure1_params",
    "sign_alignment",
]
