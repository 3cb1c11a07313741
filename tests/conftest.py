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
    """The modules with ``slow`` tests first, and within each module the slow tests first,
    so that ``-n 2`` does not end with one worker running a two-minute test alone.

    A module's tests stay together: pytest tears a module's fixtures down when the next
    test is in another module, so interleaving modules would build their shared runs
    (``scope="module"`` fixtures) again."""
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    first_seen: dict[str, int] = {}
    for index, item in enumerate(items):
        first_seen.setdefault(item.module.__name__, index)

    def key(item):
        module = item.module.__name__
        return (
            module not in slow_modules,
            first_seen[module],
            item.get_closest_marker("slow") is None,
        )

    items.sort(key=key)  # stable: the rest keep their order
