"""The ``dynabound`` command's arguments: the parser, and the checks argparse cannot make."""

from __future__ import annotations

import argparse
import difflib
from typing import TYPE_CHECKING, Any, NoReturn

from .console import PROGRESS_EVERY
from .optimizers import OPTIMIZERS
from .presets import TASK_PRESETS, preset
from .savepoints import CHECKPOINT_EVERY
from .tasks import TASKS

if TYPE_CHECKING:
    from .tasks.base import Task

__all__ = [
    "HPARAMS",
    "SIGN_DESCENT",
    "TRANSITION_EACH",
    "TRANSITION_ONE",
    "build_parser",
    "check_arguments",
    "flag",
]

EPILOG = """\
examples:
  dynabound demo                                  # offline, CPU
  dynabound run mnist --optim adabound --data-dir data --download
  dynabound run mnist --optim adabound --resume   # continue after Ctrl-C or a kill
  dynabound compare cifar10 --model resnet34 --data-dir data
  dynabound compare mnist --seeds 1 2 3 4 5 --data-dir data   # mean ± std over seeds
  torchrun --nproc-per-node 4 -m dynabound.experiments run cifar10 --optim adabound
  dynabound sweep cifar10 --final-lr 0.01 0.03 0.1 0.3 --gamma 1e-4 1e-3 1e-2
  dynabound plot runs/mnist-compare/*
  dynabound plot runs/mnist-compare               # every run below; seeds as mean + band
  dynabound probe runs/cifar10-resnet34-adam
"""


def final_lr_value(text: str) -> float | str:
    """A final_lr on the command line: a number or 'auto'."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


HPARAMS = (
    ("lr", float, "learning rate (Adam-phase lr for the bounded methods)"),
    ("momentum", float, "SGDM momentum"),
    (
        "dampening",
        float,
        "SGDM: dampening, the gradient enters the momentum buffer times 1 - dampening "
        "(default 0; sgdm-damped: equal to the momentum, AdaBound's limit)",
    ),
    ("beta1", float, "first-moment coefficient"),
    ("beta2", float, "second-moment coefficient"),
    ("beta3", float, "Adan: coefficient of its second moment (its beta2 is the difference's)"),
    (
        "final_lr",
        final_lr_value,
        "AdaBound/AMSBound: the SGD rate both bounds converge to, or 'auto' (estimated from "
        "the Adam phase; the value in use is in metrics.jsonl, bounds.final_lr)",
    ),
    ("gamma", float, "AdaBound/AMSBound: convergence speed of the bounds"),
    ("eps", float, "denominator term"),
    ("weight_decay", float, "weight decay (L2; decoupled for AdamW/AdaBoundW)"),
    ("pole", float, "AdamSSM: pole of the pair added to the second-moment filter"),
    ("zero", float, "AdamSSM: zero of that pair (zero = pole is Adam)"),
    ("clip_norm", float, "δ-GClip: gradient norm above which the step is clipped (its gamma)"),
    ("delta", float, "δ-GClip: floor of the clipped step, as a fraction of lr"),
)


# What `plot` names the transition plots it draws (its --help quotes these).
TRANSITION_ONE, TRANSITION_EACH = "transition.png", "transition-{run}.png"
SIGN_DESCENT = "sign-descent.png"


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


class _Parser(argparse.ArgumentParser):
    """argparse with errors in one line, not after the usage block (with 40 options it buried
    the error), and a suggestion for a misspelt choice."""

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if action.choices is None or value in action.choices:
            return
        choices = [str(c) for c in action.choices]
        close = difflib.get_close_matches(str(value), choices, n=1)
        raise argparse.ArgumentError(
            action,
            f"invalid choice: {value!r} (choose from {', '.join(choices)})"
            + (f"\ndid you mean {close[0]}?" if close else ""),
        )

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _presets_text(task: type[Task], optimizers: tuple[str, ...]) -> str:
    """The paper's presets of ``task`` for ``optimizers``, one line each, for --help: what a
    run with the task's default options trains with."""

    def values(name: str, model: str | None = None) -> dict[str, str]:
        hparams = task.adjust_hparams(name, preset(task.name, name, model=model), {})
        return {k: _shown(v) for k, v in hparams.items()}

    rows = []
    for name in (o for o in optimizers if o in TASK_PRESETS[task.name]):
        shown = values(name)
        for key, value in values(name, "densenet121").items():  # CIFAR's Adam beta1 differs
            if value != shown[key]:
                shown[key] += f" (densenet121: {value})"
        rows.append(f"  {name:<10} " + " ".join(f"{k}={v}" for k, v in shown.items()))
    head = "default: the paper's presets for this task with its default options\n(a value given "
    return head + "below replaces the preset):\n" + "\n".join(rows)


