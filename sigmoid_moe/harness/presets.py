"""Named comparison presets: a base :class:`TrainConfig`, its seeds and the strategy sweep.

- ``default``: the Loss-Free Balancing comparison at laptop size, every strategy over
  three seeds, sized to finish within 10 minutes on two CPU cores.
- ``scope``: the balancing-scope experiment ("Demons in the Detail", arXiv 2501.11873;
  DeepSeek-V3 section 4.5.3): four micro-batches per step, and the aux loss and the
  loss-free bias each at global, micro-batch and sequence scope.
- ``paper``: the LFB paper's MoE (64 routed experts, top-6, 2 shared, fine-grained
  experts) scaled down in width and depth, with the ``u`` sweep of its Figure 3 (1e-4,
  1e-3, 1e-2): 18 runs of 3000 steps, over an hour on two CPU cores (its time and what
  it found: README). It resumes after Ctrl-C.
- ``tiny``: for tests and smoke runs (seconds).
"""

from __future__ import annotations

import dataclasses

from sigmoid_moe.harness.data import DataConfig
from sigmoid_moe.harness.model import ModelConfig
from sigmoid_moe.harness.train import TrainConfig

__all__ = ["PRESETS", "ComparePreset"]


@dataclasses.dataclass(frozen=True)
class ComparePreset:
    """``base`` run, its ``seeds`` and the sweep :func:`default_strategies` expands.

    ``smoke``: the preset only checks that the machinery runs end to end; its report says
    so in its first line (its numbers are not evidence).
    """

    base: TrainConfig
    seeds: tuple[int, ...] = (0, 1, 2)
    bias_rates: tuple[float, ...] = (1e-3,)
    rules: tuple[str, ...] = ("sign",)
    aux_coefs: tuple[float, ...] = (1e-3,)
    scopes: tuple[str, ...] = ("global",)
    softmax_baseline: bool = True
    softmax_lossfree_rates: tuple[float, ...] = ()
    smoke: bool = False

    def strategies(self, **overrides) -> list:
        """The preset's strategies (:func:`default_strategies`), fields overridden by the
        non-None ``overrides`` (e.g. the command line's ``bias_rates``)."""
        from sigmoid_moe.harness.compare import default_strategies

        fields = {
            "bias_rates": self.bias_rates,
            "rules": self.rules,
            "aux_coefs": self.aux_coefs,
            "scopes": self.scopes,
            "softmax_baseline": self.softmax_baseline,
            "softmax_lossfree_rates": self.softmax_lossfree_rates,
        }
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return default_strategies(**fields)


_DEFAULT = TrainConfig(
    model=ModelConfig(
        num_layers=2, d_model=64, num_heads=4, seq_len=64, num_experts=16, top_k=2, d_ff=64
    ),
    # As much code as the built-in prose holds (466,273 bytes under CPython 3.11), so both
    # domains get what they ask for and weigh alike in validation.
    data=DataConfig(code_bytes=460_000, prose_bytes=460_000),
    steps=800,
    # 16 x 64 = 1024 tokens a step: the 12 runs fit 10 minutes on two cores (at 32
    # sequences they took 13; `--batch-size 32` runs that scale).
    batch_size=16,
    learning_rate=3e-3,
    warmup_steps=50,
    eval_every=200,
    checkpoint_every=200,
    interference_every=10,
)

PRESETS: dict[str, ComparePreset] = {
    # Four strategies x three seeds: 12 runs, six per worker on two cores. The u sweep is
    # the paper preset's (or --bias-rates 1e-3,1e-2 here).
    "default": ComparePreset(base=_DEFAULT),
    "scope": ComparePreset(
        base=dataclasses.replace(_DEFAULT, batch_size=32, grad_accum=4),
        scopes=("global", "micro", "sequence"),
        softmax_baseline=False,
    ),
    "paper": ComparePreset(
        base=TrainConfig(
            model=ModelConfig(
                num_layers=2,
                d_model=64,
                num_heads=4,
                seq_len=64,
                num_experts=64,
                top_k=6,
                d_ff=16,
                num_shared_experts=2,
            ),
            data=DataConfig(code_bytes=1_500_000, prose_bytes=1_500_000),
            steps=3000,
            batch_size=32,
            learning_rate=3e-3,
            warmup_steps=100,
            eval_every=500,
            checkpoint_every=250,
            interference_every=25,
        ),
        bias_rates=(1e-4, 1e-3, 1e-2),
    ),
    # The dilemma (LFB section 2): the aux coefficient from weak to strong for both gates,
    # the loss-free rate over three values, softmax + loss-free to separate the gate from
    # the balancing; the default preset's model and data.
    "pareto": ComparePreset(
        base=_DEFAULT,
        seeds=(0, 1, 2, 3, 4),
        aux_coefs=(1e-4, 1e-3, 1e-2, 1e-1, 3e-1),
        bias_rates=(1e-3, 3e-3, 1e-2),
        softmax_lossfree_rates=(1e-3,),
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
            checkpoint_every=10,
            interference_every=5,
        ),
        seeds=(0,),
        smoke=True,
    ),
}
