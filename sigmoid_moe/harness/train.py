"""Training loop: AdamW + warmup/cosine, jitted step, bias update after every step.

Per step (Loss-Free Balancing, arXiv 2408.15664 Algorithm 1; DeepSeek-V3,
arXiv 2412.19437 section 2.1.2)::

    loss = cross_entropy + sum_l aux_loss_l          # aux is 0 unless a coef is set
    params, opt_state = adamw(grads)                 # the bias is not a parameter
    bias_l += u(step) * rule(load_l)                 # global load of this batch, per layer

With an auxiliary loss and ``interference_every > 0``, every so many steps a separate
program measures how the aux-loss gradient on each layer's router weights relates to the
language-model gradient there (their cosine and norm ratio: the interference LFB blames
for the aux loss's cost), from the same parameters and batch as the step; the training
numbers do not change.

Everything that decides the numbers is in :class:`TrainConfig` and the seed, the batch
at a step is a pure function of the data position, and the checkpoint holds the whole
state, so a rerun and a resumed run reproduce the uninterrupted run's metrics bit for bit.

Outputs under ``out_dir``: ``config.json``, ``data.json`` (source files and sha256),
``metrics.jsonl`` (one line per step: loss, per-layer load, MaxVio, bias, aux losses),
``eval.jsonl`` (validation loss over every validation window, overall and per domain,
every ``eval_every`` steps) and ``checkpoints/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import pathlib
import shutil
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sigmoid_moe._checks import require_choice, require_float, require_int
from sigmoid_moe._rate_schedule import check_rate_schedule, rate_schedule
from sigmoid_moe.balancing import BIAS_RULES, BiasRule
from sigmoid_moe.errors import RunFileError
from sigmoid_moe.harness.checkpoint import Checkpointer
from sigmoid_moe.harness.data import Corpus, DataConfig, build_corpus, train_batch
from sigmoid_moe.harness.distributed import (
    fetch,
    global_batch,
    is_writer,
    mesh_context,
    replicated,
    run_mesh,
    sync_processes,
)
from sigmoid_moe.harness.evaluate import validation_loss, validation_losses
from sigmoid_moe.harness.model import ModelConfig, TransformerLM
from sigmoid_moe.harness.run_files import (
    check_same_data,
    read_json,
    require_finite,
    run_folder_lock,
    truncate_jsonl,
    write_json,
)
from sigmoid_moe.layer import PARAM_AXES
from sigmoid_moe.losses import balance_loss
from sigmoid_moe.metrics import max_violation
from sigmoid_moe.routing_bias import ExpertLoad, RoutingBias, routing_bias_update
from sigmoid_moe.sharding import MeshConfig

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainStep",
    "make_train_step",
    "optimizer",
    "per_layer",
    "train",
    "with_learning_rate",
]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run.

    Attributes:
      model: the language model (its ``score_fn`` and ``balance_loss_coef`` pick the gate
        and the auxiliary loss).
      data: the corpus.
      steps: optimizer steps (also the length of the cosine schedule).
      batch_size: sequences per step (``batch_size * seq_len`` tokens: the global batch
        whose load drives the bias update).
      learning_rate: AdamW peak learning rate, reached after ``warmup_steps``, then cosine
        decay to ``learning_rate * final_lr_fraction``.
      weight_decay: AdamW decoupled decay on matrices (not norms or the bias).
      grad_clip: global-norm gradient clipping.
      bias_rate: loss-free update rate ``u`` (0: no bias update). The paper uses 1e-3.
        Checked here, where :func:`train` takes it (finite, ``>= 0``); the step then gets
        ``u(step)`` from :meth:`bias_rate_fn` and uses it as is.
      bias_rule: ``"sign"`` (the paper), ``"sign_zero_mean"`` or ``"proportional"``.
      bias_rate_schedule: how ``u`` changes over the run: ``"constant"``, ``"cosine"``
        (decays to 0 at ``steps``), ``"freeze:N"`` (0 from step N) or ``"warmup:N"``
        (:mod:`sigmoid_moe._rate_schedule`, shared with the lab).
      grad_accum: micro-batches per optimizer step (``batch_size / grad_accum``
        sequences each, run one after the other); the gradient is their mean, the bias
        moves once per step, from the loads combined by ``model.balance_scope``.
      mesh: the devices to train on (:class:`~sigmoid_moe.MeshConfig`; the default: one
        device). The batch is split over all of them, the parameters placed by the
        logical-axis rules, the experts split over the expert axis (expert parallelism
        when it is > 1); the bias update uses the global int load, so the numbers match
        the one-device run up to float reduction order
        (:mod:`sigmoid_moe.harness.distributed`). It is the one setting a run may change
        when it resumes: the checkpoint is restored into the new mesh's shardings.
      seed: model init and data order.
      eval_every: validation loss every so many steps, on every validation window (the
        windows the comparison's table is measured on).
      checkpoint_every: steps between checkpoints (one is always written at the end).
      interference_every: with an auxiliary loss, log the cosine and the norm ratio of the
        aux-loss and language-model gradients on each layer's router weights every so
        many steps (0: never). It costs a forward and two backward passes on those steps.
    """

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    steps: int = 300
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bias_rate: float = 0.0
    bias_rule: BiasRule = "sign"
    bias_rate_schedule: str = "constant"
    grad_accum: int = 1
    mesh: MeshConfig = MeshConfig()
    seed: int = 0
    eval_every: int = 50
    checkpoint_every: int = 100
    interference_every: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelConfig):
            raise TypeError(f"model must be a ModelConfig, got {type(self.model).__name__}.")
        if not isinstance(self.data, DataConfig):
            raise TypeError(f"data must be a DataConfig, got {type(self.data).__name__}.")
        for name in ("steps", "batch_size", "eval_every", "checkpoint_every"):
            require_int(name, getattr(self, name), 1)
        require_int("warmup_steps", self.warmup_steps, 0)
        require_int("interference_every", self.interference_every, 0)
        require_int("grad_accum", self.grad_accum, 1)
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"grad_accum={self.grad_accum} must divide batch_size={self.batch_size}; "
                "each micro-batch holds batch_size / grad_accum sequences."
            )
        if not isinstance(self.mesh, MeshConfig):
            raise TypeError(
                f"mesh must be a MeshConfig such as MeshConfig(data=2, expert=4), got "
                f"{self.mesh!r}."
            )
        # Each micro-batch is split over every device (the library's own mesh check).
        self.mesh.validate(self.model_on_mesh().moe_config(), batch_size=self.micro_batch_size)
        require_int("seed", self.seed, 0)
        if self.warmup_steps >= self.steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} must be < steps={self.steps}; "
                "use about 10% of steps."
            )
        require_float("learning_rate", self.learning_rate, positive=True)
        require_float("final_lr_fraction", self.final_lr_fraction)
        require_float("weight_decay", self.weight_decay)
        require_float("grad_clip", self.grad_clip, positive=True)
        require_float("bias_rate", self.bias_rate)
        require_choice("bias_rule", self.bias_rule, BIAS_RULES)
        try:
            check_rate_schedule(self.bias_rate_schedule)
        except ValueError as err:
            raise ValueError(f"bias_rate_schedule: {err}") from None

    @property
    def micro_batch_size(self) -> int:
        """Sequences per micro-batch, ``batch_size / grad_accum``."""
        return self.batch_size // self.grad_accum

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        data = dict(d.pop("data"))
        data["paths"] = tuple(data.get("paths", ()))
        if "mesh" in d:  # {"data": D, "expert": E}; [D, E] in older run folders
            mesh = d["mesh"]
            d["mesh"] = MeshConfig(**mesh) if isinstance(mesh, dict) else MeshConfig(*mesh)
        return cls(model=ModelConfig(**d.pop("model")), data=DataConfig(**data), **d)

    def model_on_mesh(self) -> ModelConfig:
        """The model as trained: expert parallel over ``"expert"`` when that axis is > 1."""
        return dataclasses.replace(self.model, expert_axis=self.mesh.expert_axis)

    def lr_schedule(self) -> optax.Schedule:
        """``step -> learning rate``: linear warmup, then cosine decay to the final fraction."""
        return _lr_schedule(
            self.learning_rate, self.warmup_steps, self.final_lr_fraction, self.steps
        )

    def bias_rate_fn(self) -> optax.Schedule:
        """``step -> u(step)``: ``bias_rate`` under ``bias_rate_schedule``."""
        return rate_schedule(self.bias_rate_schedule, self.bias_rate, self.steps)


