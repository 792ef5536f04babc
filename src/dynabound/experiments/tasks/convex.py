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

``section3``: the AdaBound paper's Section 3 example (Luo, Xiong, Liu and Sun, "Adaptive
Gradient Methods with Dynamic Bound of Learning Rate", 2019), the one behind its Theorem 1.
On F = [-1, 1], with C = ``--period``::

    f_t(x) = -100                   for x < 0
             0                      for x > 1
             -x   if t mod C == 1   for 0 <= x <= 1
             2x   if t mod C == 2
             0    otherwise

So once every C steps the gradient is -1 (it pushes x up, the wrong way), at the next step
+2, and 0 at the other C - 2 steps. Although 2 outweighs 1, Adam's second-moment average has
decayed over the zero steps when the -1 arrives, so the -1 step gets a large rate and the +2
step right after it a small one, and x drifts up. The paper takes beta1 = 0 and C large enough
that ``5 * beta2**(C - 2) <= (1 - beta2) / (4 - beta2)``; its Theorem 1 says that Adam then
ends, for any initial step size, at a highly suboptimal x >= 0 with non-zero average regret,
while AMSGrad and the bounded methods do not. Provenance: the losses, this condition and the
theorem's claim are recalled from a summary of the paper; they have not been checked against
its text. Defaults: beta2 = 0.9 and C = 50, the smallest period that satisfies the condition
for beta2 = 0.9 (``section3_min_period``); x_1 = 1, where the paper's proofs (and Reddi et
al.'s) start. A period and beta2 (``--period``, ``--beta2``) that violate the condition, or a
beta1 other than 0, still define a valid problem but not the theorem's: the run goes ahead
with a warning that names the smallest period the condition allows.

What the implementation does at the seams, and why:

* On [0, 1] (both ends included, as in the formula) the loss is the linear piece and the
  gradient its slope: -1, +2 or 0. At x = 1, which Adam keeps reaching through the
  projection, the slope is the left derivative; the loss does not jump there within F,
  since x > 1 lies outside F and is never evaluated.
* At x = 0 the loss jumps from -100 (left) to 0 (right), so the losses are neither
  continuous nor convex on F: no subgradient exists at 0, and the problem is an online
  optimization problem with convex pieces rather than an online convex one. The value at 0
  is the middle piece's, so the gradient there is that piece's slope (the right derivative),
  what automatic differentiation of the formula also gives. With the left derivative (0)
  instead, a point that landed exactly on 0 could never move again.
* For x < 0 the loss is flat: the gradient is 0.

Consequently nothing in the losses ever points into x < 0: the gradient on [0, 1] is the
slope of a piece that knows nothing of the -100 beyond its edge. An optimizer enters x < 0
only by overshooting: a +2 step longer than the current x carries it past 0, and the
projection onto [-1, 1] keeps it at -1 or above. With beta1 = 0 its next updates are all 0
(zero gradient, zero first moment), so it stays exactly where it landed, at the optimum, for
good. That is how the paper's conclusion has to be read: AMSGrad and the bounded methods drift
down to 0 because their +2 steps outweigh the -1 steps, and then overshoot; Adam's -1 steps
outweigh its +2 steps, so it drifts up towards x = 1 and reaches x < 0 only if one early +2
step is already longer than the distance to 0. The best fixed point is any x < 0 (loss -100
per step, far below anything [0, 1] offers), so a run left on x >= 0 pays an average regret
of about 100. The regret is measured against the minimum of the summed losses over F, found
piece by piece (``best_fixed_point``): -100 T on [-1, 0), and min(0, sum of slopes) on [0, 1].

Adam and AMSGrad, AdaBound and AMSBound run as for the other problems, with final_lr 0.5.
With the defaults Adam stays on x >= 0 and the other three end at x < 0, as the paper says,
but the first steps decide more than the theorem suggests (docs/figures/section3-results.md).
AdaBound and AMSBound cross at their second step, where Algorithm 2's Adam phase (no bias
correction) gives the +2 a rate of 0.5/sqrt(0.49), well inside the early bounds: the
overshoot is not the bounds' doing, and an Adam without bias correction (the one the theorems
analyse) would take the same step and cross too. The Adam here is torch's, whose bias
correction shortens that step; it crosses there once alpha > 1.136. Whatever x_1 in [0, 1],
a large enough alpha carries the first +2 step past 0, so "for any initial step size" cannot
hold for these losses as written here.
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..optimizers import is_dynabound
from .base import EpochContext, Task

__all__ = [
    "PROBLEMS",
    "SECTION3_LOW",
    "ConvexTask",
    "best_fixed_point",
    "parse_sequence",
    "section3_condition",
    "section3_gradient",
    "section3_loss",
    "section3_min_period",
]

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
    # C = period: the -1 comes at t mod C == 1, the +2 at t mod C == 2. 50 is the smallest
    # period that satisfies the theorem's condition for beta2 = 0.9 (section3_min_period).
    "section3": {"period": 50, "beta1": 0.0, "beta2": 0.9, "final_lr": 0.5, "x0": 1.0},
}
SECTION3_LOW = -100.0  # f_t(x) for x < 0 in the section3 problem
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


