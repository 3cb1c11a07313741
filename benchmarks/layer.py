"""MoE layer forward+backward time and peak memory against a dense SwiGLU of equal active FLOPs.

The dense baseline has ``d_ff = k * expert d_ff``, so per token it does the same matmul
FLOPs as the k routed experts. Both run in the same process on the same inputs. Routing
(router matmul + top-k) is included in the MoE time: it is part of the layer's cost.

    python benchmarks/layer.py                 # d512 F1024 E64 k6 T8192 float32
    python benchmarks/layer.py --tokens 2048   # quicker

Peak bytes come from ``jax.jit(f).lower(...).compile().memory_analysis()`` (temp +
arguments + outputs).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from _timing import median_seconds

from sigmoid_moe import RouterConfig, route
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


def _peak_bytes(compiled) -> int | None:
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes)


def _time(fn, args, repeats: int) -> tuple[float, int | None]:
    compiled = jax.jit(fn).lower(*args).compile()
    return median_seconds(compiled, args, repeats), _peak_bytes(compiled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kernels", default="auto", help="dropless kernels, comma separated")
    parser.add_argument(
        "--capacity-kernels", default="auto", help="capacity kernels (auto, batched, blocked)"
    )
    args = parser.parse_args()

    d, f, e, k, t = args.d_model, args.d_ff, args.experts, args.top_k, args.tokens
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
    router = RouterConfig(e, k)
    grad = lambda loss: jax.grad(loss, argnums=(0, 1))  # noqa: E731  params and x

    print(f"backend={jax.default_backend()} d_model={d} d_ff={f} E={e} k={k} tokens={t} float32")
    dense_s, dense_bytes = _time(grad(_dense_loss), (dense, x_td), args.repeats)
    print(
        f"dense SwiGLU d_ff={k * f}: {dense_s * 1e3:8.1f} ms  peak {dense_bytes / 2**20:8.1f} MiB"
    )
    variants = {}
    for kernel in args.capacity_kernels.split(","):
        variants[f"capacity ({kernel}, factor {args.capacity_factor})"] = functools.partial(
            capacity_moe,
            capacity_factor=args.capacity_factor,
            kernel=kernel,
            block_size=args.block_size,
        )
    for kernel in args.kernels.split(","):
        variants[f"dropless ({kernel}, block {args.block_size})"] = functools.partial(
            dropless_moe, kernel=kernel, block_size=args.block_size
        )
    for name, dispatch in variants.items():
        loss = functools.partial(_moe_loss, dispatch, router)
        seconds, peak = _time(grad(loss), (moe, x_td), args.repeats)
        print(
            f"{name:34s} {seconds * 1e3:8.1f} ms  peak {peak / 2**20:8.1f} MiB  "
            f"time ratio {seconds / dense_s:5.2f}x  memory ratio {peak / dense_bytes:5.2f}x"
        )


if __name__ == "__main__":
    main()
