"""Test set-up: 8 simulated CPU devices and quick codegen, set before jax is imported.

Most of the suite's time is XLA compiling small programs. LLVM at -O0
(``--xla_backend_optimization_level=0``) compiles them in about two thirds of the time
(measured: tests/test_layer.py, test_dispatch.py and test_bias_contract.py, 228 s -> 148 s
on 2 cores) and computes the same values: no fast-math, the same XLA lowering. Spawned
processes inherit it. Tests whose claim is about the code users run, such as the native
route's bit-identity with the portable one, compile at the default level explicitly
(``compiler_options``, see tests/test_route_native.py).
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import hypothesis  # noqa: E402

hypothesis.settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(items):
    """The few ``slow`` tests first (a stable sort: the rest keep their order), so that
    ``-n 2`` does not end with one worker running a two-minute test alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
