"""Expert parallelism on 8 simulated CPU devices: all-to-all bytes and step time.

For one forward+backward step of the MoE dispatch (routing included) this prints

* the bytes the all-to-alls move, read from the compiled HLO
  (``jax.jit(step).lower(...).compile().as_text()``: every ``all-to-all`` op and its
  operand shapes), against the minimum ``T * k * d_model * itemsize * (n - 1) / n`` per
  direction (a step has 4 directions: dispatch and combine, forward and backward);
* the step time of the sharded layer against the unsharded one, measured in the same run.

    python benchmarks/sharding.py                         # T4096 d256 F512 E16 k2, (1,8) (2,4)
    python benchmarks/sharding.py --tokens 1024 --repeats 3

On a machine without 8 devices the script asks XLA for 8 host (CPU) devices; 8 devices
sharing 2 cores make the time ratio a smoke figure, not a speed-up measurement.
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
from typing import NamedTuple  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _timing import median_seconds  # noqa: E402

from sigmoid_moe import RouterConfig, logical_sharding, make_mesh, route  # noqa: E402
from sigmoid_moe.dispatch import capacity_moe, dropless_moe  # noqa: E402
from sigmoid_moe.expert_parallel import (  # noqa: E402
    all_to_all_bytes_minimum,
    expert_parallel_capacity,
    expert_parallel_moe,
)

_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "s32": 4, "u32": 4, "pred": 1}
# "%all-to-all.3 = f32[2,2,320,256]{3,2,1,0} all-to-all(f32[2,2,320,256]{...} %x), ..."
_A2A = re.compile(r"=\s*(.*?)\s+all-to-all(?:-start)?\(")
_COMMENT = re.compile(r"/\*.*?\*/")
_SHAPE = re.compile(r"\b(f32|bf16|f16|f64|s32|u32|pred)\[([0-9,]*)\]")


class AllToAll(NamedTuple):
    """One all-to-all op of the compiled program: its per-device result bytes."""

    shapes: list[str]
    bytes_per_device: int


def all_to_alls(hlo_text: str) -> list[AllToAll]:
    """Every ``all-to-all`` in compiled HLO text with the bytes of its (tuple) result."""
    ops = []
    for line in hlo_text.splitlines():
        match = _A2A.search(_COMMENT.sub("", line))
        if not match:
            continue
        shapes, total = [], 0
        for dtype, dims in _SHAPE.findall(match.group(1)):
            size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
            shapes.append(f"{dtype}[{dims}]")
            total += size * _DTYPE_BYTES[dtype]
        ops.append(AllToAll(shapes=shapes, bytes_per_device=total))
    return ops


def _step(dispatch):
    """Forward + backward of ``sum(y * ct)`` through routing and ``dispatch``.

    Gradients for the parameters *and* ``x`` (as inside a model), so the backward pass
    has both reverse all-to-alls: 4 per step.
    """

    def loss(params, x_td, ct_td, router):
        logits_te = jnp.dot(x_td, params["router_w_de"])
        routing = route(logits_te, None, router)
        y_td = dispatch(
            x_td, routing.expert_ids, routing.weights, params["w_in_edf"], params["w_out_efd"]
        )[0]
        return jnp.sum(y_td * ct_td)

    return jax.value_and_grad(loss, argnums=(0, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=512)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--meshes", default="1x8,2x4", help="data x expert, comma separated")
    args = parser.parse_args()

    t, d, f, e, k = args.tokens, args.d_model, args.d_ff, args.experts, args.top_k
    router = RouterConfig(num_experts=e, top_k=k)
    keys = jax.random.split(jax.random.key(0), 5)
    params = {
        "router_w_de": jax.random.normal(keys[0], (d, e)) / math.sqrt(d),
        "w_in_edf": jax.random.normal(keys[1], (e, d, 2 * f)) / math.sqrt(d),
        "w_out_efd": jax.random.normal(keys[2], (e, f, d)) / math.sqrt(f),
    }
    x_td = jax.random.normal(keys[3], (t, d))
    ct_td = jax.random.normal(keys[4], (t, d))
    itemsize = jnp.dtype(x_td.dtype).itemsize
    print(
        f"T={t} d_model={d} d_ff={f} E={e} k={k} {x_td.dtype} devices={jax.device_count()} "
        f"({jax.default_backend()})"
    )

    baselines = {
        "dropless": lambda *a: dropless_moe(*a),
        "capacity": lambda *a: capacity_moe(*a, capacity_factor=args.capacity_factor),
    }
    base_time = {}
    for name, dispatch in baselines.items():
        step = jax.jit(_step(dispatch), static_argnums=3)
        compiled = step.lower(params, x_td, ct_td, router).compile()
        base_time[name] = median_seconds(compiled, (params, x_td, ct_td), args.repeats)
        print(f"unsharded {name:9s} step {base_time[name] * 1e3:8.1f} ms")

    print(
        f"{'mesh':6s} {'EP slots':26s} {'a2a ops':>7s} {'moved MB':>9s} {'min MB':>8s} "
        f"{'ratio':>6s} {'dropped':>7s} {'step ms':>8s} {'vs unsharded':>12s}"
    )
    for spec in args.meshes.split(","):
        data, expert = (int(v) for v in spec.split("x"))
        mesh = make_mesh(data=data, expert=expert)
        local = t // mesh.size
        put = {
            "x": logical_sharding(mesh, ("activation_batch", None)),
            "w": logical_sharding(mesh, ("exp", "embed", "mlp")),
            "r": logical_sharding(mesh, ("embed", "router_exp")),
        }
        placed = {
            "router_w_de": jax.device_put(params["router_w_de"], put["r"]),
            "w_in_edf": jax.device_put(params["w_in_edf"], put["w"]),
            "w_out_efd": jax.device_put(params["w_out_efd"], put["w"]),
        }
        xs = jax.device_put(x_td, put["x"])
        cts = jax.device_put(ct_td, put["x"])
        for label, factor, base in (
            (f"capacity {args.capacity_factor}", args.capacity_factor, "capacity"),
            ("drop-free (T_local)", None, "dropless"),
        ):

            def dispatch(*a, factor=factor, mesh=mesh):
                return expert_parallel_moe(*a, mesh=mesh, capacity_factor=factor)

            step = jax.jit(_step(dispatch), static_argnums=3)
            compiled = step.lower(placed, xs, cts, router).compile()
            ops = all_to_alls(compiled.as_text())
            # Each device keeps 1/n of its buffer; (n-1)/n of it crosses the wire.
            moved = sum(op.bytes_per_device for op in ops) * mesh.size * (expert - 1) / expert
            minimum = 4 * all_to_all_bytes_minimum(t, k, d, itemsize, expert)
            dropped = jax.jit(dispatch)(
                xs, *_routing(placed, xs, router), placed["w_in_edf"], placed["w_out_efd"]
            ).dropped
            step_s = median_seconds(compiled, (placed, xs, cts), args.repeats)
            slots = expert_parallel_capacity(local, k, e, factor)
            print(
                f"{spec:6s} {label + f' C={slots}':26s} {len(ops):7d} {moved / 1e6:9.2f} "
                f"{minimum / 1e6:8.2f} {moved / minimum:6.2f} {int(dropped):7d} "
                f"{step_s * 1e3:8.1f} {step_s / base_time[base]:11.2f}x"
            )
    print(
        "moved = sum over all-to-all ops of per-device bytes x devices x (n-1)/n; "
        "min = 4 directions x T*k*d*itemsize*(n-1)/n; n = expert-axis size. "
        "'vs unsharded' divides by the unsharded step with the same dispatch kind."
    )


def _routing(params, x_td, router):
    routing = jax.jit(lambda p, x: route(jnp.dot(x, p["router_w_de"]), None, router))(params, x_td)
    return routing.expert_ids, routing.weights


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
