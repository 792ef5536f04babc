"""The fused step as a PyTorch operator, for torch.compile.

The kernels take raw addresses, which tracing cannot follow, so a compiled step would
otherwise break the graph around them (or trace the much slower foreach path). As an
operator with declared in-place effects, ``torch.ops.dynabound.fused_step_``, the step is
one node of the compiled graph, and a compiled step costs about what an eager one does.

It is defined with ``torch.library.Library`` rather than ``custom_op``: custom_op's Python
wrapper walks its argument schema and bumps the version of every mutated tensor on each
call, about 1.5 ms per step for 110 parameter tensors on a CPU, while this operator's only
Python is the step itself. The hyperparameters travel packed in a few list arguments for
the same reason. ``lr`` goes both as a tensor (when the group's lr is one, so a scheduler
changing it in place causes no recompilation) and as a float.

Imported only when a step is traced (``torch._dynamo`` is loaded by then).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import fused_step

__all__ = ["call_fused_op", "fused_step_outside_graph"]

# Order of the packed arguments.
_FLOATS = ("lr", "beta1", "beta2", "final_lr", "base_lr", "gamma", "eps", "weight_decay")
_FLAGS = (
    "amsbound", "decoupled_weight_decay", "unscaled_decay", "maximize", "capturable",
    "has_complex",
)  # fmt: skip

_library = torch.library.Library("dynabound", "DEF")  # lives as long as the process
_library.define(
    "fused_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
    "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] state_steps, "
    "Tensor? lr_tensor, Tensor? grad_scale, Tensor? found_inf, float[] floats, bool[] flags, "
    "str bounds, float[]? box) -> ()"
)


def _fused_step_op(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr_tensor, grad_scale,
    found_inf, floats, flags, bounds, box,
) -> None:  # fmt: skip
    options = dict(zip(_FLOATS, floats, strict=True)) | dict(zip(_FLAGS, flags, strict=True))
    if lr_tensor is not None:
        options["lr"] = lr_tensor
    fused_step(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        state_steps,
        grad_scale=grad_scale,
        found_inf=found_inf,
        bounds=bounds,
        box=tuple(box) if box is not None else None,
        **options,
    )


def _fake(*args) -> None:
    return None  # in place only: no outputs to describe


_library.impl("fused_step_", _fused_step_op, "CompositeExplicitAutograd")
torch.library.register_fake("dynabound::fused_step_", _fake, lib=_library)


def call_fused_op(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, box, bounds,
    grad_scale, found_inf, **options,
) -> None:  # fmt: skip
    """Call the op with the keyword arguments of :func:`dynabound.kernels.fused_adabound`."""
    lr_tensor = lr if isinstance(lr, Tensor) else None
    options["lr"] = 0.0 if lr_tensor is not None else lr
    torch.ops.dynabound.fused_step_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        state_steps,
        lr_tensor,
        grad_scale,
        found_inf,
        [float(options[k]) for k in _FLOATS],
        [bool(options[k]) for k in _FLAGS],
        bounds,
        list(box) if box is not None else None,
    )


# A bound function is code, which an op's schema cannot carry: that step runs eagerly
# between compiled graphs.
fused_step_outside_graph = torch.compiler.disable(fused_step)
