"""Layer shapes shared by the benchmark scripts (``benchmarks/layer.py``, ``breakdown.py``)."""

from __future__ import annotations

# name: (tokens, d_model, d_ff, experts, top_k, groups, kept groups)
PRESETS = {
    "v2": (8192, 512, 1024, 64, 6, 1, 1),
    "v3": (8192, 512, 256, 256, 8, 8, 4),
    "k2": (8192, 512, 128, 384, 8, 1, 1),
    "small": (1024, 256, 512, 16, 2, 1, 1),
}
