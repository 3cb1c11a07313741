"""Test set-up: 8 simulated CPU devices and quick codegen, set before jax is imported.

Most of the suite's time is XLA compiling small programs. LLVM at -O0
(``--xla_backend_optimization_level=0``) compiles them faster (README, "Tests") and
computes the same values: no fast-math, the same XLA lowering. Spawned
processes inherit it. Tests whose claim is about the code users run, such as the native
route's bit-identity with the portable one, compile at the default level explicitly
(``compiler_options``, see tests/test_route_native.py). Compilations are shared through a
persistent cache for the run (below).
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # One persistent compilation cache for this run, shared by the xdist workers and every
    # process the tests spawn (they inherit the environment): the harness, trainer and
    # multi-process tests compile the same tiny-model programs in many processes. A fresh
    # directory per run, removed at exit, so no run reads another's compilations.
    _cache_dir = tempfile.mkdtemp(prefix="sigmoid-moe-jax-cache-")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import hypothesis  # noqa: E402

hypothesis.settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(items):
    """The few ``slow`` tests first (a stable sort: the rest keep their order), so that
    ``-n 2`` does not end with one worker running a two-minute test alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
