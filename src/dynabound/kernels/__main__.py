"""Build the fused kernels ahead of time: ``python -m dynabound.kernels build``.

The CPU kernel is otherwise compiled by the first ``step()`` (about a minute once per torch
version); building it in a Docker image or a job's setup step moves that cost out of
training. ``status`` only reports what is available, building nothing.
"""

from __future__ import annotations

import argparse
import sys
import time

from . import DEVICE_TYPES, is_available, unavailable_reason


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dynabound.kernels",
        description="Build (CPU) or check (CUDA/Triton) dynabound's fused kernels.",
    )
    parser.add_argument("command", choices=["build", "status"])
    args = parser.parse_args(argv)
    failed = False
    for device in DEVICE_TYPES:
        if device == "cpu" and args.command == "status":
            from . import cpu

            ready = cpu.is_built(cpu.extension_name())
            print(f"cpu: {'built' if ready else 'not built yet (built on first use)'}")
            continue
        start = time.perf_counter()
        ok = is_available(device)
        took = time.perf_counter() - start
        if ok:
            where = ""
            if device == "cpu":
                from . import cpu

                where = f" in {took:.1f} s ({cpu.vector_isa()} loops)"
            print(f"{device}: fused kernel ready{where}")
        else:
            print(f"{device}: unavailable: {unavailable_reason(device)}")
            failed |= device == "cpu"
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
