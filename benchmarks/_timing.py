"""Timing shared by the benchmark scripts (run as ``python benchmarks/<name>.py``)."""

from __future__ import annotations

import statistics
import time

import jax


def median_seconds(compiled, args, repeats: int) -> float:
    """Median wall time of ``compiled(*args)`` over ``repeats`` calls, after one warm-up.

    Calls run back to back, one function at a time. Interleaving functions round by round
    was tried and skewed the ratios on CPU: dropless measured 1.39x when it ran right after
    the 2.2 GB batched capacity kernel, 1.11x on its own (likely the release of the
    previous call's large buffers overlapping the next call).
    """
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)