class TrainResult(NamedTuple):
    """``model`` (trained, biases included), its ``corpus``, the ``out_dir``, the step it
    reached (``< config.steps`` when stopped early) and the ``mesh`` it lives on (None for
    one device): use the model under ``distributed.mesh_context(mesh)``."""

    model: TransformerLM
    corpus: Corpus
    out_dir: pathlib.Path
    step: int
    mesh: jax.sharding.Mesh | None = None


def _decay_mask(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def optimizer(
    grad_clip: float, weight_decay: float = 0.0, learning_rate: float = 0.0
) -> optax.GradientTransformationExtraArgs:
    """Global-norm clipping, then ``optax.adamw`` (``b1 = 0.9``, ``b2 = 0.95``, decay on
    matrices only) under ``optax.inject_hyperparams``.

    Its numbers (learning rate, weight decay, betas) live in the state's ``hyperparams``,
    initialised from these arguments; ``update`` reads them from the state. So the trainer
    sets each step's learning rate there (:func:`with_learning_rate`), and one compiled
    step serves every schedule and weight decay.
    """
    return optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.inject_hyperparams(optax.adamw, static_args="mask")(
            learning_rate=learning_rate,
            b1=0.9,
            b2=0.95,
            weight_decay=weight_decay,
            mask=_decay_mask,
        ),
    )


