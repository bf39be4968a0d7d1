"""A stage's training step: the contract the loop builds it by, and the shared loss-only step.

The contract (StepFactory) is optax-like: `init(loaded, optimizer, rng) -> state` makes the train
state from the models the stage starts from, and `compile(ctx, state, batch)` returns
`step(state, batch) -> (state, metrics)`, compiled for the shardings in ctx. LossStep serves every
stage that is a loss: it supplies `loss_fn(model, batch, rng) -> (loss_sum, weight, metric_sums)`,
a sum over the tokens (or pairs, or sequences) of its batch and how many there were; `rng` is the
training step's key for the model's dropout (LORA_DROPOUT: the loss passes it to the model's
forward), None in evaluation. The step divides by the total weight of the whole global batch, so
gradient accumulation over microbatches gives the same update as one big batch. The metric sums
are divided by that weight too, unless they include a sum of their own weight under
losses.METRIC_WEIGHT (a ranking loss averages rankings, its accuracy counts their pairs).
"""

import abc
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lmtrain import parallel
from lmtrain.losses import METRIC_WEIGHT
from lmtrain.model import lora, transformer
from lmtrain.model.transformer import merge
from lmtrain.train import optim, roles, start
from lmtrain.train.state import TrainState

LossFn = Callable  # (model, batch, rng) -> (loss_sum, weight, dict of metric sums)


def _frozen_models(graphdef, extras, params, base_reference=None) -> dict:
  """The frozen models a loss takes besides the trained one: DPO's reference, a frozen copy in
  the extras, or with `base_reference` (the graphdef of the model without adapters) the trained
  params' own base: LoRA's reference is the model with its adapters off."""
  if roles.REFERENCE in extras:
    return {roles.REFERENCE: merge(graphdef, jax.lax.stop_gradient(extras[roles.REFERENCE]))}
  if base_reference is not None:
    base = jax.lax.stop_gradient(lora.without_adapters(params))
    return {roles.REFERENCE: merge(base_reference, base)}
  return {}


def frozen_base(params, mask):
  """True for every leaf of a model with adapters that `mask` (the trained ones) leaves frozen;
  `params` one model's, or {role: model} (PPO's policy and value)."""
  if roles.POLICY in params:
    return {role: frozen_base(params[role], mask[role]) for role in params}
  adapters = lora.has_adapters(params)
  return jax.tree.map(lambda trained: adapters and not trained, mask)


def split_microbatches(batch, n: int):
  """[B, ...] -> [n, B/n, ...], microbatch j taking rows j, j+n, ... so each stays spread over the
  devices that hold the batch."""
  def split(x):
    return x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def scan_sum(fn, xs):
  """sum_i fn(xs[i]) over the leading axis of every leaf of xs, in a scan: one element's
  intermediates (e.g. a microbatch's activations) live at a time."""
  first = jax.tree.map(lambda x: x[0], xs)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, first))
  return jax.lax.scan(lambda acc, x: (jax.tree.map(jnp.add, acc, fn(x)), None), zeros, xs)[0]


def make_train_step(graphdef, loss_fn: LossFn, optimizer, schedule, num_microbatches: int = 1,
                    trainable=None, base_reference=None, trainable_layers=None):
  """step(state, batch) -> (state, metrics). Metrics are means over the batch's weight (or their
  own, METRIC_WEIGHT).
  `trainable`: params -> mask (optim.trainable_fn); the frozen ones get no gradient.
  `trainable_layers` (TRAINABLE_LAYERS): the stacked leaves' gradient is zero but in their last N
  layers (optim.restrict_layers), so the clip and grad_norm see the trained part only.
  `base_reference`: the loss's reference is the params without adapters (_frozen_models)."""

  def summed_loss(params, batch, rng, extras):
    if trainable is not None:
      params = optim.freeze(params, trainable(params))
    loss_sum, weight, sums = loss_fn(merge(graphdef, params), batch, rng,
                                     **_frozen_models(graphdef, extras, params, base_reference))
    return loss_sum, (weight, sums)

  grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

  def step(state: TrainState, batch):
    rng, step_rng = jax.random.split(state.rng)
    if num_microbatches == 1:
      (loss_sum, (weight, sums)), grads = grad_fn(state.params, batch, step_rng, state.extras)
    else:
      micro = split_microbatches(batch, num_microbatches)
      rngs = jax.random.split(step_rng, num_microbatches)
      (loss_sum, (weight, sums)), grads = scan_sum(
          lambda xs: grad_fn(state.params, *xs, state.extras), (micro, rngs))
    denom = jnp.maximum(weight, 1e-9)
    sums = dict(sums)
    metric_denom = jnp.maximum(sums.pop(METRIC_WEIGHT, weight), 1e-9)
    grads = optim.restrict_layers(jax.tree.map(lambda g: g / denom, grads), trainable_layers)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss_sum / denom,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state.step),
        "weight": weight,
        **{k: v / metric_denom for k, v in sums.items()},
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new_state, metrics

  return step


