"""Benchmarks of Ray patterns Ray's own microbenchmark leaves out, written once for any
runtime with Ray's API, so the same bodies time ionet and Ray on one machine:

- "nested tasks depth 10": a binary tree of tasks, each waiting in `get` for its two
  children (2,047 tasks), on all CPUs; the rate counts tasks;
- "single client streaming generator items": a `num_returns="streaming"` task of 1,000
  items, read while it runs; the rate counts items.

`python -m ionet.microbenchmark` runs them on ionet; run this file with Ray's Python
(`python ionet/_patterns.py [FILTER]`) to print Ray's lines. It imports nothing of
ionet, only the standard library and the runtime it is given.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any, Callable, List, Tuple

DEPTH = 10
ITEMS = 1000
TRIALS = 3


def make_benchmarks(rt: Any) -> List[Tuple[str, float, Callable[[], object]]]:
    """(name, multiplier, body) for each benchmark, on runtime `rt` (ionet or ray)."""

    @rt.remote
    def tree(depth: int) -> int:
        if depth == 0:
            return 1
        return sum(rt.get([tree.remote(depth - 1), tree.remote(depth - 1)]))

    @rt.remote(num_returns="streaming")
    def items(count: int):
        for index in range(count):
            yield index

    def nested() -> None:
        assert rt.get(tree.remote(DEPTH)) == 2**DEPTH

    def streaming() -> None:
        assert sum(1 for _ in items.remote(ITEMS)) == ITEMS

    return [
        (f"nested tasks depth {DEPTH}", 2 ** (DEPTH + 1) - 1, nested),
        ("single client streaming generator items", ITEMS, streaming),
    ]


def time_body(name: str, multiplier: float, body: Callable[[], object]) -> None:
    """One warm-up call, then TRIALS timed calls; prints Ray's line format."""
    body()
    rates = []
    for _ in range(TRIALS):
        start = time.perf_counter()
        body()
        rates.append(multiplier / (time.perf_counter() - start))
    print(name, "per second", round(statistics.mean(rates), 2), "+-", round(statistics.pstdev(rates), 2), flush=True)


def main() -> None:
    import ray

    selected = sys.argv[1] if len(sys.argv) > 1 else ""
    ray.init()
    try:
        for name, multiplier, body in make_benchmarks(ray):
            if selected in name:
                time_body(name, multiplier, body)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
