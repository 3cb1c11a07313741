"""The research harness: a small MoE language model, its data, training, checkpoints,
and the balancing-strategy comparison with its report (``sigmoid-moe compare``).

Needs the ``[research]`` extra (orbax-checkpoint, matplotlib, tqdm):
``pip install "sigmoid-moe[research]"``; without it this import raises
:class:`~sigmoid_moe.errors.MissingExtraError` saying so."""

from sigmoid_moe._extras import require_research

require_research("sigmoid_moe.harness")  # before the imports below, which need the extra

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
