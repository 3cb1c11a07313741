"""Where the time of one MoE layer forward+backward goes, from a profile of XLA's own ops.

Runs the ``benchmarks/layer.py`` step (router matmul + :func:`sigmoid_moe.route` +
dropless dispatch, forward and backward) under :mod:`jax.profiler`, reads the trace back
(:class:`jax.profiler.ProfileData`) and files every executed XLA op under a stage by the
named scopes the library puts on its ops (``route``, ``layout``, ``blocked_ffn`` with
``gather`` / ``expert_gemms`` / ``swiglu`` / ``scatter_add`` / ``dw_accumulate`` /
``save_h`` inside):

    python benchmarks/breakdown.py                 # preset v3 (T 8192, E 256, k 8, groups 8/4)
    python benchmarks/breakdown.py --preset k2 --steps 5 --top 15

Stages, in ms per step of op time (ops on both cores summed, so the total can exceed
the wall time; the dense SwiGLU of equal active FLOPs is profiled the same way):

- routing: the router matmul forward+backward, and ``route`` (scores, top-k, weights);
- layout: ranking copies within their expert (one sort), blocks and size classes;
- native expert kernel: on the CPU in float32 the expert FFN below (gather to dW) runs as
  one custom call per direction (csrc/expert_ffn_cpu.cc), so its stages are not split;
  ``SIGMOID_MOE_NATIVE=0`` profiles the pure-JAX block scan instead:
- gather: token rows into each block (``x``; ``dy`` in the backward; saved ``h`` rows);
- expert GEMMs: the six per-block matmuls; ``weight slices`` is XLA copying each
  block's expert weights out of the ``[E, ...]`` arrays before its GEMMs;
- swiglu: the activation and its pullback, combine-weight products;
- scatter-add: weighted outputs into ``y``, row gradients into ``dx`` (with the padding
  of a block's results back to whole blocks);
- dW accumulation: adding each block's weight gradients into ``dW[e]``;
- fresh buffers: zero-filling ``dW``, ``dx``, ``y`` and ``h`` before the loops; on CPU
  mostly the page faults of memory the process touches for the first time;
- other: casts, the loss, the thunk runtime's own time.

Figures depend on the load of the machine: run it on idle cores, or read the shares. The
first lines say which CPU, vector extensions, threads and GEMM library measured them, and
which kernels the profiled MoE program holds; ``SIGMOID_MOE_NATIVE=0`` profiles the
portable paths.
"""

from __future__ import annotations

import argparse
import collections
import functools
import re
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _machine import describe, kernels_in
from _presets import PRESETS

from sigmoid_moe import RouterConfig, route
from sigmoid_moe.dispatch import dropless_moe
from sigmoid_moe.experts import swiglu_ffn

STAGES = (
    "routing: router matmul",
    "routing: route",
    "layout",
    "native expert kernel: forward",
    "native expert kernel: backward",
    "gather",
    "expert GEMMs",
    "weight slices",
    "swiglu",
    "scatter-add",
    "dW accumulation",
    "save/load h",
    "fresh buffers (zero-fill)",
    "dense: GEMMs",
    "dense: elementwise",
    "other",
)

_KERNEL_SCOPES = {
    "gather": "gather",
    "expert_gemms": "expert GEMMs",
    "swiglu": "swiglu",
    "scatter_add": "scatter-add",
    "dw_accumulate": "dW accumulation",
    "save_h": "save/load h",
}


def _stage(op_name: str, line: str, dense: bool) -> str:
    """The stage of one HLO instruction, from its scope path and its text."""
    # Scope names as path components, also inside transformation wrappers such as
    # "transpose(jvp(blocked_ffn_bwd))".
    scopes = set(re.findall(r"[A-Za-z_]+", op_name))
    is_dot = " dot(" in line or ("kind=kCustom" in line and "dot_general" in op_name)
    if dense:
        return "dense: GEMMs" if is_dot else "dense: elementwise"
    if "router_matmul" in scopes:
        return "routing: router matmul"
    if "route" in scopes:
        return "routing: route"
    if "layout" in scopes:
        return "layout"
    if "blocked_ffn_native" in scopes:
        # The whole expert FFN in one custom call per direction (csrc/expert_ffn_cpu.cc).
        return f"native expert kernel: {'backward' if 'transpose' in scopes else 'forward'}"
    for scope, stage in _KERNEL_SCOPES.items():
        if scope in scopes:
            if stage == "expert GEMMs" and not is_dot and "dynamic" in line:
                return "weight slices"
            return stage
    if "broadcast" in line.split("=", 1)[-1].split("(", 1)[0] or "wrapped_broadcast" in line:
        return "fresh buffers (zero-fill)"
    return "other"


