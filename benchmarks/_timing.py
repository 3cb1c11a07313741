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


def interleaved_median_seconds(calls: dict, repeats: int) -> dict:
    """Median wall time per entry of ``calls`` (``name -> (compiled, args)``).

    Every entry is warmed up once, then timed once per round, round after round, so a
    change of machine load during the run shifts all entries alike instead of whichever
    one happened to run then: ratios between entries stay comparable.
    """
    for compiled, args in calls.values():
        jax.block_until_ready(compiled(*args))
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (compiled, args) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}
