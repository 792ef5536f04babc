"""``dynabound demo``: the paper's cheapest pieces of evidence, offline on a CPU.

1. The online convex counterexample (Reddi et al.'s Theorem 1 problem): Adam converges to
   the worst point x = +1, AMSGrad and the paper's AdaBound/AMSBound (theory variant,
   Algorithm 2) to the optimum x = -1.
   The AdaBound paper's own Section 3 example (the convex task's ``section3`` problem):
   Adam stays on x >= 0, far from the optimal x < 0, the other three overshoot into x < 0.
2. SGDM, AdaGrad, Adam, AMSGrad, AdaBound and AMSBound, and dampened SGDM (AdaBound's
   own limit), training a small MLP on scikit-learn's handwritten digits, with the Figure 1
   style rate heatmaps of Adam and AdaBound and AdaBound's transition plot.

Every training is a normal run directory (config, metrics, checkpoint), so the figures can
be redrawn with ``dynabound plot``. Rerunning the demo resumes runs with the same settings
and starts over those whose settings changed.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dynabound.kernels import cpu as cpu_kernel

from .devices import check_device
from .optimizers import COMPARED, display_name
from .plots import plot_convex, plot_run_transition, plot_runs
from .probe import probe_run
from .rundir import CHECKPOINT, CONFIG, read_metrics
from .runner import build_config, restore, train
from .tasks.convex import ConvexTask

__all__ = ["run_demo"]

CONVEX_STEPS = {False: (5, 1000), True: (1, 300)}  # (epochs, steps per epoch)
DIGITS_EPOCHS = {False: 30, True: 2}


def _run(config: dict[str, Any], run_dir: Path, progress: bool) -> list[dict[str, Any]] | None:
    resume = False
    if (run_dir / CONFIG).is_file():
        saved = json.loads((run_dir / CONFIG).read_text())
        if saved == config and (run_dir / CHECKPOINT).is_file():
            resume = True
        else:
            shutil.rmtree(run_dir)  # a run directory of an earlier demo with other settings
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise ValueError(f"{run_dir} exists and is not a run directory; choose another --out")
    result = train(config, run_dir, resume=resume, quiet=True, progress=progress, figures=False)
    return None if result.interrupted else result.metrics


def run_demo(
    out: str | os.PathLike[str] = "dynabound-demo",
    *,
    quick: bool = False,
    quiet: bool = False,
    device: str = "cpu",
) -> Path | None:
    """Run the demo into ``out`` and return the path of ``report.md`` (None if interrupted)."""
    check_device(device)  # before the convex part, which runs on the CPU whatever is asked
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    progress = sys.stderr.isatty() and not quiet

    def say(text: str) -> None:
        if not quiet:
            print(text, flush=True)

    kernel_was_built = cpu_kernel.is_built(cpu_kernel.extension_name())
    start = time.perf_counter()
    epochs, steps = CONVEX_STEPS[quick]
    say(f"[1/3] convex counterexample: {epochs * steps} online steps per optimizer")
    convex_rows = _convex_part("theorem", out / "convex", epochs, steps, progress, say)
    if convex_rows is None:
        return None
    convex_fig = plot_convex(
        [out / "convex" / o for o in ConvexTask.optimizers], out / "convex.png"
    )
    say(f"[2/3] the AdaBound paper's Section 3 example: {epochs * steps} steps per optimizer")
    section3_rows = _convex_part("section3", out / "section3", epochs, steps, progress, say)
    if section3_rows is None:
        return None
    section3_fig = plot_convex(
        [out / "section3" / o for o in ConvexTask.optimizers],
        out / "section3.png",
        title="the AdaBound paper's Section 3 example (optimum: any x < 0)",
    )

    n_epochs = DIGITS_EPOCHS[quick]
    say(f"[3/3] digits: {len(COMPARED)} optimizers, {n_epochs} epochs each")
    digits_rows, digits_dirs = [], []
    for optim in COMPARED:
        config = build_config("digits", optim, epochs=n_epochs, device=device)
        run_dir = out / "digits" / optim
        metrics = _run(config, run_dir, progress)
        if metrics is None:
            return None
        digits_dirs.append(run_dir)
        best = max(m["test_acc"] for m in metrics)
        last = metrics[-1]
        digits_rows.append(
            (
                display_name(optim),
                last["train_loss"],
                last["train_acc"],
                last["test_acc"],
                best,
                last["time"],
            )
        )
        say(
            f"      {display_name(optim):9s} test accuracy {last['test_acc']:.2f}% "
            f"(best {best:.2f}%), {last['time']:.1f}s"
        )
    digits_fig = plot_runs(digits_dirs, out / "digits.png", title="digits: 64-128-10 MLP")
    spread = {o: _rate_range(out / "digits" / o) for o in ("adam", "adabound")}
    heat_adam = probe_run(out / "digits" / "adam", out / "figure1-adam.png")
    heat_bound = probe_run(out / "digits" / "adabound", out / "figure1-adabound.png")
    transition = plot_run_transition(out / "digits" / "adabound", out / "transition-adabound.png")
    elapsed = time.perf_counter() - start
    # A first run also compiles the CPU kernel (once per torch version): say how much of
    # the time that was, so that the figure means the same on every run.
    compiled = not kernel_was_built and cpu_kernel.build_seconds is not None
    compile_seconds = cpu_kernel.build_seconds if compiled else None

    report = out / "report.md"
    last = read_metrics(out / "digits" / "adabound" / "metrics.jsonl")[-1]
    report.write_text(
        _report(
            convex_rows,
            section3_rows,
            digits_rows,
            steps * epochs,
            n_epochs,
            elapsed,
            quick,
            spread,
            last,
            compile_seconds,
        )
    )
    figures = [convex_fig, section3_fig, digits_fig, heat_adam, heat_bound, transition]
    of_which = f" ({compile_seconds:.0f} s compiling the CPU kernel)" if compiled else ""
    say(f"done in {elapsed:.0f}s{of_which}\nreport:  {report.resolve()}")
    say("figures: " + "\n         ".join(str(f.resolve()) for f in figures))
    return report


def _convex_part(
    problem: str, out: Path, epochs: int, steps: int, progress: bool, say: Any
) -> list[tuple[str, float, float]] | None:
    """The four convex-task optimizers on one problem: (name, x_T, R_T/T) rows, or None if
    interrupted."""
    rows = []
    for optim in ConvexTask.optimizers:
        config = build_config(
            "convex",
            optim,
            epochs=epochs,
            task_args={"problem": problem, "steps_per_epoch": steps},
            device="cpu",
        )
        metrics = _run(config, out / optim, progress)
        if metrics is None:
            return None
        last = metrics[-1]
        rows.append((display_name(optim), last["x"], last["avg_regret"]))
        say(
            f"      {display_name(optim):9s} x_T = {last['x']:+.3f}  "
            f"R_T/T = {last['avg_regret']:.4f}"
        )
    return rows


def _rate_range(run_dir: Path) -> dict[str, float]:
    """Smallest and largest per-element effective learning rate at the end of a run, of all
    elements and of those whose second moment is not zero (which have had a gradient), and
    how many of how many elements are left out."""
    from dynabound.diagnostics import effective_lr

    _, _, optimizer, _ = restore(run_dir)
    rates = effective_lr(optimizer, exclude_zero_second_moment=True)
    every = torch.cat([r.flatten() for r in effective_lr(optimizer).values()])
    kept = torch.cat([r.flatten() for r in rates.values()])
    kept = kept[~kept.isnan()]
    return {
        "min": float(every.min()),
        "max": float(every.max()),
        "kept_min": float(kept.min()),
        "kept_max": float(kept.max()),
        "kept_above_1000": int((kept > 1000).sum()),
        "excluded": rates.excluded,
        "numel": rates.numel,
    }


def _adam_x(rows: list[tuple[str, float, float]]) -> float:
    return next(x for name, x, _ in rows if name == "Adam")


def _ended_below_zero(rows: list[tuple[str, float, float]]) -> str:
    below = [name for name, x, _ in rows if x < 0 and name != "Adam"]
    if not below:
        return "none of the other optimizers reached x < 0 in this budget."
    return f"{', '.join(below)} ended at x < 0."


def _report(
    convex_rows: list[tuple[str, float, float]],
    section3_rows: list[tuple[str, float, float]],
    digits_rows: list[tuple[str, float, float, float, float, float]],
    convex_steps: int,
    digits_epochs: int,
    elapsed: float,
    quick: bool,
    spread: dict[str, dict[str, float]],
    last_bound: dict[str, Any],
    compile_seconds: float | None = None,
) -> str:
    b = last_bound["bounds"]
    adam, bound = spread["adam"], spread["adabound"]
    compiling = (
        f"; {compile_seconds:.0f} s of it compiling the CPU kernel, once per torch version"
        if compile_seconds is not None
        else ""
    )
    lines = [
        "# dynabound demo",
        "",
        f"Generated by `dynabound demo{' --quick' if quick else ''}` in {elapsed:.0f} s "
        f"(offline, CPU, torch {torch.__version__}{compiling}).",
        "",
        "## 1. Online convex counterexample",
        "",
        "Linear losses on x in [-1, 1]: f_t(x) = 3x when t mod 3 = 1, -x otherwise "
        "(Reddi et al. 2018, Theorem 1; beta1 = 0, beta2 = 1/(1+3^2) = 0.1). The best fixed "
        "point is x = -1. Adam and AMSGrad use the step size 0.5/sqrt(t) and projection; "
        "AdaBound and AMSBound use the paper's theory variant (Algorithm 2: "
        '`bounds="paper"`, `box=(-1, 1)`, final_lr 0.5).',
        "",
        f"| optimizer | x after {convex_steps} steps | average regret R_T/T |",
        "|---|---|---|",
        *(f"| {name} | {x:+.3f} | {r:.4f} |" for name, x, r in convex_rows),
        "",
        "![convex counterexample](convex.png)",
        "",
        "## 2. The AdaBound paper's Section 3 example",
        "",
        "On x in [-1, 1]: f_t(x) = -100 for x < 0 and, on [0, 1], -x when t mod 50 = 1, 2x "
        "when t mod 50 = 2, 0 otherwise (beta1 = 0, beta2 = 0.9, x_1 = 1; constants as "
        "recalled from the paper, Theorem 1). Any x < 0 is optimal, and a point on x >= 0 "
        "pays a regret of about 100 a step. No gradient points into x < 0: an optimizer gets "
        "there only when a +2 step overshoots past 0, and then stays. Same optimizers and "
        "settings as above.",
        "",
        f"| optimizer | x after {convex_steps} steps | average regret R_T/T |",
        "|---|---|---|",
        *(f"| {name} | {x:+.4f} | {r:.4f} |" for name, x, r in section3_rows),
        "",
        "Adam ends on x "
        + (">= 0" if _adam_x(section3_rows) >= 0 else "< 0")
        + "; "
        + _ended_below_zero(section3_rows)
        + " With these settings AdaBound and AMSBound overshoot at their second step, in "
        "their Adam phase (before the bounds matter; an Adam without bias correction would "
        "take the same step), and AMSGrad drifts down and crosses after step 652 (a shorter "
        "run ends with it still on x >= 0). torch's Adam, bias-corrected, crosses at its "
        "second step too once its step size alpha exceeds 1.136 (here 0.5): its failure "
        "depends on a small alpha.",
        "",
        "![section 3 example](section3.png)",
        "",
        "## 3. Handwritten digits (scikit-learn, 1347 train / 450 test images)",
        "",
        f"A 64-128-10 MLP, batch 32, {digits_epochs} epochs, the paper's presets (SGDM lr 0.1 "
        "momentum 0.9; AdaGrad lr 0.01; Adam/AMSGrad lr 1e-3; AdaBound/AMSBound lr 1e-3, "
        "final_lr 0.1, gamma 1e-3), and dampened SGDM, the SGD AdaBound becomes once its "
        "bounds have closed (lr 0.1 = final_lr, momentum = dampening 0.9): undampened SGDM at "
        "lr 0.1 steps about 10 times further.",
        "",
        "| optimizer | final train loss | final train acc (%) | final test acc (%) | "
        "best test acc (%) | time (s) |",
        "|---|---|---|---|---|---|",
        *(
            f"| {n} | {tl:.4f} | {ta:.2f} | {te:.2f} | {b:.2f} | {t:.1f} |"
            for n, tl, ta, te, b, t in digits_rows
        ),
        "",
        "![digits: train and test accuracy](digits.png)",
        "",
        "### Per-element learning rates at the end of training (the paper's Figure 1)",
        "",
        f"Adam's effective rates range from {adam['min']:.3g} to {adam['max']:.3g}; "
        f"AdaBound's from {bound['min']:.3g} to {bound['max']:.3g}, inside its bounds "
        f"[{b['lower_bound']:.3g}, {b['upper_bound']:.3g}] around final_lr 0.1. "
        f"{adam['excluded']:,} of Adam's {adam['numel']:,} elements have never had a "
        "nonzero gradient (such as the weights of pixels that are blank in every image, or "
        "of hidden units that never fire): their second moment is zero and their rate is "
        "lr/eps, set by eps, not by Adam's dynamics. Without them Adam's rates range from "
        f"{adam['kept_min']:.3g} to {adam['kept_max']:.3g}, and "
        f"{adam['kept_above_1000']:,} still exceed 1000 (a second moment that is tiny but not "
        "zero). The heatmaps leave the elements without a gradient out (grey) and count them "
        "in their titles (`dynabound probe --all-elements` draws them).",
        "",
        "![Adam](figure1-adam.png)",
        "",
        "![AdaBound](figure1-adabound.png)",
        "",
        "### AdaBound's transition from Adam to SGD",
        "",
        "Fraction of elements whose rate is pinned at the lower or upper bound, at steps "
        "1, 2, 4, ... and at the end of every epoch. "
        f"After {int(b['step'])} steps {100 * b['lower']:.1f}% of AdaBound's elements sit at "
        f"the lower bound, {100 * b['upper']:.1f}% at the upper bound and "
        f"{100 * b['free']:.1f}% are still free (Adam-like): with gamma = 1e-3 the band "
        "takes thousands of steps to close in on final_lr.",
        "",
        "![transition](transition-adabound.png)",
        "",
    ]
    return "\n".join(lines)
