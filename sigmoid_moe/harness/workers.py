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

import multiprocessing
import os
import queue
import signal
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sigmoid_moe.harness._process import set_up_cpu, watch_parent
from sigmoid_moe.sharding import MeshConfig

__all__ = ["default_jobs", "map_in_workers"]

T = TypeVar("T")


def default_jobs(num_tasks: int) -> int:
    """One worker per core, at most one per task."""
    return max(1, min(num_tasks, os.cpu_count() or 1))


def _set_up_worker(host_devices: int, parent_pid: int) -> None:
    """Runs in each worker before JAX starts its backend: one XLA thread, the mesh's
    simulated devices. Ctrl-C is the parent's to handle (it ends the workers), and a worker
    whose parent is gone ends itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch_parent(parent_pid)
    set_up_cpu(host_devices, single_thread=True)


def map_in_workers(
    fn: Callable[..., T],
    tasks: Sequence[tuple[Any, ...]],
    jobs: int,
    *,
    mesh: MeshConfig | None = None,
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
      mesh: the mesh the tasks train on (default one device); each worker simulates its
        devices.
      on_done: ``on_done(index, result)``, called here as each task finishes (in
        completion order).

    Returns:
      The results in task order. An exception in a task is raised here, and so are
      Ctrl-C and :class:`~sigmoid_moe.errors.Terminated`: the workers are then ended at once
      (tasks not yet started never start), and none outlives this process.

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
    devices = 1 if mesh is None else mesh.size
    finished: queue.SimpleQueue = queue.SimpleQueue()  # (index, ok, result or exception)
    pools: list = []
    try:
        for _ in range(workers):
            pools.append(context.Pool(1, _set_up_worker, (devices, os.getpid())))
        # Task i goes to worker i * workers // n: contiguous shares, in task order.
        for index, task in enumerate(tasks):
            pools[index * workers // len(tasks)].apply_async(
                fn,
                task,
                callback=_report(finished, index, True),
                error_callback=_report(finished, index, False),
            )
        for _ in tasks:
            while True:  # a timeout, so that signals are handled while waiting
                try:
                    index, ok, value = finished.get(timeout=0.2)
                    break
                except queue.Empty:
                    continue
            if not ok:
                raise value
            results[index] = value
            if on_done is not None:
                on_done(index, value)
    except BaseException:
        _end_now(pools)
        raise
    for pool in pools:
        pool.close()
        pool.join()
    return results


def _report(finished: queue.SimpleQueue, index: int, ok: bool) -> Callable[[Any], None]:
    """A pool callback that puts ``(index, ok, value)`` on ``finished``."""
    return lambda value: finished.put((index, ok, value))


def _end_now(pools: list) -> None:
    """Kills the pools' workers and drops the pools (emptying ``pools``)."""
    for pool in pools:
        pool.terminate()
    pools.clear()
