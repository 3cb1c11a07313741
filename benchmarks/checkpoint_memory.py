"""Peak host memory of :func:`load_moe_layers` for one layer, against that layer's size.

Writes a generated checkpoint (``--layers`` MoE layers, FP8 or bf16, plus an unrelated
``--other-mb`` tensor so the folder is much bigger than a layer), then loads one layer in
a fresh process per case and reports, as multiples of the layer's dequantised size (its
parameters in ``param_dtype``):

- ``traced``: tracemalloc's peak during the load (every NumPy buffer, exactly);
- ``rss``: the growth of the resident set over the load (sampled every millisecond; it
  also sees XLA buffers and read buffers outside Python's allocator).

Run::

    python benchmarks/checkpoint_memory.py
    python benchmarks/checkpoint_memory.py --experts 64 --d-model 1024 --d-ff 512

Goal (issue 14): about 2x the layer's size, whatever the checkpoint's total size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(folder: str, layer: int, param_dtype: str) -> dict:
    """Loads ``layer`` from ``folder`` in this process; returns the peaks in bytes."""
    import jax.numpy as jnp

    from sigmoid_moe.interop import load_moe_layers

    jnp.zeros(1).block_until_ready()  # start the XLA CPU client outside the measurement
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    tracemalloc.start()
    loaded = load_moe_layers(folder, [layer], param_dtype=getattr(jnp, param_dtype))[layer]
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    done.set()
    sampler.join()
    peak[0] = max(peak[0], _rss_bytes())
    size = sum(
        getattr(loaded, name)[...].nbytes
        for name in ("router_w_de", "bias_e", "w_in_edf", "w_out_efd")
        + (("shared_w_in_df", "shared_w_out_fd") if loaded.shared_w_in_df is not None else ())
    )
    return {"layer_bytes": size, "traced": traced, "rss": peak[0] - base}


def _write(folder: Path, args: argparse.Namespace, fp8: bool) -> int:
    import jax.numpy as jnp
    import ml_dtypes
    import numpy as np
    from flax import nnx
    from safetensors.numpy import save_file

    from sigmoid_moe import MoEConfig, MoELayer, RouterConfig
    from sigmoid_moe.interop import save_moe_layers

    config = {
        "model_type": "deepseek_v3",
        "hidden_size": args.d_model,
        "moe_intermediate_size": args.d_ff,
        "num_hidden_layers": args.layers,
        "first_k_dense_replace": 0,
        "n_routed_experts": args.experts,
        "num_experts_per_tok": 4,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.0,
    }
    router = RouterConfig.from_hf(config)
    moe = MoEConfig(args.d_model, args.d_ff, router, num_shared_experts=1, param_dtype=jnp.bfloat16)
    layer = MoELayer(moe, rngs=nnx.Rngs(0))
    layers = dict.fromkeys(range(args.layers), layer)
    save_moe_layers(folder, layers, config, fp8=fp8, max_shard_size=2**23)
    other = np.zeros((args.other_mb * 2**19,), ml_dtypes.bfloat16)  # 2 bytes each
    save_file({"model.embed_tokens.weight": other}, str(folder / "other.safetensors"))
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.embed_tokens.weight"] = "other.safetensors"
    index_file.write_text(json.dumps(index))
    return sum(p.stat().st_size for p in folder.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=256)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--other-mb", type=int, default=256)
    parser.add_argument("--measure", nargs=3, metavar=("FOLDER", "LAYER", "DTYPE"))
    args = parser.parse_args()
    if args.measure:
        folder, layer, dtype = args.measure
        print(json.dumps(measure(folder, int(layer), dtype)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stored, fp8 in (("fp8", True), ("bf16", False)):
            folder = Path(tmp) / stored
            total = _write(folder, args, fp8)
            for dtype in ("bfloat16", "float32"):
                cmd = [sys.executable, __file__, "--measure", str(folder), "1", dtype]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                rows.append((stored, dtype, total, json.loads(out.splitlines()[-1])))
    print("| stored | param_dtype | checkpoint MB | layer MB | traced peak | RSS growth |")
    print("|---|---|---:|---:|---:|---:|")
    for stored, dtype, total, r in rows:
        size = r["layer_bytes"]
        print(
            f"| {stored} | {dtype} | {total / 2**20:.0f} | {size / 2**20:.1f} | "
            f"{r['traced'] / size:.2f}x | {r['rss'] / size:.2f}x |"
        )
    print(json.dumps([{"stored": s, "param_dtype": d, **r} for s, d, _, r in rows]))


if __name__ == "__main__":
    main()
