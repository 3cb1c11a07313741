"""Expert parallelism: exchange bytes against the minimum, on CPU and in the GPU lowering.

For one forward+backward step of the MoE dispatch (routing included) this prints

1. **CPU, compiled and run** on 8 simulated devices: the bytes of the exchange's
   collectives (all-to-all, all-gather, reduce-scatter), read from the compiled HLO, for
   capacity EP and for dropless EP, whose ragged all-to-all is *emulated* on CPU (XLA:CPU
   has none) with padded buffers; and the step time against the unsharded layer.
2. **The cuda lowering of dropless EP** (``jax.export`` with ``platforms=("cuda",)`` on
   an ``AbstractMesh``: no GPU needed) at E64/k6 and E256/k8: the real
   ``ragged_all_to_all`` ops and every other collective of the program; next to it, the
   same step compiled for the 8 CPU devices, whose exchange is the emulation.

Both against the minimum ``T * k * d_model * itemsize * (n - 1) / n`` per direction (a
step has 4: dispatch and return, forward and backward; ``n`` = expert-axis size).

What the lowering lets one measure: shapes, not traffic. A ``ragged_all_to_all`` moves
only the rows its ``send_sizes`` name, known at run time; its ``output`` is a receive
buffer, allocated and never sent. The lowering shows (a) which collectives carry
activations (here only the 4 ragged ops: no padded ``[E, T_l, d]`` exchange), (b) the row
width and dtype, (c) the operand of the dispatch-side ops, ``[T_l * k, d]``: every
copy is sent exactly once, and the return sends each one back, so each op moves
``T * k * d * itemsize`` bytes in total, of which the copies routed to their own
device stay put, and (d) the few int32 all-to-alls of the offsets. "balanced" counts
``(n - 1) / n`` of the copies as crossing; "this routing" counts the copies this run's
router sends off-device (from its expert ids); "worst" is all of them (``n / (n - 1)``).

    python benchmarks/sharding.py                       # T4096 d256 F512 E16 k2, (1,8) (2,4)
    python benchmarks/sharding.py --tokens 1024 --repeats 3
    python benchmarks/sharding.py --lowering-only       # part 2 only
    python benchmarks/sharding.py --lowering-only --skip-cpu-compile   # lowering only (seconds)

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
from jax.sharding import AbstractMesh, AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from sigmoid_moe import RouterConfig, logical_sharding, make_mesh, route  # noqa: E402
from sigmoid_moe.dispatch import capacity_moe, dropless_moe  # noqa: E402
from sigmoid_moe.expert_parallel import (  # noqa: E402
    all_to_all_bytes_minimum,
    expert_parallel_capacity,
    expert_parallel_moe,
)

_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "s32": 4, "u32": 4, "pred": 1}
_MLIR_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "i32": 4, "i64": 8, "i1": 1}
# "%all-to-all.3 = f32[2,2,320,256]{3,2,1,0} all-to-all(f32[2,2,320,256]{...} %x), ..."
_HLO_OP = re.compile(r"=\s*(.*?)\s+(all-to-all|all-gather|reduce-scatter)(?:-start)?\(")
_COMMENT = re.compile(r"/\*.*?\*/")
_SHAPE = re.compile(r"\b(f32|bf16|f16|f64|s32|u32|pred)\[([0-9,]*)\]")
# '"stablehlo.all_to_all"(%x) <{...}> : (tensor<64xi32>) -> tensor<64xi32>'
_MLIR_OP = re.compile(
    r'(?:"stablehlo\.(all_to_all|all_gather|reduce_scatter)"|@(ragged_all_to_all))\('
)
_MLIR_SIG = re.compile(r":\s*\((.*?)\)\s*->\s*(.*?)(?:\s+loc\(|$)")
_TENSOR = re.compile(r"tensor<([0-9x]*?)x?(f32|bf16|f16|f64|i32|i64|i1)>")


class Collective(NamedTuple):
    """One exchange op: its kind, per-device buffer shapes and bytes."""

    kind: str
    shapes: list[str]
    bytes_per_device: int  # result bytes (all-to-all, all-gather), operand (reduce-scatter)
    floating: bool  # carries activations (not int32 sizes / offsets)


def hlo_collectives(hlo_text: str, group_size: int) -> list[Collective]:
    """The all-to-all / all-gather / reduce-scatter ops of compiled (CPU) HLO text."""
    ops = []
    for line in hlo_text.splitlines():
        match = _HLO_OP.search(_COMMENT.sub("", line))
        if not match:
            continue
        shapes, total, floating = [], 0, False
        for dtype, dims in _SHAPE.findall(match.group(1)):
            size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
            shapes.append(f"{dtype}[{dims}]")
            total += size * _DTYPE_BYTES[dtype]
            floating |= dtype in ("f32", "bf16", "f16", "f64")
        if match.group(2) == "reduce-scatter":  # result is 1/n of the operand sent
            total *= group_size
        ops.append(Collective(match.group(2), shapes, total, floating))
    return ops


def _tensor_bytes(text: str) -> tuple[tuple[int, ...], int, str]:
    dims, dtype = _TENSOR.search(text).groups()
    shape = tuple(int(d) for d in dims.split("x") if d)
    return shape, math.prod(shape) * _MLIR_BYTES[dtype], dtype


def mlir_collectives(mlir_text: str) -> list[tuple[str, list[tuple], list[int], list[str]]]:
    """``(kind, operand shapes, operand bytes, dtypes)`` of each exchange op in StableHLO."""
    ops = []
    for line in mlir_text.splitlines():
        match = _MLIR_OP.search(line)
        if not match:
            continue
        kind = match.group(1) or match.group(2)
        signature = _MLIR_SIG.search(line)
        if signature is None:  # multi-line op: the signature closes a later line
            continue
        parts = [_tensor_bytes(t) for t in re.findall(r"tensor<[^>]*>", signature.group(1))]
        ops.append((kind, [p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts]))
    return ops


def _step(dispatch):
    """Forward + backward of ``sum(y * ct)`` through routing and ``dispatch``.

    Gradients for the parameters *and* ``x`` (as inside a model), so the backward pass
    has both reverse exchanges: 4 per step.
    """

    def loss(params, x_td, ct_td, router):
        logits_te = jnp.dot(x_td, params["router_w_de"].astype(x_td.dtype))
        routing = route(logits_te.astype(jnp.float32), None, router)
        y_td = dispatch(
            x_td, routing.expert_ids, routing.weights, params["w_in_edf"], params["w_out_efd"]
        )[0]
        return jnp.sum(y_td.astype(jnp.float32) * ct_td)

    return jax.value_and_grad(loss, argnums=(0, 1))


def _params(key, d, f, e, dtype=jnp.float32):
    keys = jax.random.split(key, 3)
    return {
        "router_w_de": (jax.random.normal(keys[0], (d, e)) / math.sqrt(d)).astype(dtype),
        "w_in_edf": (jax.random.normal(keys[1], (e, d, 2 * f)) / math.sqrt(d)).astype(dtype),
        "w_out_efd": (jax.random.normal(keys[2], (e, f, d)) / math.sqrt(f)).astype(dtype),
    }


def cpu_section(args) -> None:
    t, d, f, e, k = args.tokens, args.d_model, args.d_ff, args.experts, args.top_k
    router = RouterConfig(num_experts=e, top_k=k)
    key_p, key_x, key_c = jax.random.split(jax.random.key(0), 3)
    params = _params(key_p, d, f, e)
    x_td = jax.random.normal(key_x, (t, d))
    ct_td = jax.random.normal(key_c, (t, d))
    itemsize = jnp.dtype(x_td.dtype).itemsize
    print(
        f"[1] CPU, compiled and run: T={t} d_model={d} d_ff={f} E={e} k={k} {x_td.dtype} "
        f"devices={jax.device_count()} ({jax.default_backend()})"
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
        f"{'mesh':6s} {'EP':30s} {'ops':>4s} {'moved MB':>9s} {'min MB':>8s} {'ratio':>6s} "
        f"{'dropped':>7s} {'step ms':>8s} {'vs unsharded':>12s}"
    )
    for spec in args.meshes.split(","):
        data, expert = (int(v) for v in spec.split("x"))
        mesh = make_mesh(data=data, expert=expert)
        local = t // mesh.size
        put = {
            "router_w_de": logical_sharding(mesh, ("embed", "router_exp")),
            "w_in_edf": logical_sharding(mesh, ("exp", "embed", "mlp")),
            "w_out_efd": logical_sharding(mesh, ("exp", "mlp", "embed")),
        }
        placed = {name: jax.device_put(value, put[name]) for name, value in params.items()}
        tokens = logical_sharding(mesh, ("activation_batch", None))
        xs, cts = jax.device_put(x_td, tokens), jax.device_put(ct_td, tokens)
        slots = expert_parallel_capacity(local, k, e, args.capacity_factor)
        for label, factor, base in (
            (f"capacity {args.capacity_factor} C={slots}", args.capacity_factor, "capacity"),
            ("dropless, ragged (emulated)", None, "dropless"),
        ):

            def dispatch(*a, factor=factor, mesh=mesh):
                return expert_parallel_moe(*a, mesh=mesh, capacity_factor=factor)

            step = jax.jit(_step(dispatch), static_argnums=3)
            compiled = step.lower(placed, xs, cts, router).compile()
            ops = hlo_collectives(compiled.as_text(), expert)
            # Each device keeps 1/n of its buffer; (n-1)/n of it crosses the wire.
            moved = sum(op.bytes_per_device for op in ops) * mesh.size * (expert - 1) / expert
            minimum = 4 * all_to_all_bytes_minimum(t, k, d, itemsize, expert)
            ids, weights = _routing(placed, xs, router)
            dropped = jax.jit(dispatch)(xs, ids, weights, placed["w_in_edf"], placed["w_out_efd"])
            step_s = median_seconds(compiled, (placed, xs, cts), args.repeats)
            print(
                f"{spec:6s} {label:30s} {len(ops):4d} {moved / 1e6:9.2f} {minimum / 1e6:8.2f} "
                f"{moved / minimum:6.2f} {int(dropped.dropped):7d} {step_s * 1e3:8.1f} "
                f"{step_s / base_time[base]:11.2f}x"
            )
    print(
        "moved = sum over all-to-all / all-gather / reduce-scatter ops of per-device buffer "
        "bytes x devices x (n-1)/n; min = 4 x T*k*d*itemsize*(n-1)/n. The CPU emulation of "
        "ragged_all_to_all gathers every sender's rows (n times the minimum by design)."
    )


def _off_device_fraction(expert_ids_tk: np.ndarray, data: int, expert: int, e: int) -> float:
    """Share of copies whose expert lives on another device of their expert group."""
    t = expert_ids_tk.shape[0]
    device_t = np.arange(t) // (t // (data * expert))  # P(("data", "expert")): row-major
    owner_tk = expert_ids_tk // (e // expert)
    return float(np.mean(owner_tk != (device_t % expert)[:, None]))


def lowering_section(args) -> None:
    t, d = args.lowering_tokens, args.lowering_d_model
    dtype = jnp.bfloat16
    itemsize = jnp.dtype(dtype).itemsize
    print(
        f"[2] {args.platform} lowering of dropless EP fwd+bwd (jax.export on an AbstractMesh, "
        f"no device): T={t} d_model={d} {jnp.dtype(dtype).name}"
    )
    print(
        f"{'config':16s} {'mesh':5s} {'ragged':>6s} {'sent/dev':>9s} {'recv buf':>9s} "
        f"{'int KB':>7s} {'float a2a':>9s} {'moved MB':>9s} {'min MB':>8s} {'ratio':>6s} "
        f"{'this routing':>12s} {'worst':>6s} {'padded was':>10s} {'CPU emulated':>12s}"
    )
    for config in args.lowering_configs.split(","):
        e, k, f = (int(v) for v in config.split("x"))
        router = RouterConfig(num_experts=e, top_k=k)
        params = _params(jax.random.key(1), d, f, e, dtype)
        x_td = jax.random.normal(jax.random.key(2), (t, d), dtype)
        ids = np.asarray(_routing(params, x_td, router)[0])
        for spec in args.meshes.split(","):
            data, expert = (int(v) for v in spec.split("x"))
            mesh = AbstractMesh((data, expert), ("data", "expert"), (AxisType.Auto,) * 2)
            exported = _export(mesh, params, t, d, router, args.platform)
            ops = mlir_collectives(exported.mlir_module())
            ragged = [op for op in ops if op[0] == "ragged_all_to_all"]
            others = [op for op in ops if op[0] != "ragged_all_to_all"]
            float_others = [op for op in others if any(dt != "i32" for dt in op[3])]
            # Dispatch-side ops send their whole operand: [T_l * k, d].
            sent_rows = min(op[1][0][0] for op in ragged)
            recv_rows = max(op[1][1][0] for op in ragged)
            row_bytes = ragged[0][2][0] // ragged[0][1][0][0]
            devices = data * expert
            total = len(ragged) * sent_rows * devices * row_bytes  # every copy, each op
            int_bytes = sum(sum(op[2]) for op in others if op not in float_others) * devices
            crossing = (expert - 1) / expert
            moved = total * crossing + int_bytes * crossing
            routed = total * _off_device_fraction(ids, data, expert, e) + int_bytes * crossing
            minimum = len(ragged) * all_to_all_bytes_minimum(t, k, d, itemsize, expert)
            emulated = "-"
            if not args.skip_cpu_compile:
                emulated_bytes = _cpu_emulated_bytes(data, expert, params, t, d, router)
                emulated = f"{emulated_bytes / minimum:11.2f}x"
            print(
                f"{f'E{e} k{k} F{f}':16s} {spec:5s} {len(ragged):6d} {sent_rows:9d} {recv_rows:9d} "
                f"{int_bytes / devices / 1e3:7.2f} {len(float_others):9d} {moved / 1e6:9.1f} "
                f"{minimum / 1e6:8.1f} {moved / minimum:6.3f} {routed / minimum:11.3f}x "
                f"{(total + int_bytes * crossing) / minimum:6.3f} {e / k:9.1f}x "
                f"{emulated:>12s}"
            )
    print(
        "sent/dev: rows of a dispatch-side ragged_all_to_all operand (T_l*k); recv buf: rows "
        "of its output buffer (n*T_l*min(E_l, k), the dropless worst case: allocated, not "
        "sent). "
        "int KB: the other collectives per device (all int32 sizes/offsets); float a2a: "
        "collectives other than ragged_all_to_all that carry activations (must be 0). "
        "moved/this routing/worst: (n-1)/n, the measured share, all of the copies cross. "
        "padded was: the T_l slots per (device, expert) exchange this replaces (E/k x). "
        "CPU emulated: the same step compiled for the 8 CPU devices (kernel blocked), all its "
        "all-to-all / all-gather / reduce-scatter bytes x (n-1)/n over the minimum: n x by "
        "design, and 2n x here since XLA:CPU runs bf16 collectives in float32."
    )


def _dropless_step(mesh, params, t, d, router, kernel: str):
    """The jitted dropless-EP step and its abstract arguments (no arrays allocated)."""

    def dispatch(*a):
        return expert_parallel_moe(*a, mesh=mesh, capacity_factor=None, kernel=kernel)

    def spec(shape, dtype, partition):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, partition))

    abstract = {
        "router_w_de": spec(params["router_w_de"].shape, params["router_w_de"].dtype, P()),
        "w_in_edf": spec(params["w_in_edf"].shape, params["w_in_edf"].dtype, P("expert")),
        "w_out_efd": spec(params["w_out_efd"].shape, params["w_out_efd"].dtype, P("expert")),
    }
    tokens = P(mesh.axis_names)
    args = (abstract, spec((t, d), jnp.bfloat16, tokens), spec((t, d), jnp.float32, tokens))
    return jax.jit(_step(dispatch), static_argnums=3), (*args, router)


def _export(mesh, params, t, d, router, platform: str):
    """The step lowered for ``platform`` with ``kernel="auto"``: its own expert kernel."""
    step, args = _dropless_step(mesh, params, t, d, router, "auto")
    calls = ("ragged_all_to_all", "__gpu$xla.gpu.triton", "tpu_custom_call")
    return jax.export.export(
        step,
        platforms=(platform,),
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(c) for c in calls],
    )(*args)


def _cpu_emulated_bytes(data, expert, params, t, d, router) -> float:
    """Bytes crossing devices in the CPU-compiled program (the emulated exchange)."""
    mesh = make_mesh(data=data, expert=expert)
    step, args = _dropless_step(mesh, params, t, d, router, "blocked")
    ops = hlo_collectives(step.lower(*args).compile().as_text(), expert)
    return sum(op.bytes_per_device for op in ops) * mesh.size * (expert - 1) / expert


def _routing(params, x_td, router):
    logits = jnp.dot(x_td, params["router_w_de"].astype(x_td.dtype)).astype(jnp.float32)
    routing = jax.jit(lambda logits: route(logits, None, router))(logits)
    return routing.expert_ids, routing.weights


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
    parser.add_argument(
        "--lowering-configs", default="64x6x1408,256x8x512", help="E x k x d_ff, comma separated"
    )
    parser.add_argument("--lowering-tokens", type=int, default=16384)
    parser.add_argument("--lowering-d-model", type=int, default=2048)
    parser.add_argument("--platform", default="cuda", choices=("cuda", "rocm", "tpu"))
    parser.add_argument("--lowering-only", action="store_true", help="skip part 1")
    parser.add_argument(
        "--skip-cpu-compile", action="store_true", help="part 2 without the CPU-compiled column"
    )
    args = parser.parse_args()
    if not args.lowering_only:
        cpu_section(args)
        print()
    lowering_section(args)


if __name__ == "__main__":
    main()
