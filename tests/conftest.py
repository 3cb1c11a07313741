"""Test set-up: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import hypothesis  # noqa: E402

hypothesis.settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(items):
    """The few ``slow`` tests first (a stable sort: the rest keep their order), so that
    ``-n 2`` does not end with one worker running a two-minute test alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
