"""The ragged all-to-all against a NumPy model of jax.lax.ragged_all_to_all's documented
semantics, on 8 simulated CPU devices (where the emulation is the implementation)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from sigmoid_moe.ragged_exchange import (
    emulated_ragged_all_to_all,
    expert_exchange,
    ragged_all_to_all,
)

WIDTH = 3  # trailing row width


def ragged_all_to_all_model(operands, outputs, input_offsets, send_sizes, output_offsets):
    """The docstring's loop: slice i of sender s lands on device i // per_device."""
    num_devices = len(operands)
    per_device = len(input_offsets[0]) // num_devices
    results = [np.array(out, dtype=np.float64) for out in outputs]
    for s in range(num_devices):
        for i in range(len(input_offsets[s])):
            size, j = int(send_sizes[s][i]), i // per_device
            src, dst = int(input_offsets[s][i]), int(output_offsets[s][i])
            results[j][dst : dst + size] = operands[s][src : src + size]
    return results


def ragged_all_to_all_transpose_model(cts, input_offsets, send_sizes, output_offsets, rows_in):
    """Cotangents (operand, output) of sum(result * ct): each sent row gets its landing
    row's cotangent (summed where a row is sent twice); written output rows get none."""
    num_devices = len(cts)
    per_device = len(input_offsets[0]) // num_devices
    d_operand = [np.zeros((rows_in, *ct.shape[1:])) for ct in cts]
    d_output = [np.array(ct, dtype=np.float64) for ct in cts]
    for s in range(num_devices):
        for i in range(len(input_offsets[s])):
            size, j = int(send_sizes[s][i]), i // per_device
            src, dst = int(input_offsets[s][i]), int(output_offsets[s][i])
            d_operand[s][src : src + size] += cts[j][dst : dst + size]
            d_output[j][dst : dst + size] = 0
    return d_operand, d_output


def random_case(rng, num_devices, per_device, rows_in, rows_out, empty_receiver):
    """Uneven sizes (zeros included), slices placed in random order and gaps per receiver,
    overlapping reads on the sender; ``empty_receiver`` gets no row at all."""
    k = num_devices * per_device
    input_offsets = np.zeros((num_devices, k), np.int32)
    send_sizes = np.zeros((num_devices, k), np.int32)
    output_offsets = np.zeros((num_devices, k), np.int32)
    for j in range(num_devices):
        incoming = [(s, j * per_device + m) for s in range(num_devices) for m in range(per_device)]
        rng.shuffle(incoming)
        cursor = 0
        for s, i in incoming:
            size = 0 if j == empty_receiver or rng.random() < 0.3 else int(rng.integers(1, 5))
            cursor += int(rng.integers(0, 3))  # gaps keep `output`'s rows
            if cursor + size > rows_out or size > rows_in:
                size = 0
            send_sizes[s, i] = size
            output_offsets[s, i] = min(cursor, rows_out - 1) if size == 0 else cursor
            input_offsets[s, i] = rng.integers(0, rows_in - size + 1)
            cursor += size
    # recv_sizes[j][s * per_device + m] = send_sizes[s][j * per_device + m]
    recv_sizes = send_sizes.reshape(num_devices, num_devices, per_device).transpose(1, 0, 2)
    recv_sizes = recv_sizes.reshape(num_devices, k)
    operands = rng.normal(size=(num_devices, rows_in, WIDTH)).astype(np.float32)
    outputs = rng.normal(size=(num_devices, rows_out, WIDTH)).astype(np.float32)
    return operands, outputs, input_offsets, send_sizes, output_offsets, recv_sizes


def _mesh_1d():
    return jax.make_mesh((8,), ("x",), (AxisType.Auto,))


@functools.cache
def _exchange(fn, mesh_shape, axis_name, spec_axes):
    """A jitted shard_map of ``fn`` over the stacked per-device arrays (device-major)."""
    names = ("data", "expert") if len(mesh_shape) == 2 else ("x",)
    mesh = jax.make_mesh(mesh_shape, names, (AxisType.Auto,) * len(names))
    spec = P(spec_axes)
    body = jax.shard_map(
        lambda *a: fn(*(x[0] for x in a), axis_name=axis_name)[None],
        mesh=mesh,
        in_specs=(spec,) * 6,
        out_specs=spec,
    )
    return jax.jit(body)


def _run(fn, case, mesh_shape=(8,), axis_name="x", spec_axes="x"):
    return np.asarray(_exchange(fn, mesh_shape, axis_name, spec_axes)(*map(jnp.asarray, case)))


# Two shapes: M >= N takes the all_gather path, M < N packs per receiver (all_to_all).
SHAPES = {"gather": (2, 6, 20), "packed": (2, 24, 12)}


@pytest.mark.parametrize("path", list(SHAPES))
@given(seed=st.integers(0, 2**31 - 1))
def test_emulation_matches_numpy_model(path, seed):
    per_device, rows_in, rows_out = SHAPES[path]
    rng = np.random.default_rng(seed)
    case = random_case(rng, 8, per_device, rows_in, rows_out, empty_receiver=seed % 8)
    got = _run(emulated_ragged_all_to_all, case)
    want = ragged_all_to_all_model(*case[:5])
    np.testing.assert_array_equal(got, np.stack(want).astype(np.float32))
    assert np.array_equal(got[seed % 8], case[1][seed % 8])  # received nothing: output kept


