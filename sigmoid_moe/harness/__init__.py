"""The research harness: a small MoE language model, its data, training, checkpoints,
and the balancing-strategy comparison with its report (``sigmoid-moe compare``)."""

from sigmoid_moe.harness.compare import Strategy, compare, default_strategies
from sigmoid_moe.harness.data import Corpus, DataConfig, build_corpus
from sigmoid_moe.harness.evaluate import evaluate
from sigmoid_moe.harness.model import ModelConfig, TransformerLM
from sigmoid_moe.harness.presets import PRESETS, ComparePreset
from sigmoid_moe.harness.train import TrainConfig, TrainResult, train

__all__ = [
    "PRESETS",
    "ComparePreset",
    "Corpus",
    "DataConfig",
    "ModelConfig",
    "Strategy",
    "TrainConfig",
    "TrainResult",
    "TransformerLM",
    "build_corpus",
    "compare",
    "default_strategies",
    "evaluate",
    "train",
]
