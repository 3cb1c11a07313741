"""Timing shared by the benchmark scripts (run as ``python benchmarks/<name>.py``)."""

from __future__ import annotations

import statistics
import time

import jax


def median_seconds(compiled, args, repeats: int) -> float:
    """Median wall time of ``compiled(*args)`` over ``repeats`` calls, after one warm-up."""
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)
