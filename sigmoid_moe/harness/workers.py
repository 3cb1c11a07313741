"""Independent runs in single-threaded worker processes, so their numbers do not depend on
how many run at once or on the machine's core count.

XLA:CPU's float results depend on its thread count: Eigen may split a contraction's
inner dimension over threads (seen here: the same run's loss differed in the last bit
between one thread and the default pool of two), and a forced host device count changes
them too. :func:`map_in_workers` therefore runs every task in a spawned worker with one
XLA thread and a fixed number of host devices, ``jobs`` workers at a time, and returns the
results in task order: ``jobs`` changes the wall time, never a number.

It is also faster for small models: XLA's intra-op threads cost more than they save on
tiny matmuls, so two single-threaded workers do more than twice the work of one
two-threaded process (figures: README, "The main job").
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

__all__ = ["default_jobs", "map_in_workers"]

T = TypeVar("T")


def default_jobs(num_tasks: int) -> int:
    """One worker per core, at most one per task."""
    return max(1, min(num_tasks, os.cpu_count() or 1))


def _set_up_worker(host_devices: int) -> None:
    """Runs in each worker before JAX starts its backend (XLA reads its flags then)."""
    kept = [
        flag
        for flag in os.environ.get("XLA_FLAGS", "").split()
        if not any(
            name in flag
            for name in ("device_count", "multi_thread_eigen", "intra_op_parallelism_threads")
        )
    ]
    kept += ["--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1"]
    os.environ["XLA_FLAGS"] = " ".join(kept)
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax  # imported already (unpickling this function); the backend is not started

    jax.config.update("jax_num_cpu_devices", host_devices)


def map_in_workers(
    fn: Callable[..., T],
    tasks: Sequence[tuple[Any, ...]],
    jobs: int,
    *,
    host_devices: int = 1,
    on_done: Callable[[int, T], None] | None = None,
) -> list[T]:
    """``[fn(*task) for task in tasks]``, each computed in a single-threaded worker process.

    Each worker takes a contiguous share of ``tasks`` (shares differ by at most one task)
    and runs it in order, so neighbouring tasks that share compiled programs (the seeds of
    one strategy: the train step is cached per process) compile once per worker instead
    of once per task that a free worker happened to pick up.

    Args:
      fn: a module-level function; the tasks must be picklable.
      tasks: its argument tuples.
      jobs: workers running at once.
      host_devices: CPU devices each worker simulates (a device mesh needs them).
      on_done: ``on_done(index, result)``, called here as each task finishes (in
        completion order).

    Returns:
      The results in task order. An exception in a task is raised here; tasks not yet
      started are cancelled.

    On a GPU or TPU backend, and in a multi-process job (whose processes share one mesh),
    the tasks run here, one after the other, on this process's devices.
    """
    import jax

    if jax.default_backend() != "cpu" or jax.process_count() > 1:
        results = []
        for index, task in enumerate(tasks):
            results.append(fn(*task))
            if on_done is not None:
                on_done(index, results[-1])
        return results
    context = multiprocessing.get_context("spawn")
    results: list[Any] = [None] * len(tasks)
    workers = max(1, min(jobs, len(tasks)))
    with contextlib.ExitStack() as stack:
        pools = [
            stack.enter_context(
                ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=context,
                    initializer=_set_up_worker,
                    initargs=(host_devices,),
                )
            )
            for _ in range(workers)
        ]
        # Task i goes to worker i * workers // n: contiguous shares, in task order.
        futures = {
            pools[index * workers // len(tasks)].submit(fn, *task): index
            for index, task in enumerate(tasks)
        }
        try:
            for future in as_completed(futures):
                index = futures[future]
                results[index] = future.result()
                if on_done is not None:
                    on_done(index, results[index])
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return results
