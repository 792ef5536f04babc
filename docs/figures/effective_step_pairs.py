"""The seed-for-seed table of sensitivity-effective-step-results.md: at each effective SGD
step, AdaBound's final test accuracy minus dampened SGDM's (AdaBound's own limit) and minus
SGDM's, per seed, their mean and a paired t-test (two-sided). Runs of one seed share their
initial weights and the order of the data, so seeds pair.

    python docs/figures/effective_step_pairs.py [sensitivity-effective-step-runs.json]

With three seeds a paired t-test only finds differences that are large against their
spread; "p" is reported, not turned into a verdict.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from scipy import stats

from dynabound.experiments.optimizers import effective_sgd_step

SOURCE = Path(
    sys.argv[1]
    if len(sys.argv) > 1
    else Path(__file__).with_name("sensitivity-effective-step-runs.json")
)


def main() -> None:
    finals: dict[tuple[str, float], dict[int, float]] = {}
    for run in json.loads(SOURCE.read_text()):
        step, _ = effective_sgd_step(run["optim"], run["hparams"])
        step = float(f"{step:.3g}")  # lr/(1-momentum) is not exact in binary
        finals.setdefault((run["optim"], step), {})[run["seed"]] = run["final"]
    steps = sorted({step for _, step in finals})
    print("| effective step | AdaBound − SGDM (dampened): per seed | mean | p | "
          "AdaBound − SGDM: per seed | mean | p |")  # fmt: skip
    print("|---|---|---:|---:|---|---:|---:|")
    for step in steps:
        ours = finals.get(("adabound", step), {})
        cells = []
        for other in ("sgdm-damped", "sgdm"):
            theirs = finals.get((other, step), {})
            seeds = sorted(set(ours) & set(theirs))
            diffs = [ours[s] - theirs[s] for s in seeds]
            per_seed = ", ".join(f"{s}: {d:+.2f}" for s, d in zip(seeds, diffs, strict=True))
            mean = f"{statistics.mean(diffs):+.2f}" if diffs else "-"
            p = "-"
            if len(diffs) > 1 and len(set(diffs)) > 1:
                p = f"{stats.ttest_1samp(diffs, 0.0).pvalue:.2f}"
            cells += [per_seed or "-", mean, p]
        print(f"| {step:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