def with_learning_rate(opt_state: tuple, learning_rate) -> tuple:
    """``opt_state`` of :func:`optimizer` with AdamW's learning rate set to ``learning_rate``
    (the schedule's value at this step)."""
    clip_state, adamw_state = opt_state
    hyperparams = {**adamw_state.hyperparams, "learning_rate": learning_rate}
    return clip_state, adamw_state._replace(hyperparams=hyperparams)


def per_layer(state: nnx.State) -> jax.Array:
    """``[L, E]``: each layer's leaf of a bias or load state, stacked (group axes summed).

    Bias and load states of one model share their module paths, so their rows line up.
    """
    return jnp.stack([leaf.reshape(-1, leaf.shape[-1]).sum(0) for leaf in jax.tree.leaves(state)])


def _scoped_loads(loads: nnx.State, scope: str) -> nnx.State:
    """The micro-batches' loads (leaves ``[N, ..., E]``) as the bias update's input:
    summed for the global scope, groups ``[..., G, E]`` for the micro-batch and sequence
    scopes (:func:`sigmoid_moe.update_bias` averages the groups' steps)."""
    if scope == "global":
        return jax.tree.map(lambda leaf: jnp.sum(leaf, axis=0), loads)
    if scope == "micro":
        return jax.tree.map(lambda leaf: jnp.moveaxis(leaf, 0, -2), loads)
    # sequence: [N, b, E] -> [N * b, E]
    return jax.tree.map(lambda leaf: leaf.reshape(-1, leaf.shape[-1]), loads)


