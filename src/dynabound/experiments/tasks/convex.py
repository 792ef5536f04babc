"""The online convex counterexample on which Adam converges to the worst point.

Linear losses ``f_t(x) = g_t * x`` on ``x in [-1, 1]`` with ``g_t = C`` once every
``period`` steps (at ``t mod period == 1``) and ``g_t = -slope`` otherwise. Because
``C > (period - 1) * slope`` the best fixed point is ``x = -1``; Adam's exponential average
forgets the rare large gradient and drifts to ``x = +1``, which has the largest regret.

Problems (the constants are Reddi et al.'s, "On the Convergence of Adam and Beyond", 2018):

* ``theorem`` (default): their Theorem 1, ``C = 3``, ``period = 3``, ``slope = 1``, with
  ``beta1 = 0`` and ``beta2 = 1 / (1 + C^2)``.
* ``synthetic``: their Section 5 experiment, ``f_t = 1010 x`` once every 101 steps and
  ``-10 x`` otherwise, with ``beta1 = 0.9``, ``beta2 = 0.99``.

Adam and AMSGrad use Reddi et al.'s step size ``alpha / sqrt(t)`` followed by projection
onto [-1, 1]; AdaBound and AMSBound use the paper's theory variant (Algorithm 2:
``bounds="paper"``, which divides the clipped rate by ``sqrt(t)``, and ``box=(-1, 1)``).
Their ``final_lr`` belongs to the problem: 0.5 for ``theorem``; 1e-3 for ``synthetic``,
whose gradient of 1010 would otherwise throw x across the whole interval (with 0.5 the
average regret after 20000 steps is 9.6, with 1e-3 it is 0.07 after 50000).
One epoch is ``--steps-per-epoch`` online steps.

``--sequence`` states any other periodic linear problem on [-1, 1] directly: the gradients
of one period, ``value`` or ``value*count`` separated by commas (``3,-1,-1`` is
``theorem``; ``-100,2,0*8`` is ``f_t = -100 x``, then ``2 x``, then eight zero losses).
The regret is measured against the best fixed point of [-1, 1], whatever the sequence.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..optimizers import is_dynabound
from .base import EpochContext, Task

__all__ = ["PROBLEMS", "ConvexTask", "parse_sequence"]

PROBLEMS: dict[str, dict[str, float]] = {
    "theorem": {"C": 3.0, "period": 3, "slope": 1.0, "beta1": 0.0, "beta2": 0.1, "final_lr": 0.5},
    "synthetic": {
        "C": 1010.0,
        "period": 101,
        "slope": 10.0,
        "beta1": 0.9,
        "beta2": 0.99,
        "final_lr": 1e-3,
    },
}
TRACE_POINTS = 200  # samples of x_t and the average regret kept per epoch


def parse_sequence(text: str) -> torch.Tensor:
    """``"-100,2,0*8"`` -> the ten gradients of one period."""
    values: list[float] = []
    for item in text.split(","):
        value, _, count = item.strip().partition("*")
        try:
            repeat = int(count) if count else 1
            values.extend([float(value)] * repeat)
        except ValueError:
            raise ValueError(
                f"bad --sequence item {item.strip()!r}: use a number or number*count"
            ) from None
        if repeat < 1:
            raise ValueError(f"bad --sequence item {item.strip()!r}: count must be positive")
    grads = torch.tensor(values, dtype=torch.float64)
    if not torch.isfinite(grads).all() or not grads.any():
        raise ValueError("--sequence needs finite gradients, not all zero")
    return grads


class _Point(nn.Module):
    def __init__(self, x0: float):
        super().__init__()
        self.x = nn.Parameter(torch.tensor([float(x0)], dtype=torch.float64))


class ConvexTask(Task):
    name = "convex"
    description = (
        "Reddi et al.'s online convex counterexample (f_t(x) = C x once every few steps, "
        "-x otherwise, on [-1, 1]): Adam converges to the worst point x = 1"
    )
    metric = "regret"
    defaults = {"epochs": 5, "batch_size": 1, "milestones": [], "lr_decay": 0.1}
    optimizers = ("adam", "amsgrad", "adabound", "amsbound")
    supports_distributed = False

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--problem",
            choices=sorted(PROBLEMS),
            default=None,
            help="constants and betas (default theorem)",
        )
        parser.add_argument(
            "--C",
            type=float,
            default=None,
            dest="C",
            help="the rare large gradient (overrides the problem's)",
        )
        parser.add_argument(
            "--period", type=int, default=None, help="the large gradient comes at t mod period == 1"
        )
        parser.add_argument(
            "--slope", type=float, default=None, help="the other steps' gradient is -slope"
        )
        parser.add_argument(
            "--sequence",
            default=None,
            metavar="G1,G2*K,...",
            help="one period of gradients, repeated (e.g. 3,-1,-1); replaces C, period and "
            "slope; write --sequence=-100,2,0*8 when the first is negative",
        )
        parser.add_argument(
            "--steps-per-epoch",
            type=int,
            default=None,
            help="online steps per epoch (default 1000)",
        )
        parser.add_argument("--x0", type=float, default=None, help="starting point (default 0)")

    @classmethod
    def task_args(cls, ns: argparse.Namespace) -> dict[str, Any]:
        return {
            "problem": ns.problem,
            "C": ns.C,
            "period": ns.period,
            "slope": ns.slope,
            "sequence": ns.sequence,
            "steps_per_epoch": ns.steps_per_epoch,
            "x0": ns.x0,
        }

    @classmethod
    def run_name(cls, config: dict[str, Any]) -> str:
        args = config["task_args"]
        problem = "sequence" if args.get("sequence") else args.get("problem") or "theorem"
        return f"convex-{problem}-{config['optim']}"

    @classmethod
    def check_args(cls, args: dict[str, Any]) -> None:
        cls.problem_sequence(args)
        steps = args.get("steps_per_epoch")
        if steps is not None and steps < 1:
            raise ValueError(f"--steps-per-epoch must be positive, got {steps}")

    @classmethod
    def problem_sequence(cls, args: dict[str, Any]) -> torch.Tensor:
        """One period of the gradients the options describe."""
        if args.get("sequence") is not None:
            return parse_sequence(args["sequence"])
        problem = dict(PROBLEMS[args.get("problem") or "theorem"])
        for key in ("C", "period", "slope"):
            if args.get(key) is not None:
                problem[key] = args[key]
        C, period, slope = float(problem["C"]), int(problem["period"]), float(problem["slope"])
        if period < 2 or C <= 0 or slope < 0:
            raise ValueError("convex problem needs period >= 2, C > 0 and slope >= 0")
        return torch.tensor([C] + [-slope] * (period - 1), dtype=torch.float64)

    def __init__(self, config, device, dist):
        super().__init__(config, device, dist)
        self.check_args(self.args)
        self.sequence = self.problem_sequence(self.args)
        self.steps_per_epoch = int(self.args.get("steps_per_epoch") or 1000)
        self.sum_gx = 0.0  # sum of g_t * x_t so far
        self.sum_g = 0.0

    @classmethod
    def adjust_hparams(
        cls, optim: str, hparams: dict[str, Any], task_args: dict[str, Any]
    ) -> dict[str, Any]:
        # The betas belong to the problem (Theorem 1 needs beta1 = 0, beta2 = 1/(1+C^2)),
        # and so does the bounded methods' final_lr (the gradients' scale differs 300x).
        problem = PROBLEMS[task_args.get("problem") or "theorem"]
        hparams = dict(hparams)
        hparams.setdefault("beta1", problem["beta1"])
        hparams.setdefault("beta2", problem["beta2"])
        if is_dynabound(optim):
            hparams.setdefault("final_lr", problem["final_lr"])
        return hparams

    def load_data(self) -> None:
        x0 = self.args.get("x0")
        self.model_spec = {"x0": 0.0 if x0 is None else float(x0)}

    def build_model(self, spec: dict[str, Any]) -> nn.Module:
        return _Point(spec["x0"])

    def gradients(self, first_step: int, n: int) -> torch.Tensor:
        """g_t for t = first_step, ..., first_step + n - 1 (t counts from 1)."""
        t = torch.arange(first_step, first_step + n, dtype=torch.int64)
        return self.sequence[(t - 1) % len(self.sequence)]

    def train_epoch(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: EpochContext
    ) -> dict[str, float]:
        x = ctx.raw_model.x
        n = self.steps_per_epoch
        done = ctx.start_batch
        first = ctx.global_step - done + 1  # t of the epoch's first step
        grads = self.gradients(first, n)
        xs = torch.empty(n, dtype=torch.float64)
        if ctx.resume_state is not None:
            xs[:done] = ctx.resume_state["xs"]
        bounded = is_dynabound(optimizer)
        alpha = [group.get("alpha", group["lr"]) for group in optimizer.param_groups]
        for group, a in zip(optimizer.param_groups, alpha, strict=True):
            group["alpha"] = a  # kept in the group so that a resumed run has it
        x.grad = torch.zeros_like(x)
        k = done - 1

        def state() -> dict[str, Any]:
            return {"xs": xs[: k + 1].clone()}

        steps = ctx.progress(range(done, n), total=n, initial=done, desc=f"epoch {ctx.epoch}")
        for k in steps:
            t = first + k
            with torch.no_grad():
                xs[k] = x[0]
                x.grad.copy_(grads[k : k + 1])
            if not bounded:
                for group in optimizer.param_groups:
                    group["lr"] = group["alpha"] / math.sqrt(t)
            optimizer.step()
            if not bounded:
                with torch.no_grad():
                    x.clamp_(-1.0, 1.0)
            ctx.global_step += 1
            ctx.on_batch(k, state)
        sum_gx = self.sum_gx + torch.cumsum(grads * xs, 0)
        sum_g = self.sum_g + torch.cumsum(grads, 0)
        steps_done = torch.arange(first, first + n, dtype=torch.float64)
        avg_regret = (sum_gx + sum_g.abs()) / steps_done
        self.sum_gx, self.sum_g = float(sum_gx[-1]), float(sum_g[-1])
        pick = torch.linspace(0, n - 1, min(n, TRACE_POINTS)).round().long().unique()
        return {
            "x": float(x.detach()[0]),
            "avg_regret": float(avg_regret[-1]),
            "loss": float((grads * xs).mean()),
            "trace_t": steps_done[pick].long().tolist(),
            "trace_x": xs[pick].tolist(),
            "trace_avg_regret": avg_regret[pick].tolist(),
        }

    def evaluate(self, model: nn.Module, ctx: EpochContext) -> dict[str, float]:
        return {}

    def summary(self, metrics: dict[str, Any]) -> str:
        return f"x {metrics['x']:+.4f} | average regret {metrics['avg_regret']:.4f}"

    def state_dict(self) -> dict[str, Any]:
        return {"sum_gx": self.sum_gx, "sum_g": self.sum_g}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sum_gx, self.sum_g = float(state["sum_gx"]), float(state["sum_g"])

    def figures(self, run_dir: Path, metrics: list[dict[str, Any]]) -> list[Path]:
        from ..plots import plot_convex

        return [plot_convex([run_dir], run_dir / "convex.png")]
