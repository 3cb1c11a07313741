"""The native kernels' partitioning rule takes any sharding GSPMD hands it (8 CPU devices).

A program whose shardings carry no mesh (a ``GSPMDSharding`` input, with no mesh set)
makes ``custom_partitioning`` call the rule with ``GSPMDSharding`` operands; that used to
raise ``AttributeError: 'GSPMDSharding' object has no attribute 'spec'``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.sharding_impls import GSPMDSharding
from jax.sharding import AxisType, Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from sigmoid_moe import RouterConfig, _native, route
from sigmoid_moe.topk import top_k

pytestmark = pytest.mark.skipif(not _native.available(), reason="native kernels not built")

MESH = jax.make_mesh((2, 4), ("data", "expert"), (AxisType.Auto,) * 2)


def _gspmd(named: NamedSharding, ndim: int) -> GSPMDSharding:
    """The same placement without a mesh, as GSPMD describes it."""
    return GSPMDSharding(tuple(named.mesh.devices.flat), named._to_xla_hlo_sharding(ndim))


ROWS_BY_DATA = NamedSharding(MESH, P("data", None))  # rows over 2 devices, 4 replicas each
ROWS_BY_ALL = NamedSharding(MESH, P(("data", "expert"), None))
REPLICATED = NamedSharding(MESH, P())
SHARDINGS = {
    "named rows": (ROWS_BY_DATA, ROWS_BY_DATA),
    "named replicated": (REPLICATED, REPLICATED),
    "named last dim sharded": (NamedSharding(MESH, P("data", "expert")), ROWS_BY_DATA),
    "gspmd rows, partly replicated": (_gspmd(ROWS_BY_DATA, 2), ROWS_BY_DATA),
    "gspmd rows over all devices": (_gspmd(ROWS_BY_ALL, 2), ROWS_BY_ALL),
    "gspmd replicated": (_gspmd(REPLICATED, 2), REPLICATED),
    "single device": (
        SingleDeviceSharding(jax.devices()[3]),
        NamedSharding(Mesh(np.array(jax.devices()[3:4]), ("one",)), P()),
    ),
}


@pytest.mark.parametrize("name", SHARDINGS)
def test_rule_keeps_rows_and_replicates_the_rest(name):
    given, want_rows = SHARDINGS[name]
    rows = jax.ShapeDtypeStruct((64, 16), jnp.float32, sharding=given)
    param = jax.ShapeDtypeStruct((16,), jnp.float32)  # the rule replicates parameters
    results = (jax.ShapeDtypeStruct((64, 3), jnp.int32), jax.ShapeDtypeStruct((64,), jnp.int32))
    mesh, (rows_s, param_s), (out_s, status_s) = _native._shardings(
        (rows, param), results, num_rows=1
    )
    assert rows_s.mesh is mesh and out_s.mesh is mesh
    assert rows_s.is_equivalent_to(want_rows, 2) and out_s.is_equivalent_to(want_rows, 2)
    want_lead = NamedSharding(want_rows.mesh, P(want_rows.spec[0] if want_rows.spec else None))
    assert status_s.is_equivalent_to(want_lead, 1)
    assert param_s.is_fully_replicated


@pytest.mark.parametrize("name", ["gspmd rows over all devices", "gspmd replicated"])
def test_kernels_run_on_gspmd_inputs(name):
    """top_k and the sigmoid route on inputs that carry no mesh: the rows stay split,
    and the results equal the unsharded ones."""
    given, want_rows = SHARDINGS[name]
    keys = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(keys[0], (64, 16))
    bias = jax.random.normal(keys[1], (16,)) * 0.1
    values, indices = jax.jit(lambda x: top_k(x, 3))(jax.device_put(x, given))
    want_values, want_indices = jax.lax.top_k(x, 3)
    np.testing.assert_array_equal(np.asarray(indices), np.asarray(want_indices))
    np.testing.assert_array_equal(np.asarray(values), np.asarray(want_values))
    assert indices.sharding.is_equivalent_to(want_rows, 2)

    config = RouterConfig(16, 3)
    routing = jax.jit(lambda x: route(x, bias, config))(jax.device_put(x, given))
    want = jax.jit(lambda x: route(x, bias, config))(x)
    np.testing.assert_array_equal(np.asarray(routing.expert_ids), np.asarray(want.expert_ids))
    np.testing.assert_array_equal(np.asarray(routing.weights), np.asarray(want.weights))
