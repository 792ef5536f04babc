"""What only a torch.compile trace of ``step()`` needs, imported while tracing.

Marking functions for dynamo (``torch.compiler.disable``, ``assume_constant_result``)
imports ``torch._dynamo``, which costs more than a second; doing it here, on the first
traced step, keeps ``import dynabound`` free of that cost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import kernels


@torch.compiler.disable
def lr_as_tensor(group: dict[str, Any]) -> Tensor:
    """The group's float lr read outside the graph and handed in as a tensor: a graph
    specialised on the float would recompile whenever a scheduler changes it."""
    return torch.tensor(group["lr"], dtype=torch.float64)


@torch.compiler.disable
def call_eagerly(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` run eagerly, between compiled graphs: final_lr="auto"'s
    estimating steps read their projection on the host and grow their record."""
    return function(*args)


@torch.compiler.assume_constant_result
def kernel_ready(device_type: str) -> bool:
    """Whether the default may use the fused kernel: asked once per trace, not per step."""
    return kernels.default_kernel_ready(device_type)
