"""The fused step as a PyTorch custom op, for torch.compile.

The kernels take raw addresses, which tracing cannot follow, so a compiled step would
otherwise break the graph around them (or trace the much slower foreach path). As an op
with declared in-place effects, the step is one node of the compiled graph: compiling
``opt.step`` (or a whole training step) costs what the eager fused step costs, and no
graph break splits a compiled training step.

The op's arguments are what a schema can hold: tensors, floats, bools, strings. ``lr`` is
passed both as a tensor (when the group's lr is one, so a scheduler changing it in place
causes no recompilation) and as a float.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import fused_step

__all__ = ["call_fused_op", "fused_step_outside_graph"]

_MUTATED = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps")


@torch.library.custom_op("dynabound::fused_step_", mutates_args=_MUTATED)
def _fused_step_op(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    lr_tensor: Tensor | None,
    lr: float,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    amsbound: bool,
    beta1: float,
    beta2: float,
    final_lr: float,
    base_lr: float,
    gamma: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    unscaled_decay: bool,
    bounds: str,
    box: list[float] | None,
    maximize: bool,
    capturable: bool,
    has_complex: bool,
) -> None:
    fused_step(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        state_steps,
        lr=lr_tensor if lr_tensor is not None else lr,
        grad_scale=grad_scale,
        found_inf=found_inf,
        amsbound=amsbound,
        beta1=beta1,
        beta2=beta2,
        final_lr=final_lr,
        base_lr=base_lr,
        gamma=gamma,
        eps=eps,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        unscaled_decay=unscaled_decay,
        bounds=bounds,
        box=tuple(box) if box is not None else None,
        maximize=maximize,
        capturable=capturable,
        has_complex=has_complex,
    )


@_fused_step_op.register_fake
def _(*args, **kwargs) -> None:
    return None  # in place only: no outputs to describe


def call_fused_op(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, box, **kwargs
) -> None:
    """Call the op with the keyword arguments of :func:`dynabound.kernels.fused_adabound`."""
    lr_tensor = lr if isinstance(lr, Tensor) else None
    torch.ops.dynabound.fused_step_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        state_steps,
        lr_tensor,
        0.0 if lr_tensor is not None else lr,
        box=list(box) if box is not None else None,
        **kwargs,
    )


# A bound function is code, which an op's schema cannot carry: that step runs eagerly
# between compiled graphs.
fused_step_outside_graph = torch.compiler.disable(fused_step)
