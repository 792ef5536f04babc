"""Stand-ins for the device side of the fused CUDA path, so its host side runs on CPU
tensors: a recorder in place of a Triton kernel, and a mode that lists the torch ops a
step dispatches."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class LaunchRecorder:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` counts the launch and runs
    nothing."""

    def __init__(self) -> None:
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1

        return launch


class TorchOps(TorchDispatchMode):
    """The torch ops dispatched inside the mode, by name, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace != "profiler":  # optimizer.step()'s annotations, not device work
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))