def make_eval_step(graphdef, loss_fn: LossFn, base_reference=None):
  """eval_step(params, batch) -> sums (loss_sum, weight, metric sums), to be added over batches."""

  def eval_step(params, extras, batch):
    loss_sum, weight, sums = loss_fn(merge(graphdef, params), batch, None,
                                     **_frozen_models(graphdef, extras, params, base_reference))
    return {"loss_sum": loss_sum, "weight": weight, **sums}

  return eval_step


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What the loop gives a step factory to compile with."""
  mesh: Any
  rules: Any
  shardings: TrainState  # of NamedShardings
  optimizer: Any
  schedule: Any
  microbatches: int = 1


class StepFactory(abc.ABC):
  """How a stage's state is made and stepped.

  model_config: the trained model's config (written to model.json; `lmtrain sample` reads it).
  updates_per_step: optimizer updates per loop step (the LR schedule counts those).
  rows_per_example: sequences of SEQ_LEN the model reads per example of the batch (the start-up
    block's tokens per step).
  models() -> (abstract tree, logical names) of what the stage starts from: what its parent's
    checkpoint fills (Stage.init_from_parent) or, with no parent, init_fresh makes.
  init_fresh(rng) -> that tree, traced, for a stage that starts from scratch.
  check_batch(batch_size, microbatches, mesh): one-line UserError for a batch the step cannot
    split (the loop calls it before anything is loaded; start.check_batch by default).
  optimizer(schedule, make_schedule) -> the optax transform of the trained params (the gin-set
    optim.make_optimizer; a stage that trains several models may give each its own, with
    make_schedule(learning_rate=...) the same schedule at another peak).
  init(loaded, optimizer, rng) -> TrainState, traced: e.g. the trained params and a frozen copy.
  state_names(names) -> (logical names of the params, of the extras or None) for the shardings.
  work(batch_size, seq_len) -> (tokens per step, training FLOPs per token) for tokens/s and MFU.
  memory(mesh, batch_size, seq_len, microbatches) -> ({part: bytes per device} the train state
    does not show (e.g. a rollout's KV cache), (sequences, length) of one device's forward +
    backward) for the memory plan.
  compile(ctx, state, batch) -> step(state, batch) -> (state, metrics with loss, learning_rate,
    grad_norm), compiled for ctx's shardings and the batch's.
  """
  updates_per_step = 1
  rows_per_example = 1

  def __init__(self, model_config: transformer.ModelConfig):
    self.model_config = model_config

  def models(self):
    _, abstract, names = transformer.abstract_model(self.model_config)
    return abstract, names

  def init_fresh(self, rng):
    return transformer.init_fn(self.model_config)(rng)

  def check_batch(self, batch_size: int, microbatches: int, mesh):
    start.check_batch(batch_size, microbatches, mesh)

  def optimizer(self, schedule, make_schedule):
    del make_schedule
    return optim.make_optimizer(schedule, trainable=self.trainable(),
                                trainable_layers=self.trainable_layers())

  def trainable(self):
    """params -> the mask of the trained ones (optim.trainable_fn: TRAINABLE, and with LoRA the
    adapters), or None when all train."""
    return optim.trainable_fn(lora=self.model_config.lora_rank > 0)

  def checkpoint_omits(self, state):
    """{"params": mask, "extras": mask} over `state` (abstract): True for what a checkpoint leaves
    out, or None when it holds everything. A stage with LoRA adapters saves what it trains: the
    frozen base weights of its models and the frozen copies of its parents in the extras (a
    reference, a reward model) are its parents' (lineage.json names each checkpoint and step),
    loaded from there again on a resume."""
    trainable = self.trainable()
    if trainable is None:
      return None
    params = frozen_base(state.params, trainable(state.params))
    if not any(jax.tree.leaves(params)):
      return None
    extras = {key: jax.tree.map(lambda _, k=key: k in roles.FROZEN_COPIES, tree)
              for key, tree in state.extras.items()}
    return {"params": params, "extras": extras}

  def store_frozen_base(self, state, names):
    """`state` (made by init) with the frozen base matrices of its models with adapters in
    LORA_BASE_DTYPE: 'auto' is the compute dtype, in which the layers use them anyway, so the
    outputs are those of float32 storage with half the bytes on TPU/GPU. `names`: the params'
    logical names. The checkpoints never hold them (checkpoint_omits)."""
    omit = self.checkpoint_omits(state)
    if omit is None:
      return state
    dtype = transformer.resolve_dtype(optim.lora_base_dtype_setting(), self.model_config)
    return state.replace(params=transformer.cast_matrices(state.params, names, dtype,
                                                          only=omit["params"]))

  def trainable_layers(self) -> int | None:
    """TRAINABLE_LAYERS: the stacked leaves train in their last N layers only; None: all."""
    last = optim.trainable_layers_setting()
    optim.check_trainable_layers(last, self.model_config.num_layers)
    return last

  def init(self, loaded, optimizer, rng) -> TrainState:
    return TrainState.create(loaded, optimizer, rng)

  def eval_step(self, loss_fn: LossFn):
    """eval_step(params, extras, batch) -> sums of `loss_fn` (the Evaluator compiles it)."""
    graphdef, _, _ = transformer.abstract_model(self.model_config)
    return make_eval_step(graphdef, loss_fn)

  def state_names(self, names):
    return names, None

  def work(self, batch_size: int, seq_len: int) -> tuple[int, float]:
    return batch_size * seq_len, self.model_config.flops_per_token(seq_len)

  def memory(self, mesh, batch_size: int, seq_len: int, microbatches: int):
    return {}, (batch_size // microbatches // parallel.batch_shard_count(mesh), seq_len)

  @abc.abstractmethod
  def compile(self, ctx: StepContext, state, batch) -> Callable:
    ...


class LossStep(StepFactory):
  """The step of a stage that is its loss (pretrain, SFT, reward model, DPO). With
  frozen_reference, the loss receives the starting model as `reference=` (DPO): a frozen copy of
  the starting params kept as extras[REFERENCE] (checkpointed with the state, sharded like the
  params), or with LoRA the trained params' own base with the adapters off (no copy).
  `rows_per_example`: the sequences the model reads per example of the batch (a reward model's
  ranking of K responses: K; DPO's pair: 2), for the throughput, MFU and activation figures and
  the start-up block."""

  def __init__(self, model_config, loss_fn: LossFn, frozen_reference: bool = False,
               rows_per_example: int = 1):
    super().__init__(model_config)
    self.loss_fn = loss_fn
    self.frozen_reference = frozen_reference
    self.rows_per_example = rows_per_example
    self.base_reference = None
    self.trainable_layers()  # a bad TRAINABLE_LAYERS fails before anything is loaded
    if frozen_reference and model_config.lora_rank:
      self.base_reference, _, _ = transformer.abstract_model(lora.base_config(model_config))

  def work(self, batch_size: int, seq_len: int) -> tuple[int, float]:
    tokens, flops = super().work(batch_size * self.rows_per_example, seq_len)
    # The reference's forward pass: a third of a trained pass (forward + backward = 3 forwards).
    return tokens, flops * (4 / 3 if self.frozen_reference else 1)

  def memory(self, mesh, batch_size: int, seq_len: int, microbatches: int):
    return super().memory(mesh, batch_size * self.rows_per_example, seq_len, microbatches)

  def _copies_reference(self) -> bool:
    return self.frozen_reference and self.base_reference is None

  def init(self, loaded, optimizer, rng) -> TrainState:
    extras = ({roles.REFERENCE: jax.tree.map(jnp.copy, loaded)} if self._copies_reference()
              else {})
    return TrainState.create(loaded, optimizer, rng, extras)

  def state_names(self, names):
    return names, ({roles.REFERENCE: names} if self._copies_reference() else None)

  def eval_step(self, loss_fn: LossFn):
    graphdef, _, _ = transformer.abstract_model(self.model_config)
    return make_eval_step(graphdef, loss_fn, self.base_reference)

  def compile(self, ctx: StepContext, state, batch):
    graphdef, _, _ = transformer.abstract_model(self.model_config)
    step = make_train_step(graphdef, self.loss_fn, ctx.optimizer, ctx.schedule, ctx.microbatches,
                           trainable=self.trainable(), base_reference=self.base_reference,
                           trainable_layers=self.trainable_layers())
    # Every batch leaf is split over its leading (batch) axis, whatever its rank.
    batch_sharding = jax.tree.map(lambda x: x.sharding, batch)
    return jax.jit(step, in_shardings=(ctx.shardings, batch_sharding),
                   out_shardings=(ctx.shardings, parallel.replicated(ctx.mesh)),
                   donate_argnums=0).lower(state, batch).compile()
