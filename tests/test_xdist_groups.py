"""The suite's xdist groups are in effect (they silently were not under pytest 9)."""

import os

import pytest

pytestmark = pytest.mark.xdist_group("xdist_groups_check")


def test_a_grouped_test_carries_its_group(request):
    # pytest-xdist marks a grouped test by appending "@<group>" to its node id on the
    # worker; the loadgroup scheduler sends each group to one worker by that suffix.
    # pytest 9 drops the suffix (pytest-dev/pytest-xdist#1386): the test extras pin
    # pytest<9, and this fails if the pin is lifted before xdist handles it.
    if "PYTEST_XDIST_WORKER" not in os.environ:
        pytest.skip("not run by xdist workers")
    if not getattr(request.config.option, "loadgroup", False):  # set on workers by xdist
        pytest.skip("not run with --dist loadgroup")
    assert request.node.nodeid.endswith("@xdist_groups_check"), request.node.nodeid
