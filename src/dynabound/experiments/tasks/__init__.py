"""The paper's experiments as tasks the runner can train: a small registry by name."""

from __future__ import annotations

from .base import ClassificationTask, DistInfo, EpochContext, Task
from .cifar10 import CIFAR10Task
from .convex import ConvexTask
from .digits import DigitsTask
from .mnist import MNISTTask
from .ptb import PTBTask

__all__ = [
    "TASKS",
    "ClassificationTask",
    "DistInfo",
    "EpochContext",
    "Task",
    "get_task",
]

TASKS: dict[str, type[Task]] = {
    cls.name: cls for cls in (ConvexTask, DigitsTask, MNISTTask, CIFAR10Task, PTBTask)
}


def get_task(name: str) -> type[Task]:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]
