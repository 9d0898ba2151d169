#!/usr/bin/env python
"""Compare two runs' ``metrics.jsonl`` value by value: are they bitwise the same run?

    python scripts/compare_metrics.py RUN_A/metrics.jsonl RUN_B/metrics.jsonl

Rows are paired by ``iteration``; wall-clock keys (``timing/*``, ``*_per_s``) are skipped. Prints
how many values are bitwise equal, which keys only one run logs, and for each differing key the
first iteration where it differs and its largest relative difference. Exit code 0 when every
shared value is equal, 1 otherwise (so it can gate a regression check).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elign.engine.metrics import parse_metrics  # noqa: E402


def wall_clock(key: str) -> bool:
    """Keys that measure time, never the same twice."""
    return key.startswith("timing/") or key.endswith("_per_s")


def compare(a: list[dict], b: list[dict]) -> tuple[int, dict[str, tuple[int, float]], set[str], list[int]]:
    """(equal values, {key: (first differing iteration, max relative difference)}, keys in one run
    only, iterations in one run only)."""
    rows_a, rows_b = ({r["iteration"]: r for r in rows} for rows in (a, b))
    equal, differ, only = 0, {}, set()
    for it in sorted(set(rows_a) & set(rows_b)):
        ra, rb = rows_a[it], rows_b[it]
        only |= {k for k in set(ra) ^ set(rb) if not wall_clock(k)}
        for key in sorted(set(ra) & set(rb) - {"iteration"}):
            if wall_clock(key):
                continue
            x, y = ra[key], rb[key]
            if x == y:
                equal += 1
                continue
            try:
                rel = abs(x - y) / max(abs(x), abs(y))
            except (TypeError, ZeroDivisionError):
                rel = float("inf")
            first, worst = differ.get(key, (it, 0.0))
            differ[key] = (first, max(worst, rel))
    return equal, differ, only, sorted(set(rows_a) ^ set(rows_b))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path, help="first metrics.jsonl")
    p.add_argument("b", type=Path, help="second metrics.jsonl")
    args = p.parse_args()
    equal, differ, only, unpaired = compare(parse_metrics(args.a), parse_metrics(args.b))
    print(f"values bitwise equal: {equal}; keys that differ: {len(differ)}")
    for key, (first, worst) in sorted(differ.items(), key=lambda kv: kv[1][0]):
        print(f"  {key}: first differs at iteration {first}, max relative difference {worst:.3g}")
    if only:
        print("keys logged by one run only:", ", ".join(sorted(only)))
    if unpaired:
        print("iterations in one run only:", unpaired)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
