"""Print the table of mnist-seeds-results.md that tests whether two optimizers' final test
accuracies vary differently between seeds: the ratio of their sample variances with the
two-sided F-test (which assumes normal spreads), and the Brown-Forsythe test (Levene's test
about the median, robust to one outlying seed). Reads an aggregate.json written by
`dynabound compare --seeds` (default: mnist-seeds-results.json beside this file)."""

from __future__ import annotations

import json
import statistics
import sys
from itertools import product
from pathlib import Path

from scipy import stats

SOURCE = Path(
    sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("mnist-seeds-results.json")
)
BOUNDED = ("AdaBound", "AMSBound")


def main() -> None:
    finals = {row["optimizer"]: row["final"]["values"] for row in json.loads(SOURCE.read_text())}
    others = [name for name in finals if name not in BOUNDED]
    print(
        "| bounded | other | std bounded | std other | variance ratio | F-test p "
        "| Brown-Forsythe p |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for a, b in product((n for n in BOUNDED if n in finals), others):
        x, y = finals[a], finals[b]
        ratio = statistics.variance(y) / statistics.variance(x)
        dfx, dfy = len(y) - 1, len(x) - 1
        f_p = 2 * min(stats.f.sf(ratio, dfx, dfy), stats.f.cdf(ratio, dfx, dfy))
        bf_p = stats.levene(x, y, center="median").pvalue
        print(
            f"| {a} | {b} | {statistics.stdev(x):.3f} | {statistics.stdev(y):.3f} | "
            f"{ratio:.1f} | {f_p:.3f} | {bf_p:.2f} |"
        )


if __name__ == "__main__":
    main()