def _instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (op_name metadata, the instruction's text)."""
    out = {}
    for line in hlo_text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%(\S+) = ", line)
        if match:
            op = re.search(r'op_name="([^"]*)"', line)
            out[match.group(1)] = (op.group(1) if op else "", line)
    return out


def _op_times(compiled, args, steps: int) -> tuple[dict[str, float], float]:
    """Exclusive seconds per executed op name over ``steps`` calls, and the median wall."""
    for _ in range(2):
        jax.block_until_ready(compiled(*args))
    walls = []
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(steps):
                start = time.perf_counter()
                jax.block_until_ready(compiled(*args))
                walls.append(time.perf_counter() - start)
        (path,) = Path(trace_dir).rglob("*.xplane.pb")
        profile = jax.profiler.ProfileData.from_file(str(path))
    exclusive: collections.Counter = collections.Counter()
    for plane in profile.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            if line.name == "python":
                continue
            events = sorted(
                ((ev.start_ns, ev.start_ns + ev.duration_ns, ev.name) for ev in line.events),
                key=lambda event: (event[0], -event[1]),
            )
            stack: list[tuple[float, float, str]] = []
            for start, end, name in events:  # nested events: charge each its own time
                while stack and stack[-1][1] <= start:
                    stack.pop()
                if stack:
                    exclusive[stack[-1][2]] -= end - start
                exclusive[name] += end - start
                stack.append((start, end, name))
    return {name: ns / 1e9 / steps for name, ns in exclusive.items()}, statistics.median(walls)


def _by_stage(op_seconds, instructions, dense: bool):
    stages: collections.Counter = collections.Counter()
    for name, seconds in op_seconds.items():
        if "wait for completion" in name or name.startswith("end: "):
            continue  # the caller waiting, and zero-length markers
        if name in instructions:
            stages[_stage(*instructions[name], dense=dense)] += seconds
        else:
            stages["other"] += seconds  # the thunk runtime itself
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="v3", choices=list(PRESETS))
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warm-up)")
    parser.add_argument("--top", type=int, default=0, help="also list the N costliest ops")
    args = parser.parse_args()
    t, d, f, e, k, groups, kept = PRESETS[args.preset]
    rng = np.random.default_rng(0)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    x_td = f32(rng.normal(size=(t, d)))
    moe = (
        f32(rng.normal(size=(d, e)) / np.sqrt(d)),
        f32(rng.normal(size=(e, d, 2 * f)) / np.sqrt(d)),
        f32(rng.normal(size=(e, f, d)) / np.sqrt(f)),
    )
    dense = (
        f32(rng.normal(size=(d, 2 * k * f)) / np.sqrt(d)),
        f32(rng.normal(size=(k * f, d)) / np.sqrt(k * f)),
    )
    router = RouterConfig(e, k, num_groups=groups, topk_groups=kept)

    def moe_loss(params, x_td):
        router_w_de, w_in_edf, w_out_efd = params
        with jax.named_scope("router_matmul"):
            logits = jnp.dot(x_td, router_w_de)
        routing = route(logits, None, router)
        y_td, _ = dropless_moe(x_td, routing.expert_ids, routing.weights, w_in_edf, w_out_efd)
        return jnp.sum(y_td * y_td)

    def dense_loss(params, x_td):
        y_td = swiglu_ffn(x_td, *params)
        return jnp.sum(y_td * y_td)

    results = {}
    for name, loss, params in (("dense", dense_loss, dense), ("moe", moe_loss, moe)):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x_td).compile()
        ops, wall = _op_times(compiled, (params, x_td), args.steps)
        instructions = _instructions(compiled.as_text())
        stages = _by_stage(ops, instructions, dense=name == "dense")
        results[name] = (stages, wall, ops, instructions)
        if name == "moe":
            moe_text = compiled.as_text()

    dense_stages, dense_wall, _, _ = results["dense"]
    moe_stages, moe_wall, moe_ops, moe_instructions = results["moe"]
    dense_total = sum(dense_stages.values())
    moe_total = sum(moe_stages.values())
    group_text = f", groups {groups}/{kept}" if groups > 1 else ""
    print(describe())
    print(f"MoE program: {kernels_in(moe_text)}")
    print(
        f"preset {args.preset}: T {t}, d {d}, d_ff {f}, E {e}, k {k}{group_text}; float32, "
        f"{args.steps} profiled steps (wall times under the profiler)"
    )
    print(
        f"  wall per step: MoE {moe_wall * 1e3:.1f} ms, dense {dense_wall * 1e3:.1f} ms "
        f"({moe_wall / dense_wall:.2f}x); op time: MoE {moe_total * 1e3:.1f} ms, dense "
        f"{dense_total * 1e3:.1f} ms ({moe_total / dense_total:.2f}x)"
    )
    print(f"  {'stage':28s} {'ms/step':>9s} {'of MoE':>7s} {'of dense':>9s}")
    for stage in STAGES:
        seconds = moe_stages.get(stage, 0.0) + dense_stages.get(stage, 0.0)
        if seconds == 0.0:
            continue
        of_moe = f"{seconds / moe_total:6.1%}" if not stage.startswith("dense") else ""
        print(f"  {stage:28s} {seconds * 1e3:9.1f} {of_moe:>7s} {seconds / dense_total:8.1%}")
    if args.top:
        print("  costliest MoE ops, ms/step:")
        for name, seconds in collections.Counter(moe_ops).most_common(args.top):
            op_name, line = moe_instructions.get(name, ("", ""))
            stage = _stage(op_name, line, dense=False) if line else "runtime"
            print(f"    {seconds * 1e3:8.1f}  {name:32s} {stage:26s} {op_name[-60:]}")


if __name__ == "__main__":
    main()