def make_train_step(graphdef, config: TrainConfig) -> TrainStep:
    """The run's step ``(params, bias, opt_state, tokens [B, S+1], step) -> (params,
    bias, opt_state, metrics)``: a jitted program (donating params, bias and optimizer state)
    and the run's numbers.

    The batch runs as ``config.grad_accum`` micro-batches (a ``lax.scan``): their gradients
    are averaged into one optimizer step and their integer loads combined by the model's
    ``balance_scope`` into one bias update, after the optimizer step. For the global scope
    the auxiliary loss takes ``f_i`` from the counts of the whole step, which a forward
    pass over the micro-batches counts first (only when there are several and a loss).

    One compiled program serves every run that differs only in numbers: the step's
    learning rate (in the optimizer state, :func:`with_learning_rate`), its bias rate
    ``u(step)`` and the global-scope aux coefficient are inputs, each schedule's value
    computed by a small jitted program of its own; seed, data, length, schedules, weight
    decay and evaluation or checkpoint cadence do not enter it. So the seeds of a
    strategy, runs of any length, and the loss-free, no-balancing and aux-loss runs of
    one model (global scope, one micro-batch) compile once per process. A rate of 0 adds
    ``0 * delta`` to the bias and a coefficient of 0 adds ``0 * balance`` to the loss: both
    exact, so the numbers are those of a program without the term.

    Metrics: ``loss`` [], ``aux_loss``/``balance_loss`` ``[L]`` (the latter 0 when no aux
    loss is on), ``load [L, E]`` int32 (the whole step), ``maxvio [L]``, ``lr``,
    ``bias_rate`` (float32, as applied) and the new ``bias [L, E]``.
    """
    model_cfg = config.model
    global_scope = model_cfg.balance_scope == "global"
    coef = model_cfg.balance_loss_coef if global_scope else 0.0  # other scopes: in the layer
    shape = _StepShape(
        grad_accum=config.grad_accum,
        bias_rule=config.bias_rule,
        grad_clip=config.grad_clip,
        balance_scope=model_cfg.balance_scope,
        top_k=model_cfg.top_k,
        # The counting pass over the micro-batches is part of the program's structure.
        counts_pass=global_scope and coef > 0 and config.grad_accum > 1,
    )
    program, interference = _programs(graphdef, shape)
    logs_interference = config.interference_every > 0 and model_cfg.balance_loss_coef > 0
    return TrainStep(
        program=program,
        rates=_rates(
            config.learning_rate,
            config.warmup_steps,
            config.final_lr_fraction,
            config.bias_rate,
            config.bias_rate_schedule,
            config.steps,
        ),
        aux_coef=np.float32(coef),
        interference=interference if logs_interference else None,
    )


class TrainStep(NamedTuple):
    """A run's train step: the compiled ``program`` (shared by every run that differs only
    in numbers), the run's ``rates`` (``step -> {"learning_rate", "bias_rate"}``, the optax
    schedules' float32 values) and ``aux_coef``, and the ``interference`` program (None
    when the run measures none). Call it as the step itself."""

    program: Callable
    rates: Callable
    aux_coef: np.float32
    interference: Callable | None = None

    def __call__(self, params, bias, opt_state, tokens, step):
        # numpy float32 scalars: host values, placed by the program like the state.
        rates = {name: np.asarray(v) for name, v in self.rates(step).items()}
        opt_state = with_learning_rate(opt_state, rates["learning_rate"])
        inputs = {"bias_rate": rates["bias_rate"], "aux_coef": self.aux_coef}
        return self.program(inputs, params, bias, opt_state, tokens, step)

    def measure_interference(self, params, bias, tokens) -> dict:
        """``{"aux_lm_cosine": [L], "aux_lm_norm_ratio": [L]}`` of the step that ``tokens``
        would take from ``params`` (see :func:`make_train_step`); call it before the step,
        which donates ``params``."""
        return self.interference({"aux_coef": self.aux_coef}, params, bias, tokens)


