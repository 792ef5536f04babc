"""Real training: a small MLP learns a teacher network's labels with each optimizer class."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dynabound import AdaBound, AdaBoundW, AMSBound, AMSBoundW

STEPS = 300
# Cross-entropy starts near ln(3) = 1.10. The four classes reach about 0.20 in 300 steps; plain
# SGD (lr 0.1) or momentum SGD at the final rate (lr 0.01, momentum 0.9) only reach about 0.43,
# so the threshold needs the adaptive phase to work, not just some descent.
THRESHOLD = 0.3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # A tiny model: thread start-up and contention cost more than they give.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def teacher_data(n: int = 512, dim: int = 10, classes: int = 3) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=gen)
    w1 = torch.randn(dim, 16, generator=gen)
    w2 = torch.randn(16, classes, generator=gen)
    y = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
    return x, y


def train(optimizer_cls: type[torch.optim.Optimizer], **kwargs: object) -> float:
    torch.manual_seed(0)
    x, y = teacher_data()
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = optimizer_cls(model.parameters(), **kwargs)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(STEPS):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return loss_fn(model(x), y).item()


@pytest.mark.parametrize("optimizer_cls", [AdaBound, AMSBound, AdaBoundW, AMSBoundW])
def test_reaches_loss_threshold(optimizer_cls: type[torch.optim.Optimizer]) -> None:
    loss = train(optimizer_cls, lr=1e-2, final_lr=0.1, weight_decay=5e-4)
    assert loss < THRESHOLD, f"{optimizer_cls.__name__}: final loss {loss:.4f}"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.0, "base_lr": 1e-2},
        {"lr": 1e-2, "maximize": True},
        # both bounds 0 (final_lr = 0 is refused): the clipping must stop every update
        {"lr": 1e-2, "bounds": lambda step: (0.0, 0.0)},
    ],
    ids=["lr0", "maximize", "zero_bounds"],
)
def test_threshold_rejects_a_non_learning_optimizer(kwargs: dict[str, object]) -> None:
    # Guards the threshold itself: an optimizer that does not descend must miss it.
    assert train(AdaBound, **kwargs) > 3 * THRESHOLD
