"""Timing shared by the benchmark scripts (run as ``python benchmarks/<name>.py``)."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

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


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Timings(NamedTuple):
    """Per-call seconds of one function, one entry per round."""

    wall: list[float]
    cpu: list[float]  # process CPU time (both cores), robust to other jobs taking cores


def paired_rounds(
    baseline: Callable[[], object], candidates: dict[str, Callable[[], object]], rounds: int
) -> dict[str, tuple[Timings, Timings]]:
    """Times each candidate ``rounds`` times, every call right after a call of ``baseline``.

    On a machine shared with other jobs the load drifts over seconds; a candidate's ratio
    to the baseline call just before it cancels most of that drift, where medians of
    separate runs do not. Every function is warmed up (compile, two calls) first.

    Returns, per candidate, ``(baseline timings, candidate timings)``, paired call by call.
    """

    def timed(fn, timings: Timings) -> None:
        wall, cpu = time.perf_counter(), cpu_seconds()
        jax.block_until_ready(fn())
        timings.wall.append(time.perf_counter() - wall)
        timings.cpu.append(cpu_seconds() - cpu)

    for fn in (baseline, *candidates.values()):
        jax.block_until_ready(fn())
        jax.block_until_ready(fn())
    out = {name: (Timings([], []), Timings([], [])) for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            timed(baseline, out[name][0])
            timed(fn, out[name][1])
    return out


def ratio_summary(candidate: list[float], baseline: list[float]) -> str:
    """``median (min-max)`` of the per-round ratios ``candidate / baseline``."""
    ratios = [c / b for c, b in zip(candidate, baseline, strict=True)]
    return f"{statistics.median(ratios):5.2f}x ({min(ratios):4.2f}-{max(ratios):4.2f})"