@functools.lru_cache(maxsize=32)
def _rates(learning_rate, warmup_steps, final_lr_fraction, bias_rate, bias_schedule, steps):
    """``step -> {"learning_rate", "bias_rate"}`` (float32): the AdamW schedule's value and
    ``u(step)``, jitted (eager float32 ops round some values differently)."""
    lr = _lr_schedule(learning_rate, warmup_steps, final_lr_fraction, steps)
    u = rate_schedule(bias_schedule, bias_rate, steps)
    return jax.jit(lambda step: {"learning_rate": lr(step), "bias_rate": u(step)})


def _lr_schedule(learning_rate, warmup_steps, final_lr_fraction, steps) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=steps,
        end_value=learning_rate * final_lr_fraction,
    )


class _StepShape(NamedTuple):
    """What the compiled step depends on besides the model's graphdef."""

    grad_accum: int
    bias_rule: BiasRule
    grad_clip: float
    balance_scope: str
    top_k: int
    counts_pass: bool


def _is_router_weight(path, variable) -> bool:
    """A router weight: a parameter with the MoE layer's router axes
    (``PARAM_AXES["router_w_de"]``, its logical-sharding metadata)."""
    del path
    return variable.get_metadata().get("out_sharding") == PARAM_AXES["router_w_de"]


