"""One step, described once: the tensors it updates and the hyperparameters and flags of
their param group.

:meth:`dynabound.AdaBound.step` builds one :class:`StepSpec` per param group and passes it,
with the group's :class:`StepTensors`, through :func:`dynabound.functional.adabound_step`
to the eager paths and the fused kernels, which read its fields by name. What a backend
flattens is derived from the fields, in their order:

* :data:`FLOATS`, the fields annotated ``float`` (``lr`` first: a float or a tensor): the
  custom op's ``float[]`` argument (``dynabound.kernels.ops``), the head of the CPU kernel's
  ``hyper`` array (``dynabound.kernels.cpu``, whose C++ side names its own layout, compared
  when the library loads) and, but for lr, the Triton kernels' ``hyper`` table;
* :data:`FLAGS`, the fields annotated ``bool``: the custom op's ``bool[]`` argument.

So a new float hyperparameter is one new field here, its use in the math of each backend,
and its name in the C++ kernel's layout.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .bounds import BoundsSpec
from .state_formats import needs_encoding

__all__ = ["FLAGS", "FLOATS", "StepSpec", "StepTensors"]


class StepSpec(NamedTuple):
    """The hyperparameters and flags of one step of one param group.

    The fields are the keyword arguments of :func:`dynabound.functional.adabound` but for
    ``foreach`` and ``fused`` (which pick the implementation) and ``rounding_seeds`` (one
    per tensor: :class:`StepTensors`). ``lr`` is a float or a 0-dim tensor.
    """

    lr: float | Tensor
    beta1: float
    beta2: float
    final_lr: float
    base_lr: float
    gamma: float
    eps: float
    weight_decay: float
    amsbound: bool
    decoupled_weight_decay: bool
    unscaled_decay: bool
    maximize: bool
    bounds: BoundsSpec
    box: tuple[float, float] | None
    stochastic_rounding: bool = False
    capturable: bool = False
    differentiable: bool = False
    has_complex: bool = False
    state_dtype: torch.dtype | str | None = None
    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None

    def encodes(self, params: list[Tensor]) -> bool:
        """Whether stepping ``params`` encodes what it stores: low-precision moments or
        stochastically rounded bfloat16 parameters."""
        return needs_encoding(self.state_dtype, self.stochastic_rounding, params)


class StepTensors(NamedTuple):
    """The tensor lists of one step, as :func:`dynabound.functional.adabound` takes them.

    ``max_exp_avg_sqs`` is empty unless the step is AMSBound's; ``rounding_seeds`` (one
    integer per parameter, None: its position) seed the random bits of low-precision state.

    ``projection``, when given, is an output: a float64 tensor of shape (2,) into which the
    step *adds* ``sum(d*d)`` and ``sum(d*g)`` over every element it updates, where
    ``d = numerator / (sqrt(u) + eps) * m`` is the element's unclipped Adam step per unit of
    ``lr * scale`` (``numerator``, ``eps`` and ``scale`` as the backend uses them after
    :func:`dynabound.bounds.within_range`; ``m`` and ``u`` after this step's update) and
    ``g`` the gradient the step used (negated by ``maximize``, unscaled by ``grad_scale``,
    with coupled weight decay added). A step skipped for ``found_inf`` adds nothing.
    ``final_lr="auto"`` estimates its SGD rate from these two sums
    (:mod:`dynabound.final_lr`).
    """

    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list
    exp_avg_sqs: list
    max_exp_avg_sqs: list
    state_steps: list[Tensor]
    rounding_seeds: list[int] | None = None
    projection: Tensor | None = None

    def take(self, indices: list[int]) -> StepTensors:
        """The tensors at ``indices``; each keeps its seed (by default its position here).
        The projection output is shared: each part adds its sums into it."""
        seeds: Sequence[int] = (
            range(len(self.params)) if self.rounding_seeds is None else self.rounding_seeds
        )
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps = (
            [ts[i] for i in indices] if ts else [] for ts in self[:6]
        )
        return StepTensors(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs,
            state_steps,
            [seeds[i] for i in indices],
            self.projection,
        )


def _fields_annotated(kind: type) -> tuple[str, ...]:
    """The fields annotated ``kind`` or a union that includes it, in order."""
    hints = typing.get_type_hints(StepSpec)
    return tuple(
        name
        for name in StepSpec._fields
        if hints[name] is kind or kind in typing.get_args(hints[name])
    )


FLOATS = _fields_annotated(float)
FLAGS = _fields_annotated(bool)
