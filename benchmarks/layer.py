"""MoE layer forward+backward time and peak memory against a dense SwiGLU of equal active FLOPs.

The dense baseline has ``d_ff = k * expert d_ff``, so per token it does the same matmul
FLOPs as the k routed experts. Both run in the same process on the same inputs. Routing
(router matmul + :func:`sigmoid_moe.route`, group-limited where the preset says so) is
included in the MoE time: it is part of the layer's cost.

    python benchmarks/layer.py                        # preset v2: d512 F1024 E64 k6 T8192
    python benchmarks/layer.py --preset all           # every preset, one after another
    python benchmarks/layer.py --preset v3 --rounds 7
    python benchmarks/layer.py --experts 32 --tokens 2048   # the v2 preset, changed
    python benchmarks/layer.py --paths auto               # only what kernel="auto" runs

Presets (float32; goals of issue 28 in brackets, dropless; capacity at most 1.2x at E64):

    v2     T 8192, d 512, d_ff 1024, E  64, k 6               [<= 1.10x]
    v3     T 8192, d 512, d_ff  256, E 256, k 8, groups 8/4   [<= 1.3x]  DeepSeek-V3-like
    k2     T 8192, d 512, d_ff  128, E 384, k 8               [<= 1.5x]  Kimi-K2-like
    small  T 1024, d 256, d_ff  512, E  16, k 2               [<= 1.3x]  the harness's regime

Paths (``--paths``), each compiled in this process: ``auto``, what ``kernel="auto"``
runs; ``native``, the native CPU kernels with the expert kernel forced on (whatever
``sigmoid_moe._native_ffn.gemm_uses_widest_vectors`` says); ``portable``, every kernel
off (``SIGMOID_MOE_NATIVE=0`` at trace time: the pure-JAX paths GPU/TPU programs hold).
Each row names the kernels its program holds, and the script ends with auto's time
against the faster of native and portable (the goal: within 5%).

Timing: each MoE variant is called right after the dense baseline, ``--rounds`` times,
and the reported ratio is the median of those paired ratios (min-max in brackets), in
wall time and in process CPU time, and ``min/min`` the ratio of the fastest calls. On a
machine shared with other jobs the CPU-time ratio and ``min/min`` are the steadier ones;
on idle cores they all agree. The first lines say which CPU, vector
extensions, threads and GEMM library measured them (``_machine.py``).

Peak bytes come from ``jax.jit(f).lower(...).compile().memory_analysis()`` (temp +
arguments + outputs). The budget is ``1.1 x dense peak + expert weights + their
gradients``: what a layer with ``E / k`` times the dense FFN's parameters has to hold.
Where the native CPU expert kernel runs (csrc/expert_ffn_cpu.cc), its memory outside
XLA's buffers is added at its upper bound (``sigmoid_moe._native_ffn.host_scratch_bytes``:
one wave of per-row outputs, at most 32 MiB, and per thread one chunk of 256 rows with
the GEMM library's packing of it).

Measurements behind the block kernel's design (2 CPU cores, float32, 2026-11/12):

- Block size (``blocked_ffn.auto_block_size``, 1.5x an expert's average rows), forward
  +backward against blocks of 128: 0.89x at 768 rows per expert (blocks of 512), 0.94x at
  256 (384), 0.95x at 171 (256); blocks of 64 at 256 rows: 1.26x.
- Size classes: whole blocks added 25-50% to the GEMMs at v3. XLA compile time of the
  tiny harness preset's train step (block 96): 16 classes of 6 rows 11.1 s, one class
  4.9 s (the ragged_dot kernel: 4.2 s); a floor of 16 rows on the class step (6 classes:
  7.0 s) made the small preset slower (1.46-1.67x the dense FFN against 1.37-1.46x), so
  classes under 128-row blocks are off and the step stays B / 16.
- One fused loop rather than grouped matmuls: writing a newly allocated 470 MB buffer took
  110 ms, reading it 12 ms; at v2 the fused scan halved the peak memory of separate
  grouped matmuls (2.7 GB -> 1.3 GB, the dense FFN's 1.26 GB) and took forward+backward
  from 1.31x to 1.09x of the dense FFN.
- The native expert kernel, then with a hand-written AVX2 GEMM, took small from 1.37x to
  1.09x and k2 from 1.49x to 1.29x on an AMD EPYC (Zen 4). On an Intel Xeon with AVX-512
  (issue 28) it made the layer 2.18x the dense FFN at v2 against the scan's 1.27x (its
  GEMMs at about half of XLA's speed), which is why its GEMMs now come from OpenBLAS.
- The kernel's row gather: 64 K rows of 2 KiB from random tokens took 9.3 ms of one
  core without software prefetch, 6.8 ms with each row requested two rows ahead.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from _machine import describe, kernels_in
from _presets import PRESETS
from _timing import paired_rounds, ratio_summary

from sigmoid_moe import RouterConfig, _native_ffn, route
from sigmoid_moe.blocked_ffn import capped_block_size, num_blocks_bound
from sigmoid_moe.dispatch import capacity_moe, dropless_moe
from sigmoid_moe.experts import swiglu_ffn

# How each path is traced: ``auto`` as users get it; ``native`` with the expert kernel's
# rule forced on; ``portable`` with every native kernel off.
_PATHS = {
    "auto": lambda: mock.patch.dict(os.environ, {}),
    "native": lambda: mock.patch.object(
        _native_ffn, "gemm_uses_widest_vectors", lambda *args, **kwargs: True
    ),
    "portable": lambda: mock.patch.dict(os.environ, {"SIGMOID_MOE_NATIVE": "0"}),
}


def _moe_loss(dispatch, router, params, x_td):
    logits = jnp.dot(x_td, params["router_w_de"])
    routing = route(logits, None, router)
    y_td, _ = dispatch(
        x_td, routing.expert_ids, routing.weights, params["w_in_edf"], params["w_out_efd"]
    )
    return jnp.sum(y_td * y_td)


def _dense_loss(params, x_td):
    y_td = swiglu_ffn(x_td, params["w_in_df"], params["w_out_fd"])
    return jnp.sum(y_td * y_td)


def _peak_bytes(compiled) -> int:
    stats = compiled.memory_analysis()
    return int(stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes)


def _run(shape, args) -> None:
    t, d, f, e, k, groups, kept = shape
    rng = np.random.default_rng(0)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    x_td = f32(rng.normal(size=(t, d)))
    moe = {
        "router_w_de": f32(rng.normal(size=(d, e)) / np.sqrt(d)),
        "w_in_edf": f32(rng.normal(size=(e, d, 2 * f)) / np.sqrt(d)),
        "w_out_efd": f32(rng.normal(size=(e, f, d)) / np.sqrt(f)),
    }
    dense = {
        "w_in_df": f32(rng.normal(size=(d, 2 * k * f)) / np.sqrt(d)),
        "w_out_fd": f32(rng.normal(size=(k * f, d)) / np.sqrt(k * f)),
    }
    router = RouterConfig(e, k, num_groups=groups, topk_groups=kept)

    def compiled(loss, params):
        fn = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x_td).compile()
        return fn, (params, x_td)

    dense_fn, dense_args = compiled(_dense_loss, dense)
    dispatches = {}
    for kernel in args.capacity_kernels.split(",") if args.capacity_kernels else ():
        dispatches[f"capacity {args.capacity_factor} ({kernel})"] = functools.partial(
            capacity_moe, capacity_factor=args.capacity_factor, kernel=kernel
        )
    for kernel in args.kernels.split(","):
        dispatches[f"dropless ({kernel})"] = functools.partial(dropless_moe, kernel=kernel)
    if args.block_sizes:
        dispatches = {
            f"{name[:-1]}, block {size})": functools.partial(fn, block_size=int(size))
            for name, fn in dispatches.items()
            for size in args.block_sizes.split(",")
        }
    moe_fns = {}
    for name, dispatch in dispatches.items():
        # Capacity runs auto only (its goal is the layer's); dropless every path asked for.
        paths = args.paths.split(",") if name.startswith("dropless") else ["auto"]
        for path in paths:
            with _PATHS[path]():
                moe_fns[f"{name} {path}"] = compiled(
                    functools.partial(_moe_loss, dispatch, router), moe
                )

    expert_bytes = 4 * (moe["w_in_edf"].size + moe["w_out_efd"].size)
    dense_peak = _peak_bytes(dense_fn)
    budget = 1.1 * dense_peak + 2 * expert_bytes
    group_text = f", groups {groups}/{kept}" if groups > 1 else ""
    print(f"T {t}, d {d}, d_ff {f}, E {e}, k {k}{group_text}; float32; {args.rounds} paired rounds")
    print(
        f"  dense SwiGLU d_ff={k * f}: peak {dense_peak / 2**20:7.1f} MiB; expert weights "
        f"{expert_bytes / 2**20:.1f} MiB; memory budget {budget / 2**20:.1f} MiB"
    )
    calls = {name: functools.partial(fn, *fn_args) for name, (fn, fn_args) in moe_fns.items()}
    results = paired_rounds(functools.partial(dense_fn, *dense_args), calls, args.rounds)
    summary = {}  # name -> (median paired wall ratio, fastest / fastest, median cpu ratio)
    for name, (base, cand) in results.items():
        compiled_fn = moe_fns[name][0]
        text = compiled_fn.as_text()
        scratch = _kernel_scratch_bytes(t, d, f, e, k) if "sigmoid_moe_expert_ffn" in text else 0
        peak = _peak_bytes(compiled_fn) + scratch
        summary[name] = (
            _paired_median(cand.wall, base.wall),
            min(cand.wall) / min(base.wall),
            _paired_median(cand.cpu, base.cpu),
        )
        print(
            f"  {name:34s} {statistics.median(cand.wall) * 1e3:8.1f} ms "
            f"(dense {statistics.median(base.wall) * 1e3:7.1f})  "
            f"wall {ratio_summary(cand.wall, base.wall)}  min/min {summary[name][1]:5.2f}x  "
            f"cpu {ratio_summary(cand.cpu, base.cpu)}"
            f"  peak {peak / 2**20:7.1f} MiB = {peak / budget:4.2f}x budget"
        )
        print(f"  {'':34s} {kernels_in(text)}")
    for name in dispatches:
        auto = summary.get(f"{name} auto")
        others = [
            summary[f"{name} {p}"] for p in ("native", "portable") if f"{name} {p}" in summary
        ]
        if auto is not None and others:
            faster = [min(column) for column in zip(*others, strict=True)]
            print(
                f"  {name}: auto / the faster of native and portable: wall "
                f"{auto[0] / faster[0]:.3f}, min/min {auto[1] / faster[1]:.3f}, "
                f"cpu {auto[2] / faster[2]:.3f}"
            )


def _paired_median(candidate: list[float], baseline: list[float]) -> float:
    return statistics.median(c / b for c, b in zip(candidate, baseline, strict=True))


def _kernel_scratch_bytes(t: int, d: int, f: int, e: int, k: int) -> int:
    """Upper bound of the native expert kernel's host memory outside XLA, for the dropless
    layout's rows (a capacity layout has no more)."""
    block = capped_block_size(None, -(-t * k // e))
    num_rows = num_blocks_bound(t * k, e, block) * block
    return _native_ffn.host_scratch_bytes(t, num_rows, d, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="v2", choices=[*PRESETS, "all"])
    for flag in ("tokens", "d-model", "d-ff", "experts", "top-k", "groups", "topk-groups"):
        parser.add_argument(f"--{flag}", type=int, default=None, help="overrides the preset")
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument(
        "--block-sizes", default="", help="blocked kernel block sizes, comma separated"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--kernels", default="auto", help="dropless kernels, comma separated")
    parser.add_argument(
        "--capacity-kernels",
        default="auto",
        help="capacity kernels (auto, batched, blocked), comma separated; '' for none",
    )
    parser.add_argument(
        "--paths",
        default="auto,native,portable",
        help="dropless paths (auto, native, portable; see the module docstring), comma separated",
    )
    args = parser.parse_args()
    if unknown := set(args.paths.split(",")) - set(_PATHS):
        parser.error(f"--paths: unknown {sorted(unknown)}; choose from {sorted(_PATHS)}")
    names = list(PRESETS) if args.preset == "all" else [args.preset]
    overrides = (
        args.tokens,
        args.d_model,
        args.d_ff,
        args.experts,
        args.top_k,
        args.groups,
        args.topk_groups,
    )
    print(describe())
    for name in names:
        shape = tuple(
            base if new is None else new for base, new in zip(PRESETS[name], overrides, strict=True)
        )
        print(f"preset {name}: ", end="")
        _run(shape, args)


if __name__ == "__main__":
    main()