def test_docstring_example():
    """jax.lax.ragged_all_to_all's own two-device example, embedded in 8 devices."""
    case = [np.zeros((8, 4, 1), np.float32) for _ in range(2)]
    case[0][:2, :3, 0] = [[1, 2, 2], [3, 4, 0]]
    ints = np.zeros((4, 8, 8), np.int32)  # input_offsets, send_sizes, output_offsets, recv
    ints[:, 0, :2] = [[0, 1], [1, 2], [0, 0], [1, 1]]
    ints[:, 1, :2] = [[0, 1], [1, 1], [1, 2], [2, 1]]
    got = _run(emulated_ragged_all_to_all, (*case, *ints))
    np.testing.assert_array_equal(got[0, :, 0], [1, 3, 0, 0])
    np.testing.assert_array_equal(got[1, :, 0], [2, 2, 4, 0])
    assert not got[2:].any()


def test_dispatching_name_is_the_emulation_on_cpu_and_exchanges_within_a_mesh_axis():
    """On a (2, 4) mesh over "expert" only, each data row exchanges on its own."""
    rng = np.random.default_rng(7)
    groups = [random_case(rng, 4, 3, 10, 16, empty_receiver=g) for g in range(2)]
    case = [np.concatenate(parts) for parts in zip(*groups, strict=True)]
    got = _run(ragged_all_to_all, case, (2, 4), "expert", ("data", "expert"))
    want = [ragged_all_to_all_model(*g[:5]) for g in groups]
    np.testing.assert_array_equal(got, np.concatenate(want).astype(np.float32))


def test_gradients_match_numpy_transpose():
    rng = np.random.default_rng(3)
    per_device, rows_in, rows_out = SHAPES["gather"]
    case = random_case(rng, 8, per_device, rows_in, rows_out, empty_receiver=5)
    ints = case[2:]  # random reads overlap: rows sent twice sum their cotangents
    ct = rng.normal(size=(8, rows_out, WIDTH)).astype(np.float32)
    mesh = _mesh_1d()

    def loss(operand, output):
        fn = jax.shard_map(
            lambda o, out, *a: ragged_all_to_all(o, out, *a, axis_name="x"),
            mesh=mesh,
            in_specs=(P("x"),) * 6,
            out_specs=P("x"),
        )
        flat = [a.reshape(-1, *a.shape[2:]) for a in (operand, output, *map(jnp.asarray, ints))]
        return jnp.sum(fn(*flat).reshape(ct.shape) * ct)

    d_operand, d_output = jax.jit(jax.grad(loss, argnums=(0, 1)))(case[0], case[1])
    want_operand, want_output = ragged_all_to_all_transpose_model(
        ct, case[2], case[3], case[4], rows_in
    )
    np.testing.assert_allclose(np.asarray(d_operand), np.stack(want_operand), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(d_output), np.stack(want_output))


def test_expert_exchange_plan_groups_rows_by_local_expert():
    """Counts per (sender, expert) -> the plan; checked against the layout by hand."""
    num_devices, local_experts = 4, 2
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 4, size=(num_devices, num_devices * local_experts)).astype(np.int32)
    counts[:, 2:4] = 0  # device 1 owns experts 2, 3: it receives nothing
    mesh = jax.make_mesh((4,), ("x",), (AxisType.Auto,), devices=jax.devices()[:4])
    plan = jax.jit(
        jax.shard_map(
            lambda c: tuple(a[None] for a in expert_exchange(c[0], "x")),
            mesh=mesh,
            in_specs=P("x"),
            out_specs=P("x"),
        )
    )(jnp.asarray(counts))
    plan = [np.asarray(a) for a in plan]
    send_off, send_sz, land_off, recv_sz, recv_off, origin_off, groups = plan
    for s in range(num_devices):
        np.testing.assert_array_equal(send_off[s], np.cumsum(counts[s]) - counts[s])
        for e in range(num_devices * local_experts):
            j, local = divmod(e, local_experts)
            q = s * local_experts + local
            assert recv_sz[j, q] == counts[s, e]
            assert origin_off[j, q] == send_off[s, e]
            # expert-major, sender-minor in the receiver's buffer
            first = j * local_experts
            want = counts[:, first : first + local].sum() + counts[:s, e].sum()
            assert recv_off[j, q] == want == land_off[s, e]
    np.testing.assert_array_equal(groups, counts.sum(0).reshape(num_devices, local_experts))
    assert not groups[1].any()


def test_bad_arguments_raise_naming_them():
    ints = jnp.zeros((8,), jnp.int32)
    x = jnp.zeros((4, WIDTH))
    with pytest.raises(ValueError, match="axis_index_groups"):
        ragged_all_to_all(x, x, ints, ints, ints, ints, axis_name="x", axis_index_groups=[[0]])
    with pytest.raises(ValueError, match="same trailing dimensions"):
        ragged_all_to_all(x, jnp.zeros((4, 2)), ints, ints, ints, ints, axis_name="x")
    with pytest.raises(TypeError, match="same dtype"):
        ragged_all_to_all(x, x.astype(jnp.bfloat16), ints, ints, ints, ints, axis_name="x")
    with pytest.raises(TypeError, match="send_sizes must be integer"):
        ragged_all_to_all(x, x, ints, ints.astype(float), ints, ints, axis_name="x")
    with pytest.raises(ValueError, match="1-D of one length"):
        ragged_all_to_all(x, x, ints, ints[:4], ints, ints, axis_name="x")