@functools.lru_cache(maxsize=8)
def _programs(graphdef, shape: _StepShape) -> tuple[Callable, Callable]:
    """The jitted train step and interference programs (each compiles on its first call)."""
    tx = optimizer(shape.grad_clip)  # its numbers come from the state (inject_hyperparams)
    scope, top_k, micro_batches = shape.balance_scope, shape.top_k, shape.grad_accum
    # Global scope: the step adds the aux loss (coef * balance, coef an input), from the
    # whole step's counts; with several micro-batches only when a counting pass runs.
    global_aux = scope == "global" and (micro_batches == 1 or shape.counts_pass)

    def forward(params, bias, tokens):
        model = nnx.merge(graphdef, params, bias)
        # Each layer's load, recorded where the layer sits in the model (its ExpertLoad).
        return nnx.capture(model, ExpertLoad)(tokens[:, :-1])

    def loss_fn(params, bias, tokens, counts_le, step_tokens, coef):
        out, loads = forward(params, bias, tokens)
        ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, tokens[:, 1:]).mean()
        balance = out.aux.balance_loss + out.aux.seq_balance_loss  # the layers' own scopes
        aux_loss = out.aux.aux_loss  # [L]
        if global_aux:  # f_i from the whole step's counts, P_i from this micro-batch
            counts = out.aux.expert_load if counts_le is None else counts_le
            global_balance = balance_loss(counts, out.aux.router_prob, step_tokens, top_k)
            aux_loss = aux_loss + coef * global_balance
            balance = jnp.where(coef > 0, global_balance, balance)
        return ce + jnp.sum(aux_loss), (ce, aux_loss, balance, loads)

    def micro_batches_of(params, bias, tokens):
        """The step's micro-batches, its token count and (with a counting pass) the counts."""
        tokens = tokens.astype(jnp.int32)
        micro = tokens.reshape(micro_batches, -1, tokens.shape[-1])
        step_tokens = tokens.shape[0] * (tokens.shape[1] - 1)
        counts_le = None
        if shape.counts_pass:
            counts_le = jnp.sum(
                jax.lax.map(lambda mb: forward(params, bias, mb)[0].aux.expert_load, micro), 0
            )
        return micro, step_tokens, counts_le

    def step_fn(inputs, params, bias, opt_state, tokens, step):
        coef, rate = inputs["aux_coef"], inputs["bias_rate"]
        micro, step_tokens, counts_le = micro_batches_of(params, bias, tokens)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def accumulate(grads, mb):
            (_, out), g = grad_fn(params, bias, mb, counts_le, step_tokens, coef)
            return jax.tree.map(jnp.add, grads, g), out

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, (ce, aux_loss, balance, loads) = jax.lax.scan(accumulate, zeros, micro)
        grads = jax.tree.map(lambda g: g / micro_batches, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        bias = routing_bias_update(
            bias, _scoped_loads(loads, scope), rate=rate, rule=shape.bias_rule, step=step
        )
        load = per_layer(jax.tree.map(lambda leaf: jnp.sum(leaf, axis=0), loads))
        metrics = {
            "loss": jnp.mean(ce),
            "lr": opt_state[1].hyperparams["learning_rate"],
            "bias_rate": rate,
            "aux_loss": jnp.mean(aux_loss, axis=0),
            "balance_loss": jnp.mean(balance, axis=0),
            "load": load,
            "maxvio": max_violation(load),
            "bias": per_layer(bias),
        }
        return params, bias, opt_state, replicated(metrics)

    def interference_fn(inputs, params, bias, tokens):
        """Per layer, the cosine and the norm ratio ``|g_aux| / |g_lm|`` of the gradients of
        the aux loss and of the cross-entropy on the router weights (one forward, one
        backward for the two losses together, per micro-batch)."""
        coef = inputs["aux_coef"]
        micro, step_tokens, counts_le = micro_batches_of(params, bias, tokens)
        router, rest = nnx.split_state(params, _is_router_weight, ...)
        leaves, treedef = jax.tree.flatten(router)  # one [d, E] per layer, in layer order

        def parts(leaves, mb):  # [2]: cross-entropy, summed aux loss
            merged = nnx.merge_state(jax.tree.unflatten(treedef, leaves), rest)
            _, (ce, aux_loss, _, _) = loss_fn(merged, bias, mb, counts_le, step_tokens, coef)
            return jnp.stack([ce, jnp.sum(aux_loss)])

        def accumulate(total, mb):  # sums over micro-batches: the step's gradient directions
            return jax.tree.map(jnp.add, total, jax.jacrev(parts)(leaves, mb)), None

        zeros = [jnp.zeros((2, *leaf.shape), leaf.dtype) for leaf in leaves]
        jac, _ = jax.lax.scan(accumulate, zeros, micro)
        g = jnp.stack([j.reshape(2, -1) for j in jac])  # [L, 2, d * E]
        lm, aux = g[:, 0], g[:, 1]
        lm_norm, aux_norm = jnp.linalg.norm(lm, axis=-1), jnp.linalg.norm(aux, axis=-1)
        both = (lm_norm > 0) & (aux_norm > 0)
        cosine = jnp.sum(lm * aux, axis=-1) / jnp.where(both, lm_norm * aux_norm, 1.0)
        ratio = aux_norm / jnp.where(lm_norm > 0, lm_norm, 1.0)
        return replicated(
            {"aux_lm_cosine": jnp.where(both, cosine, 0.0), "aux_lm_norm_ratio": ratio}
        )

    return jax.jit(step_fn, donate_argnums=(1, 2, 3)), jax.jit(interference_fn)


def _to_json(metrics: dict, step: int) -> dict:
    out = {"step": step}
    for name, value in metrics.items():
        value = np.asarray(value)
        out[name] = value.item() if value.ndim == 0 else value.tolist()
    return out


def train(
    config: TrainConfig,
    out_dir: str | pathlib.Path,
    *,
    resume: bool = True,
    progress: bool = True,
    corpus: Corpus | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    desc: str = "train",
    allow_data_change: bool = False,
) -> TrainResult:
    """Trains (or resumes) one run into ``out_dir``.

    Args:
      config: the run.
      out_dir: its folder, locked while the run writes it (one writer per folder). When it
        holds a checkpoint and ``resume`` is True, training continues from the newest one
        that passes its sha256 check, restores whole and finite, and reproduces the loss
        saved with it on its next batch (the saved config must equal ``config``, except for
        the mesh, and the corpus the saved ``data.json``); see
        :mod:`~sigmoid_moe.harness.checkpoint` and :mod:`~sigmoid_moe.harness.run_files`.
      resume: False starts over, deleting the old checkpoints and metrics.
      progress: show a tqdm bar with loss and mean MaxVio_batch.
      corpus: a prebuilt corpus for ``config.data`` (saves re-reading files).
      on_step: called as ``on_step(step, metrics_dict)`` after each step (tests use it
        to interrupt a run).
      desc: progress-bar label.
      allow_data_change: resume even if the corpus differs from the saved ``data.json``
        (a warning instead of :class:`~sigmoid_moe.errors.DataChangedError`).

    Raises:
      RunFolderBusyError: another process is writing ``out_dir``.
      RunFileError: resuming a folder whose files are corrupt or belong to another run.
      NonFiniteError: a step's loss, bias, validation loss or another metric is NaN or
        infinite; that step is neither logged nor saved.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}.")
    mesh = run_mesh(config.mesh)
    lock = run_folder_lock(out_dir) if is_writer() else contextlib.nullcontext()
    with mesh_context(mesh), lock:
        return _train(
            config,
            out_dir,
            mesh,
            resume,
            progress and is_writer(),
            corpus,
            on_step,
            desc,
            allow_data_change,
        )


def _train(config, out_dir, mesh, resume, progress, corpus, on_step, desc, allow_data_change):
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if corpus is None:
        corpus = build_corpus(config.data, config.model.seq_len)
    config_path = out / "config.json"
    if not resume:
        if is_writer() and (out / "checkpoints").exists():
            shutil.rmtree(out / "checkpoints")
        sync_processes("old checkpoints removed")
    ckpt = Checkpointer(out / "checkpoints")
    resuming = resume and ckpt.latest_step() is not None
    if resuming:
        if not _same_run(read_json(config_path), config):
            raise RunFileError(
                f"{out} holds a checkpoint of a different config (only the mesh may change "
                "on resume); pick a new out_dir or pass resume=False (--no-resume) to start "
                "over."
            )
        data_changed = check_same_data(
            out / "data.json", corpus.summary(), allow_change=allow_data_change
        )
    if is_writer():
        write_json(config_path, config.to_dict())
        write_json(out / "data.json", corpus.summary())

    def build():
        rngs = nnx.Rngs(params=jax.random.key(config.seed))
        return TransformerLM(config.model_on_mesh(), rngs=rngs)

    # On a mesh the model is built inside jit, so each parameter is placed by its rules.
    model = build() if mesh is None else nnx.jit(build)()
    graphdef, params, bias = nnx.split(model, nnx.Param, RoutingBias)
    tx = optimizer(config.grad_clip, config.weight_decay, config.lr_schedule()(0))
    opt_state = tx.init(params)
    position = 0
    metrics_path, eval_path = out / "metrics.jsonl", out / "eval.jsonl"
    restored = None
    if resuming:
        like = {
            "params": params,
            "bias": bias,
            "opt_state": opt_state,
            "counters": {
                "step": np.zeros((), np.int64),
                "position": np.zeros((), np.int64),
                "check_loss": np.zeros((), np.float64),
            },
        }

        def sound(step: int, state: dict) -> str | None:
            """None when the restored state gives the loss saved with it on its next batch
            (not checked when the data changed, as allowed: that batch is another one)."""
            if data_changed:
                return None
            counters = state["counters"]
            model = nnx.merge(graphdef, state["params"], state["bias"])
            saved = float(counters["check_loss"])
            got = _next_batch_loss(model, corpus, int(counters["position"]), config, mesh)
            if not np.isclose(got, saved, rtol=CHECK_LOSS_RTOL, atol=0.0):
                return (
                    f"is corrupt (its loss on the batch after it is {got:.6g}, not the "
                    f"{saved:.6g} saved with it)"
                )
            return None

        # Restored into this run's shardings: a checkpoint of another mesh is resharded.
        restored = ckpt.restore_latest(like, check=sound)
    if restored is not None:
        start, state = restored
        params, bias, opt_state = state["params"], state["bias"], state["opt_state"]
        position = int(state["counters"]["position"])
        if is_writer():
            truncate_jsonl(metrics_path, start, every_step=True)
            truncate_jsonl(eval_path, start, every_step=False)
    else:
        start = 0
        if is_writer():
            metrics_path.write_text("")
            eval_path.write_text("")

    step_fn = make_train_step(graphdef, config)
    bar = _progress(config.steps, start, progress, desc)
    done = start
    try:
        with _log(metrics_path) as mfile, _log(eval_path) as efile:
            for step in range(start, config.steps):
                tokens = global_batch(
                    lambda a, b, at=position: train_batch(corpus, at + a, b - a, config.seed),
                    (config.batch_size, config.model.seq_len + 1),
                    mesh,
                )
                interference = None
                if step_fn.interference is not None and step % config.interference_every == 0:
                    interference = step_fn.measure_interference(params, bias, tokens)
                params, bias, opt_state, metrics = step_fn(
                    params, bias, opt_state, tokens, jnp.asarray(step, jnp.int32)
                )
                position += config.batch_size
                done = step + 1
                if interference is not None:  # steps 1, 1 + every, ...: before their update
                    metrics = {**metrics, **interference}
                record = _to_json(fetch(metrics), done)
                require_finite(done, record)
                evaluation = None
                if done % config.eval_every == 0 or done == config.steps:
                    model = nnx.merge(graphdef, params, bias)
                    evaluation = {"step": done, **validation_losses(model, corpus, mesh)}
                    require_finite(done, evaluation)  # before either log gets this step
                mfile.write(json.dumps(record) + "\n")
                if evaluation is not None:
                    efile.write(json.dumps(evaluation) + "\n")
                    efile.flush()
                if done % config.checkpoint_every == 0 or done == config.steps:
                    mfile.flush()
                    model = nnx.merge(graphdef, params, bias)
                    check_loss = _next_batch_loss(model, corpus, position, config, mesh)
                    state = {
                        "params": params,
                        "bias": bias,
                        "opt_state": opt_state,
                        "counters": {
                            "step": np.asarray(done, np.int64),
                            "position": np.asarray(position, np.int64),
                            "check_loss": np.asarray(check_loss, np.float64),
                        },
                    }
                    ckpt.save(done, state)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{record['loss']:.3f}", maxvio=f"{np.mean(record['maxvio']):.3f}"
                    )
                if on_step is not None:
                    on_step(done, record)
    finally:
        if bar is not None:
            bar.close()
        ckpt.close()
    return TrainResult(nnx.merge(graphdef, params, bias), corpus, out, done, mesh)


@contextlib.contextmanager
def _log(path: pathlib.Path):
    """The run's append-only log file on process 0; elsewhere a sink (one writer)."""
    if is_writer():
        with path.open("a") as file:
            yield file
    else:
        yield io.StringIO()


def _same_run(saved: object, config: TrainConfig) -> bool:
    """Whether ``saved`` (a ``config.json``) is ``config`` on any mesh."""
    try:
        return dataclasses.replace(TrainConfig.from_dict(saved), mesh=config.mesh) == config
    except (TypeError, ValueError, KeyError, AttributeError):  # another version's or run's
        return False


# A restored checkpoint must reproduce the loss saved with it to this relative tolerance:
# exact on the same mesh, float reduction order on another (~1e-7; corruption moves it far).
CHECK_LOSS_RTOL = 1e-5


def _next_batch_loss(model, corpus: Corpus, position: int, config: TrainConfig, mesh) -> float:
    """``model``'s loss on the training batch at data ``position`` (the next step's), as
    evaluation computes it: saved with every checkpoint and reproduced on restore, so a
    state that differs from the one saved never trains."""
    windows = train_batch(corpus, position, config.batch_size, config.seed)
    return validation_loss(model, windows, mesh)


def _progress(total: int, initial: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False)