def section3_loss(slope: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """f_t(x) of the section3 problem, element-wise, for the slope of its middle piece
    (-1, +2 or 0 at step t): -100 on x < 0, ``slope * x`` on [0, 1], 0 on x > 1."""
    middle = torch.where(x <= 1, slope * x, torch.zeros_like(x))
    return torch.where(x < 0, torch.full_like(x, SECTION3_LOW), middle)


def section3_gradient(slope: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The gradient the optimizers get: the slope on [0, 1] (ends included: at 0 the right
    derivative, the piece the loss's value belongs to), 0 on x < 0 and x > 1."""
    inside = (x >= 0) & (x <= 1)
    return torch.where(inside, slope, torch.zeros_like(slope))


def section3_condition(period: int, beta2: float) -> bool:
    """The theorem's condition on C and beta2: ``5 beta2^(C-2) <= (1-beta2)/(4-beta2)``."""
    return 5 * beta2 ** (period - 2) <= (1 - beta2) / (4 - beta2)


def section3_min_period(beta2: float) -> int:
    """The smallest period C >= 3 that satisfies :func:`section3_condition` for beta2."""
    if not 0 <= beta2 < 1:
        raise ValueError(f"beta2 must be in [0, 1), got {beta2}")
    if beta2 == 0:
        return 3
    # Solve for C, then correct the float rounding of the logarithms by stepping.
    period = max(3, math.ceil(2 + math.log((1 - beta2) / (5 * (4 - beta2))) / math.log(beta2)))
    while period > 3 and section3_condition(period - 1, beta2):
        period -= 1
    while not section3_condition(period, beta2):
        period += 1
    return period


def best_fixed_point(
    slope_sum: torch.Tensor, steps: torch.Tensor, piecewise: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best fixed point of F = [-1, 1] and its summed loss, after ``steps`` losses whose
    slopes sum to ``slope_sum`` (element-wise over both tensors).

    Linear losses: x = -sign(sum), loss -|sum|. The piecewise section3 losses, minimised
    piece by piece: any x < 0 sums to -100 per step (x = -1 is returned), x in [0, 1] to
    ``x * sum``, whose minimum is at x = 0 (0) or x = 1 (the sum); x > 1 lies outside F."""
    if not piecewise:
        return -torch.sign(slope_sum), -slope_sum.abs()
    candidates = torch.stack(
        [SECTION3_LOW * steps, torch.zeros_like(slope_sum), slope_sum.to(torch.float64)]
    )
    value, which = candidates.min(0)
    points = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    return points[which], value


class _Point(nn.Module):
    def __init__(self, x0: float):
        super().__init__()
        self.x = nn.Parameter(torch.tensor([float(x0)], dtype=torch.float64))


class ConvexTask(Task):
    name = "convex"
    description = (
        "Reddi et al.'s online convex counterexample (f_t(x) = C x once every few steps, "
        "-x otherwise, on [-1, 1]): Adam converges to the worst point x = 1; also the AdaBound "
        "paper's Section 3 example (--problem section3)"
    )
    metric = "regret"
    defaults = {"epochs": 5, "batch_size": 1, "milestones": [], "lr_decay": 0.1}
    optimizers = ("adam", "amsgrad", "adabound", "amsbound")
    supports_distributed = False

    @classmethod
    def add_arguments(cls, parser: argparse._ArgumentGroup) -> None:
        parser.add_argument(
            "--problem",
            choices=sorted(PROBLEMS),
            default=None,
            help="constants and betas (default theorem); section3: the AdaBound paper's "
            "Section 3 example (-1 then +2 once every --period steps, -100 for x < 0)",
        )
        parser.add_argument(
            "--C",
            type=float,
            default=None,
            dest="C",
            help="the rare large gradient (overrides the problem's)",
        )
        parser.add_argument(
            "--period",
            type=int,
            default=None,
            help="the large gradient comes at t mod period == 1; section3: the paper's C, "
            "-1 at t mod C == 1 and +2 at t mod C == 2 (default 50)",
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
        parser.add_argument(
            "--x0", type=float, default=None, help="starting point (default 0; section3: 1)"
        )

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
        """One period of the gradients the options describe (for section3, the slopes of
        the middle piece: the gradients wherever x stays in [0, 1])."""
        if args.get("problem") == "section3":
            given = [f"--{k}" for k in ("C", "slope", "sequence") if args.get(k) is not None]
            if given:
                raise ValueError(
                    f"--problem section3 takes no {', '.join(given)}: its losses are fixed, "
                    "and its period C is --period"
                )
            period = int(args.get("period") or PROBLEMS["section3"]["period"])
            if period < 3:
                raise ValueError(f"section3 needs --period >= 3 (-1, +2, then zeros), got {period}")
            return torch.tensor([-1.0, 2.0] + [0.0] * (period - 2), dtype=torch.float64)
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
        # section3's losses are piecewise: its gradient depends on x, and its best fixed
        # point is found piece by piece.
        self.piecewise = self.args.get("problem") == "section3"
        self.steps_per_epoch = int(self.args.get("steps_per_epoch") or 1000)
        self.sum_loss = 0.0  # sum of f_t(x_t) so far
        self.sum_g = 0.0  # sum of the slopes g_t so far (the best fixed point depends on it)

    @classmethod
    def adjust_hparams(
        cls, optim: str, hparams: dict[str, Any], task_args: dict[str, Any]
    ) -> dict[str, Any]:
        # The betas belong to the problem (Theorem 1 needs beta1 = 0, beta2 = 1/(1+C^2)),
        # and so does the bounded methods' final_lr (the gradients' scale differs 300x).
        name = task_args.get("problem") or "theorem"
        problem = PROBLEMS[name]
        hparams = dict(hparams)
        hparams.setdefault("beta1", problem["beta1"])
        hparams.setdefault("beta2", problem["beta2"])
        if is_dynabound(optim):
            hparams.setdefault("final_lr", problem["final_lr"])
        if name == "section3":
            cls._check_section3(int(task_args.get("period") or problem["period"]), hparams)
        return hparams

    @staticmethod
    def _check_section3(period: int, hparams: dict[str, Any]) -> None:
        # Outside the theorem's assumptions the problem is still well defined (and worth
        # running: does Adam fail anyway?), so this warns instead of refusing.
        beta1, beta2 = float(hparams["beta1"]), float(hparams["beta2"])
        problems = []
        if not 0 <= beta2 < 1:
            return  # the optimizer refuses it, with its own message
        if not section3_condition(period, beta2):
            problems.append(
                f"period {period} and beta2 {beta2:g} violate 5*beta2^(C-2) <= "
                f"(1-beta2)/(4-beta2) (the smallest period for this beta2 is "
                f"{section3_min_period(beta2)})"
            )
        if beta1 != 0:
            problems.append(f"beta1 is {beta1:g}, the theorem's is 0")
        if problems:
            warnings.warn(
                "section3 outside the theorem's assumptions: " + "; ".join(problems),
                UserWarning,
                stacklevel=3,
            )

    def load_data(self) -> None:
        x0 = self.args.get("x0")
        default = PROBLEMS.get(self.args.get("problem") or "theorem", {}).get("x0", 0.0)
        self.model_spec = {"x0": float(default if x0 is None else x0)}

    def build_model(self, spec: dict[str, Any]) -> nn.Module:
        return _Point(spec["x0"])

    def gradients(self, first_step: int, n: int) -> torch.Tensor:
        """g_t for t = first_step, ..., first_step + n - 1 (t counts from 1); for section3
        the slope of the middle piece, which is the gradient only where x is in [0, 1]."""
        t = torch.arange(first_step, first_step + n, dtype=torch.int64)
        return self.sequence[(t - 1) % len(self.sequence)]

    def train_epoch(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: EpochContext
    ) -> dict[str, Any]:
        x = cast(_Point, ctx.raw_model).x
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
                if self.piecewise:
                    x.grad.copy_(section3_gradient(grads[k : k + 1], x))
                else:
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
        losses = section3_loss(grads, xs) if self.piecewise else grads * xs
        sum_loss = self.sum_loss + torch.cumsum(losses, 0)
        sum_g = self.sum_g + torch.cumsum(grads, 0)
        steps_done = torch.arange(first, first + n, dtype=torch.float64)
        _, best = best_fixed_point(sum_g, steps_done, self.piecewise)
        avg_regret = (sum_loss - best) / steps_done
        self.sum_loss, self.sum_g = float(sum_loss[-1]), float(sum_g[-1])
        pick = torch.linspace(0, n - 1, min(n, TRACE_POINTS)).round().long().unique()
        return {
            "x": float(x.detach()[0]),
            "avg_regret": float(avg_regret[-1]),
            "loss": float(losses.mean()),
            "trace_t": steps_done[pick].long().tolist(),
            "trace_x": xs[pick].tolist(),
            "trace_avg_regret": avg_regret[pick].tolist(),
        }

    def evaluate(self, model: nn.Module, ctx: EpochContext) -> dict[str, float]:
        return {}

    def summary(self, metrics: dict[str, Any]) -> str:
        return f"x {metrics['x']:+.4f} | average regret {metrics['avg_regret']:.4f}"

    def state_dict(self) -> dict[str, Any]:
        # "sum_gx" holds the summed losses f_t(x_t) (g_t * x_t for the linear problems); the
        # key keeps that name so that existing checkpoints still resume.
        return {"sum_gx": self.sum_loss, "sum_g": self.sum_g}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sum_loss, self.sum_g = float(state["sum_gx"]), float(state["sum_g"])

    def figures(self, run_dir: Path, metrics: list[dict[str, Any]]) -> list[Path]:
        from ..plots import plot_convex

        return [plot_convex([run_dir], run_dir / "convex.png")]
