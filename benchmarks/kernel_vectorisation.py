"""Which loops of the built CPU kernel GCC vectorised: square roots and divisions per loop.

    python benchmarks/kernel_vectorisation.py             # every loop, one line each
    python benchmarks/kernel_vectorisation.py --scalar    # only the loops without packed ones
    python benchmarks/kernel_vectorisation.py --library PATH.so   # another build

The kernel's AVX2 and portable copies are plain C++ loops that GCC vectorises or not, and a
loop it leaves scalar still computes the same bits, only several times slower: no test
sees it. Every update computes one square root and one division per element, so a loop
whose machine code has scalar ``sqrtss``/``divss`` but no packed ``sqrtps``/``divps``
(``pd``/``sd`` for float64) runs one element at a time. This disassembles the built
kernel (``objdump``, binutils) and counts them in each loop's instance, named by its
template arguments: ``update_avx2<float, 0, false, false, true>`` is the AVX2 copy for
float32 parameters, no weight decay (``WeightDecay`` in cpu_kernel.cpp), not AMSBound,
no gradient unscaling, adding the projection sums of ``final_lr="auto"``.

A loop counts as vectorised when it has a packed square root. Exit status 1 if one that
is not among the known scalar loops has none. Known scalar, in every copy (a finding of
this script, not yet worked on): the loops of float16 parameters, and those of bfloat16
parameters with bfloat16 or 8-bit state (``stochastic_rounding=True``).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys

from dynabound.kernels import cpu

LOOP = re.compile(r"^[0-9a-f]+ <(?:void )?(update_\w+<[^()]*>)\(")
# vsqrtps, sqrtss, vdivpd, ...: the operation and its p(acked)/s(calar) letter.
ARITHMETIC = re.compile(r"\sv?(sqrt|div)([ps])[sd]\s")
KNOWN_SCALAR = (re.compile(r"_Float16"), re.compile(r"^update_encoded_\w+<BFloat16,"))


def loop_counts(library: str) -> dict[str, collections.Counter]:
    listing = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", library],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    counts: dict[str, collections.Counter] = {}
    current = None
    for line in listing.splitlines():
        if line and not line[0].isspace():
            match = LOOP.match(line.replace("(anonymous namespace)::", ""))
            current = match.group(1) if match else None
            if current is not None:
                counts.setdefault(current, collections.Counter())
            continue
        if current is not None:
            found = ARITHMETIC.search(line)
            if found:
                kind = "packed" if found.group(2) == "p" else "scalar"
                counts[current][f"{found.group(1)} {kind}"] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scalar", action="store_true", help="only loops without packed ops")
    parser.add_argument("--library", help="a built kernel (default: this tree's, built if need be)")
    args = parser.parse_args(argv)
    if shutil.which("objdump") is None:
        parser.error("objdump (binutils) is not installed")
    library = args.library or cpu.load()._name
    counts = loop_counts(library)
    if not counts:
        print(f"no update loops found in {library}", file=sys.stderr)
        return 2
    failing = []
    for name in sorted(counts):
        c = counts[name]
        vectorised = c["sqrt packed"] > 0
        if not vectorised and not any(known.search(name) for known in KNOWN_SCALAR):
            failing.append(name)
        if args.scalar and vectorised:
            continue
        print(
            f"{'vector' if vectorised else 'SCALAR':6s} sqrt {c['sqrt packed']:2d} packed "
            f"{c['sqrt scalar']:2d} scalar, div {c['div packed']:2d} packed "
            f"{c['div scalar']:2d} scalar  {name}"
        )
    print(
        f"{library}: {len(counts)} loops, {len(failing)} without a packed square root "
        "(the known scalar loops not counted)"
    )
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
