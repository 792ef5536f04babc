"""The fused step as a PyTorch operator, for torch.compile.

The kernels take raw addresses, which tracing cannot follow, so a compiled step would
otherwise break the graph around them (or trace the much slower foreach path). As an
operator with declared in-place effects, ``torch.ops.dynabound.fused_step_``, the step is
one node of the compiled graph, and a compiled step costs about what an eager one does.

It is defined with ``torch.library.Library`` rather than ``custom_op``: custom_op's Python
wrapper walks its argument schema and bumps the version of every mutated tensor on each
call, about 1.5 ms per step for 110 parameter tensors on a CPU, while this operator's only
Python is the step itself. The step's :class:`~dynabound.spec.StepSpec` travels flattened
for the same reason: its float fields in one ``float[]`` and its flags in one ``bool[]``,
in the order of :data:`dynabound.spec.FLOATS` and :data:`dynabound.spec.FLAGS`. ``lr``
goes both as a tensor (when the group's lr is one, so a scheduler changing it in place
causes no recompilation) and as a float.

Imported only when a step is traced (``torch._dynamo`` is loaded by then).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..spec import FLAGS, FLOATS, StepSpec, StepTensors
from .dispatch import fused_step

__all__ = ["call_fused_op", "fused_step_outside_graph"]

# The fields the op carries besides FLOATS and FLAGS, and the one it never sees: steps with
# low-precision state run outside the graph (their 8-bit moments are pairs of tensors).
_CARRIED = ("bounds", "box", "grad_scale", "found_inf")
_NEVER_IN_GRAPH = ("state_dtype",)


def _without_argument(fields: tuple[str, ...]) -> list[str]:
    """The fields the op would drop: a new StepSpec field that is neither a float nor a
    flag needs an argument of its own."""
    return sorted(set(fields) - {*FLOATS, *FLAGS, *_CARRIED, *_NEVER_IN_GRAPH})


if _without_argument(StepSpec._fields):
    raise TypeError(f"the fused op has no argument for {_without_argument(StepSpec._fields)}")

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
    fields = dict(zip(FLOATS, floats, strict=True)) | dict(zip(FLAGS, flags, strict=True))
    if lr_tensor is not None:
        fields["lr"] = lr_tensor
    spec = StepSpec(
        **fields,
        bounds=bounds,
        box=tuple(box) if box is not None else None,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )
    tensors = StepTensors(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
    fused_step(tensors, spec)


def _fake(*args) -> None:
    return None  # in place only: no outputs to describe


_library.impl("fused_step_", _fused_step_op, "CompositeExplicitAutograd")
torch.library.register_fake("dynabound::fused_step_", _fake, lib=_library)


def call_fused_op(tensors: StepTensors, spec: StepSpec) -> None:
    """Run the step as the op (its tensors without low-precision state)."""
    if tensors.projection is not None:
        # The schema has no output for the projection: the sums would silently stay 0.
        raise RuntimeError(
            "the fused op cannot compute final_lr='auto''s projection; run the estimating "
            "step outside the graph (fused_step_outside_graph)"
        )
    lr_tensor = spec.lr if isinstance(spec.lr, Tensor) else None
    floats = [float(getattr(spec, name)) for name in FLOATS if name != "lr"]
    floats.insert(FLOATS.index("lr"), 0.0 if lr_tensor is not None else float(spec.lr))
    torch.ops.dynabound.fused_step_(
        *tensors[:6],
        lr_tensor,
        spec.grad_scale,
        spec.found_inf,
        floats,
        [bool(getattr(spec, name)) for name in FLAGS],
        spec.bounds,
        list(spec.box) if spec.box is not None else None,
    )


# A bound function is code, which an op's schema cannot carry: that step runs eagerly
# between compiled graphs.
fused_step_outside_graph = torch.compiler.disable(fused_step)