def _shown(value: Any) -> str:
    if isinstance(value, tuple | list):
        return "(" + ",".join(_shown(v) for v in value) + ")"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output and hardware")
    g.add_argument("--device", default=None, help="auto (default), cpu, cuda or cuda:N")
    g.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's)"
    )
    g.add_argument(
        "--quiet", action="store_true", help="no progress bars or lines, no per-epoch lines"
    )
    g.add_argument(
        "--progress-every",
        type=float,
        default=PROGRESS_EVERY,
        metavar="SECONDS",
        help="when the output is not a terminal (a log file), print a progress line (step, "
        "running loss, steps/s, ETA) this often inside an epoch; 0: never "
        f"(default {PROGRESS_EVERY:g})",
    )


def _add_training(p: argparse.ArgumentParser, task: type[Task], mode: str) -> None:
    if mode == "run":
        p.add_argument(
            "--optim",
            choices=OPTIMIZERS,
            default=None,
            help="optimizer (required unless resuming a run in --out)",
        )
    elif mode == "compare":
        p.add_argument(
            "--optims",
            nargs="+",
            choices=OPTIMIZERS,
            default=None,
            help=f"optimizers to compare (default: {' '.join(task.optimizers)})",
        )
    else:
        p.add_argument(
            "--optim",
            choices=("adabound", "amsbound", "adaboundw", "amsboundw"),
            default="adabound",
            help="bounded optimizer to sweep (default adabound)",
        )
    shown = ("adabound", "amsbound", "adaboundw", "amsboundw") if mode == "sweep" else OPTIMIZERS
    h = p.add_argument_group("hyperparameters", _presets_text(task, shown))
    for key, typ, text in HPARAMS:
        if mode == "sweep" and key in ("final_lr", "gamma"):
            h.add_argument(
                flag(key),
                type=typ,
                nargs="+",
                required=True,
                dest=key,
                help=f"values to sweep: {text}",
            )
        else:
            h.add_argument(flag(key), type=typ, default=None, dest=key, help=text)
    h.add_argument(
        "--bounds",
        choices=("reference", "paper"),
        default=None,
        help="bounded methods: the authors' code (reference) or Algorithm 2 (paper)",
    )
    h.add_argument(
        "--state-dtype",
        choices=("bfloat16", "8bit"),
        default=None,
        help="bounded methods: store the moments in bfloat16 or block-wise 8 bits "
        "(default: the parameters' dtype)",
    )
    t = p.add_argument_group("training")
    d = task.defaults
    t.add_argument("--epochs", type=int, default=None, help=f"default {d['epochs']}")
    t.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"global batch size, split between processes (default {d['batch_size']})",
    )
    if mode in ("run", "compare"):
        t.add_argument(
            "--scale-from-batch",
            type=int,
            default=None,
            metavar="B",
            help="take the hyperparameters (presets and values given) as tuned for batch size "
            "B and scale them to --batch-size: Adam-family by the square root rule (lr x "
            "sqrt(k), 1-beta x k, eps / sqrt(k), k = batch size / B), the bounded methods "
            "also final_lr and gamma x k (see dynabound.scale_batch_size)",
        )
    t.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    if mode == "compare":
        t.add_argument(
            "--seeds",
            type=int,
            nargs="+",
            default=None,
            metavar="SEED",
            help="train every optimizer once per seed, in OUT/<optimizer>/seed-<SEED>, and "
            "write the mean, standard deviation and count per optimizer to "
            "OUT/aggregate.md and OUT/aggregate.json (instead of --seed)",
        )
    t.add_argument(
        "--milestones",
        type=int,
        nargs="*",
        default=None,
        help=f"epochs after which lr is multiplied by --lr-decay (default {d['milestones']})",
    )
    t.add_argument("--lr-decay", type=float, default=None, help="default 0.1")
    t.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: on for CUDA)",
    )
    t.add_argument(
        "--no-bounds-record",
        action="store_true",
        help="do not record bound activity (nor how sign-like the update is) in metrics.jsonl",
    )
    io = p.add_argument_group("data and output")
    io.add_argument("--data-dir", default=None, help="where the data set lives (default ./data)")
    io.add_argument("--download", action="store_true", help="download missing data files")
    io.add_argument(
        "--out",
        default=None,
        help="run directory (default runs/<task>-<optimizer>)"
        if mode == "run"
        else "parent directory of the runs (default runs/<task>-"
        + ("compare)" if mode == "compare" else "sweep-<optimizer>)"),
    )
    if mode == "run":
        io.add_argument(
            "--resume",
            action="store_true",
            help="continue the run in --out from its checkpoint, inside an epoch if it was "
            "saved there; the result is the same as if the run had never stopped",
        )
    io.add_argument(
        "--checkpoint-every",
        type=float,
        default=CHECKPOINT_EVERY,
        metavar="SECONDS",
        help="also save the checkpoint inside epochs this often, so that a kill -9 costs "
        "at most this much training; 0: only after each epoch. Ctrl-C and SIGTERM save "
        f"the current step before stopping whatever this is (default {CHECKPOINT_EVERY:g})",
    )
    io.add_argument(
        "--checkpoint-steps",
        type=int,
        default=None,
        metavar="N",
        help="also save the checkpoint every N optimizer steps (default: by time only)",
    )
    task.add_arguments(p.add_argument_group(f"{task.name} options"))
    _add_common(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dynabound",
        description="Reproduce the AdaBound paper's experiments (Luo et al., ICLR 2019): "
        "train with progress bars, resumable checkpoints and metrics files, and draw the "
        "paper's figures.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo",
        help="offline demo: two convex counterexamples + seven optimizers on digits (CPU)",
        description="Runs offline on CPU: (1) the online convex counterexample where Adam "
        "converges to the worst point while AMSGrad and the paper's AdaBound/AMSBound find "
        "the optimum, and (2) SGDM, AdaGrad, Adam, AMSGrad, AdaBound and AMSBound, and "
        "dampened SGDM (AdaBound's limit), training an MLP on scikit-learn's handwritten "
        "digits. Writes DIR/report.md with a results table and PNG figures.",
    )
    demo.add_argument(
        "--out", default="dynabound-demo", help="output directory (default ./dynabound-demo)"
    )
    demo.add_argument(
        "--quick", action="store_true", help="a few seconds: tiny budgets (for tests)"
    )
    demo.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    demo.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1: fastest for these small models)",
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bars, no per-epoch lines")

    for mode, text in (
        ("run", "train one optimizer on one task"),
        ("compare", "train every optimizer with the paper's presets, then draw the comparison"),
        ("sweep", "sensitivity of AdaBound/AMSBound to final_lr and gamma (paper's appendix)"),
    ):
        p = sub.add_parser(mode, help=text, description=text + ". Choose a task for its options.")
        tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)
        for name, task in TASKS.items():
            tp = tasks.add_parser(
                name,
                help=task.description,
                description=task.description,
                formatter_class=argparse.RawDescriptionHelpFormatter,  # the presets' table
            )
            _add_training(tp, task, mode)

    plot = sub.add_parser(
        "plot",
        help="paper-style curves (and transition plots) from run directories",
        description="Draw train/test accuracy (or perplexity) against epochs, one line per "
        "run; runs that differ only by their seed (compare --seeds) are drawn as their mean "
        "with a band (see --band). For runs of dynabound optimizers the transition plot of "
        "their recorded bound activity is drawn next to the figure: "
        f"{TRANSITION_ONE} for a single RUN_DIR, else "
        f"{TRANSITION_EACH.format(run='<RUN_DIR name>')} for each (the last component of "
        "its path, or its last two joined by '-' where runs share the last one). For runs "
        "that recorded it, how sign-like each optimizer's update is per epoch (cosine with "
        f"sign(gradient), fraction of steps near lr) goes to {SIGN_DESCENT} beside them.",
    )
    plot.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="run directories, or directories holding them (a compare's or sweep's --out)",
    )
    plot.add_argument(
        "--out",
        default=None,
        help="figure path (default RUN_DIR/curves.png for one run, else ./curves.png)",
    )
    plot.add_argument("--title", default=None)
    plot.add_argument(
        "--band",
        choices=("minmax", "std"),
        default="minmax",
        help="the band around the mean of runs that differ only by their seed: from the "
        "lowest to the highest run at each epoch (minmax, default) or mean ± one sample "
        "standard deviation (std)",
    )
    plot.add_argument(
        "--each",
        action="store_true",
        help="one line per run, also for runs that differ only by their seed",
    )
    plot.add_argument(
        "--no-transition",
        action="store_true",
        help=f"skip the transition plots and {SIGN_DESCENT}",
    )
    plot.add_argument(
        "--against",
        nargs="+",
        default=None,
        metavar="OPTIM=KEY",
        help="instead of curves, draw the final and best test metric against the "
        "hyperparameter each optimizer's runs vary, one curve per optimizer, e.g. "
        "--against sgdm=lr adabound=final_lr (a sensitivity study); or --against "
        "effective-step: every method on the step it takes in its SGD regime, lr/(1-momentum) "
        "for SGDM, lr for dampened SGDM, final_lr for the bounded methods. Runs that differ "
        "only by their seed make one point (their mean, a bar from lowest to highest); the "
        "points are printed as a table",
    )

    probe = sub.add_parser(
        "probe",
        help="the paper's Figure 1 heatmap of per-element learning rates from a checkpoint",
        description="Load RUN_DIR/checkpoint.pt, rebuild the model and optimizer, and draw "
        "the per-element effective learning rates of nine 3x3 kernels (or weight blocks) and "
        "the last layer's biases on a log colour scale, as in the paper's Figure 1.",
    )
    probe.add_argument("run", metavar="RUN_DIR")
    probe.add_argument("--out", default=None, help="figure path (default RUN_DIR/figure1.png)")
    probe.add_argument(
        "--kernel",
        choices=("sample", "mean"),
        default="sample",
        help="one sampled kernel per layer (paper) or the mean over channels",
    )
    probe.add_argument(
        "--all-elements",
        action="store_true",
        help="also draw the elements whose second moment is still zero (no gradient yet: "
        "their rate is lr/eps for Adam, set by eps, not by the optimizer's dynamics); by "
        "default they are left out, grey, and the title counts them",
    )
    probe.add_argument("--device", default="cpu")

    convert = sub.add_parser(
        "convert-checkpoint",
        help="rewrite run checkpoints of the earlier format so that they load safely",
        description="Run checkpoints are loaded with torch.load(weights_only=True), which "
        "refuses those written before format dynabound-run/2 (they held numpy's generator "
        "state as a numpy array). This rewrites them in the current format. A file the "
        "weights-only loader refuses is unpickled in full only with --trust, which runs any "
        "code the file holds: use it only for files you wrote or trust.",
    )
    convert.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="run directories, or directories holding them (a compare's or sweep's --out)",
    )
    convert.add_argument(
        "--trust",
        action="store_true",
        help="unpickle the checkpoints in full (they can run code when loaded)",
    )
    return parser


