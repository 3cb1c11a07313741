"""Named comparison presets: a base :class:`TrainConfig` plus the strategy sweep.

``default`` is sized to finish all strategies within 10 minutes on two CPU cores;
``tiny`` is for tests and smoke runs (seconds).
"""

from __future__ import annotations

import dataclasses

from sigmoid_moe.harness.data import DataConfig
from sigmoid_moe.harness.model import ModelConfig
from sigmoid_moe.harness.train import TrainConfig

__all__ = ["PRESETS", "ComparePreset"]


@dataclasses.dataclass(frozen=True)
class ComparePreset:
    """``base`` run plus the sweep :func:`default_strategies` expands."""

    base: TrainConfig
    bias_rates: tuple[float, ...] = (1e-3,)
    rules: tuple[str, ...] = ("sign",)
    aux_coefs: tuple[float, ...] = (1e-3,)


PRESETS: dict[str, ComparePreset] = {
    "default": ComparePreset(
        base=TrainConfig(
            model=ModelConfig(
                num_layers=2, d_model=64, num_heads=4, seq_len=64, num_experts=16, top_k=2, d_ff=64
            ),
            data=DataConfig(code_bytes=600_000, prose_bytes=600_000),
            steps=800,
            batch_size=32,
            learning_rate=3e-3,
            warmup_steps=50,
            eval_every=100,
            eval_windows=64,
            checkpoint_every=200,
        ),
        bias_rates=(1e-3, 1e-2),
    ),
    "tiny": ComparePreset(
        base=TrainConfig(
            model=ModelConfig(
                num_layers=1, d_model=32, num_heads=2, seq_len=32, num_experts=8, top_k=2, d_ff=32
            ),
            data=DataConfig(code_bytes=40_000, prose_bytes=40_000),
            steps=30,
            batch_size=8,
            learning_rate=3e-3,
            warmup_steps=3,
            eval_every=15,
            eval_windows=16,
            checkpoint_every=10,
        ),
    ),
}
