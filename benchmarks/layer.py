"""MoE layer forward+backward time and peak memory against a dense SwiGLU of equal active FLOPs.

The dense baseline has ``d_ff = k * expert d_ff``, so per token it does the same matmul
FLOPs as the k routed experts. Both run in the same process on the same inputs. Routing
(router matmul + :func:`sigmoid_moe.route`, group-limited where the preset says so) is
included in the MoE time: it is part of the layer's cost.

    python benchmarks/layer.py                        # preset v2: d512 F1024 E64 k6 T8192
    python benchmarks/layer.py --preset all           # every preset, one after another
    python benchmarks/layer.py --preset v3 --rounds 7
    python benchmarks/layer.py --experts 32 --tokens 2048   # the v2 preset, changed

Presets (float32; goals of issue 15 in brackets, dropless):

    v2     T 8192, d 512, d_ff 1024, E  64, k 6               [<= 1.15x]
    v3     T 8192, d 512, d_ff  256, E 256, k 8, groups 8/4   [<= 1.3x]  DeepSeek-V3-like
    k2     T 8192, d 512, d_ff  128, E 384, k 8               [<= 1.5x]  Kimi-K2-like
    small  T 1024, d 256, d_ff  512, E  16, k 2               [<= 1.3x]  the harness's regime

Timing: each MoE variant is called right after the dense baseline, ``--rounds`` times,
and the reported ratio is the median of those paired ratios (min-max in brackets), in
wall time and in process CPU time. On a machine shared with other jobs the CPU-time ratio
is the steadier one; on idle cores the two agree.

Peak bytes come from ``jax.jit(f).lower(...).compile().memory_analysis()`` (temp +
arguments + outputs). The budget is ``1.1 x dense peak + expert weights + their
gradients``: what a layer with ``E / k`` times the dense FFN's parameters has to hold.
Where the native CPU expert kernel runs (csrc/expert_ffn_cpu.cc), its memory outside
XLA's buffers is added at its upper bound (``sigmoid_moe._native_ffn.host_scratch_bytes``:
one wave of per-row outputs, at most 32 MiB, and per thread one chunk of 256 rows).
"""

from __future__ import annotations

import argparse
import functools
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from _presets import PRESETS
from _timing import paired_rounds, ratio_summary

from sigmoid_moe import RouterConfig, _native, _native_ffn, route
from sigmoid_moe.blocked_ffn import capped_block_size, num_blocks_bound
from sigmoid_moe.dispatch import capacity_moe, dropless_moe
from sigmoid_moe.experts import swiglu_ffn


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
    variants = {}
    for kernel in args.capacity_kernels.split(",") if args.capacity_kernels else ():
        variants[f"capacity ({kernel}, factor {args.capacity_factor})"] = functools.partial(
            capacity_moe, capacity_factor=args.capacity_factor, kernel=kernel
        )
    for kernel in args.kernels.split(","):
        variants[f"dropless ({kernel})"] = functools.partial(dropless_moe, kernel=kernel)
    if args.block_sizes:
        variants = {
            f"{name[:-1]}, block {size})": functools.partial(fn, block_size=int(size))
            for name, fn in variants.items()
            for size in args.block_sizes.split(",")
        }
    moe_fns = {
        name: compiled(functools.partial(_moe_loss, dispatch, router), moe)
        for name, dispatch in variants.items()
    }

    expert_bytes = 4 * (moe["w_in_edf"].size + moe["w_out_efd"].size)
    dense_peak = _peak_bytes(dense_fn)
    budget = 1.1 * dense_peak + 2 * expert_bytes
    group_text = f", groups {groups}/{kept}" if groups > 1 else ""
    print(
        f"T {t}, d {d}, d_ff {f}, E {e}, k {k}{group_text}; float32 on "
        f"{jax.default_backend()}; {args.rounds} paired rounds"
    )
    print(
        f"  dense SwiGLU d_ff={k * f}: peak {dense_peak / 2**20:7.1f} MiB; expert weights "
        f"{expert_bytes / 2**20:.1f} MiB; memory budget {budget / 2**20:.1f} MiB"
    )
    calls = {name: functools.partial(fn, *fn_args) for name, (fn, fn_args) in moe_fns.items()}
    results = paired_rounds(functools.partial(dense_fn, *dense_args), calls, args.rounds)
    for name, (base, cand) in results.items():
        peak = _peak_bytes(moe_fns[name][0]) + _kernel_scratch_bytes(t, d, f, e, k)
        print(
            f"  {name:30s} {statistics.median(cand.wall) * 1e3:8.1f} ms "
            f"(dense {statistics.median(base.wall) * 1e3:7.1f})  "
            f"wall {ratio_summary(cand.wall, base.wall)}  cpu {ratio_summary(cand.cpu, base.cpu)}"
            f"  peak {peak / 2**20:7.1f} MiB = {peak / budget:4.2f}x budget"
        )


def _kernel_scratch_bytes(t: int, d: int, f: int, e: int, k: int) -> int:
    """Upper bound of the native expert kernel's host memory outside XLA (0 if it is off),
    for the dropless layout's rows (a capacity layout has no more)."""
    if jax.default_backend() != "cpu" or not _native.available():
        return 0
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
    args = parser.parse_args()
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
    for name in names:
        shape = tuple(
            base if new is None else new for base, new in zip(PRESETS[name], overrides, strict=True)
        )
        print(f"preset {name}: ", end="")
        _run(shape, args)


if __name__ == "__main__":
    main()