def check_arguments(ns: argparse.Namespace) -> None:
    """Refuse what argparse's types cannot see, before a command does any work."""
    from .devices import check_device

    for key in ("threads", "epochs", "batch_size"):
        value = getattr(ns, key, None)
        if value is not None and value < 1:
            raise ValueError(f"{flag(key)} must be a positive integer, got {value}")
    for key in ("checkpoint_every", "progress_every"):
        value = getattr(ns, key, None)
        if value is not None and not value >= 0:  # also refuses NaN
            raise ValueError(f"{flag(key)} must be 0 or more seconds, got {value}")
    steps = getattr(ns, "checkpoint_steps", None)
    if steps is not None and steps < 1:
        raise ValueError(f"--checkpoint-steps must be a positive integer, got {steps}")
    scale_from = getattr(ns, "scale_from_batch", None)
    if scale_from is not None and scale_from < 1:
        raise ValueError(f"--scale-from-batch must be a positive batch size, got {scale_from}")
    seeds = getattr(ns, "seeds", None)
    if seeds is not None:
        if ns.seed is not None:
            raise ValueError("give either --seed or --seeds, not both")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"--seeds must not repeat a seed, got {' '.join(map(str, seeds))}")
    if hasattr(ns, "device"):
        check_device(ns.device)
