"""The learner: one RL iteration's optimisation of a rollout batch, for any registered algorithm.

The rows are shuffled once, a prompt's samples (GRPO's group, consecutive rows) kept together so
that every pass computes their common prompt once (Transformer.hidden_shared, as far as the mesh
allows: rollout.prompt_sharing); the old log-probs (and values) are computed minibatch by
minibatch in that order, by the same function as the first epoch's losses, so the first
minibatch's ratio is exactly 1 and policy == reference gives a KL of exactly 0. Then the
algorithm's advantages, and EPOCHS x NUM_MINIBATCHES optimizer updates of the clipped policy loss
(- entropy bonus) plus the algorithm's own terms (+ PTX_COEF x LM loss on PTX_DATA rows).

One update per rollout (EPOCHS x NUM_MINIBATCHES = 1) without a value model (GRPO and its
relatives, whose advantages need no log-probs) skips the policy's pass before the update
(`on_policy`): the old policy is the one being differentiated, so its log-probs are the loss's
own under stop_gradient (ratio exactly 1, as TRL's GRPOTrainer does with num_iterations=1), and
the rollout's KL and entropy metrics come from that same pass. The update is the same.

The reference is a frozen copy in the extras, or for a LoRA policy its own base with the adapters
off (reference_model): no second copy of the weights. With `trainable` (TRAINABLE, LoRA) the
frozen parameters are behind stop_gradient, so their weight gradients are never computed.
"""

import jax
import jax.numpy as jnp
import optax

from lmtrain import parallel
from lmtrain.errors import UserError
from lmtrain.losses import lm_loss
from lmtrain.model import lora, transformer
from lmtrain.rl import core
from lmtrain.rl.config import Algorithm, Graphdefs, RLConfig
from lmtrain.rl.grpo import GRPO
from lmtrain.rl.ppo import PPO
from lmtrain.rl.rollout import prompt_sharing, response_logprobs, response_values
from lmtrain.train import optim, roles
from lmtrain.train.step import scan_sum, split_microbatches

ALGORITHMS = {a.name: a for a in (PPO(), GRPO())}

PTX_PREFIX = "ptx_"  # batch keys of the language-model rows that PPO-ptx mixes in
ROW_KEYS = ("prompt", "prompt_length", "response", "mask", "done")


def get_algorithm(name: str) -> Algorithm:
  if name not in ALGORITHMS:
    raise UserError(f"algorithm={name!r}: choose {' or '.join(ALGORITHMS)}")
  return ALGORITHMS[name]


def validate(cfg: RLConfig) -> RLConfig:
  """`cfg`, checked by itself and by its algorithm."""
  algorithm = get_algorithm(cfg.algorithm)
  cfg.validate()
  algorithm.validate(cfg)
  return cfg


def reference_model(policy_graphdef, params, extras):
  """The frozen reference: the copy in the extras, or without one (a LoRA policy) the policy's
  base, its params without the adapters in the base model's graphdef."""
  if roles.REFERENCE in extras:
    return transformer.merge(policy_graphdef, extras[roles.REFERENCE])
  policy = params[roles.POLICY]
  cfg = transformer.merge(policy_graphdef, policy).cfg
  graphdef, _, _ = transformer.abstract_model(lora.base_config(cfg))
  return transformer.merge(graphdef, jax.lax.stop_gradient(lora.without_adapters(policy)))


def on_policy(cfg: RLConfig, algorithm: Algorithm) -> bool:
  """Whether the learner takes the old log-probs from the update's own pass (module docstring)."""
  return cfg.epochs * cfg.num_minibatches == 1 and not algorithm.uses_value


def evaluate_roles(policy_graphdef, value_graphdef, cfg: RLConfig, params, extras, mb,
                   with_policy: bool = True, share: int = 1):
  """The policy's and reference's log-probs, the policy's entropy and (with a value model) its
  values on a minibatch of rollouts, before any update: the "old" quantities of the losses.
  with_policy=False: the reference's (and values) only (on_policy). `share`: each `share`
  consecutive rows hold one prompt, computed once (rollout.prompt_sharing)."""
  args = (mb["prompt"], mb["prompt_length"], mb["response"], mb["mask"])
  reference = reference_model(policy_graphdef, params, extras)
  ref_logp, _ = response_logprobs(reference, *args, cfg.temperature, share=share)
  out = {"ref_logp": ref_logp}
  if with_policy:
    policy = transformer.merge(policy_graphdef, params[roles.POLICY])
    logp, ent = response_logprobs(policy, *args, cfg.temperature, with_entropy=True,
                                  share=share)
    out.update(logp=logp, entropy=core.masked_mean(ent, mb["mask"], axis=1))
  if value_graphdef is not None:
    out["values"] = response_values(transformer.merge(value_graphdef, params[roles.VALUE]), *args)
  return out


def minibatch_loss(graphdefs: Graphdefs, cfg: RLConfig, params, mb, kl_coef, ptx=None,
                   share: int = 1):
  """The objective on (a microbatch of) one minibatch -> (loss, metrics).

  Every term is a weighted sum over tokens whose weights (mb's agg_weight and token_weight,
  ptx's ptx_weight) were computed on the whole minibatch, so the losses, gradients and metrics
  of its microbatches add up to the minibatch's. `share`: as evaluate_roles's."""
  algorithm = get_algorithm(cfg.algorithm)
  mask = mb["mask"]
  fresh = "logp" not in mb  # on_policy: the old log-probs are this pass's
  policy = transformer.merge(graphdefs.policy, params[roles.POLICY])
  logp, ent = response_logprobs(policy, mb["prompt"], mb["prompt_length"], mb["response"],
                                mask, cfg.temperature,
                                with_entropy=bool(cfg.entropy_coef) or fresh, share=share)
  old_logp = jax.lax.stop_gradient(logp) if fresh else mb["logp"]
  loss, metrics = core.ppo_policy_loss(logp, old_logp, mb["advantages"], mask, cfg.clip_eps,
                                       mb["agg_weight"])
  metrics["policy_loss"] = loss
  if fresh:  # the rollout's statistics, as evaluate_roles and the advantages give them otherwise
    kl = core.clip_kl(core.kl_penalty(old_logp, mb["ref_logp"], mask, cfg.kl_estimator),
                      cfg.kl_clip)
    row = mb["row_weight"]
    metrics["rollout_kl"] = jnp.sum(core.masked_sum(kl, mask, axis=1) * row)
    metrics["rollout_entropy"] = jnp.sum(
        core.masked_mean(jax.lax.stop_gradient(ent), mask, axis=1) * row)
  if cfg.entropy_coef:
    loss = loss - cfg.entropy_coef * core.weighted_sum(ent, mb["token_weight"])
  term, term_metrics = algorithm.loss(cfg, params, graphdefs, mb, logp, kl_coef)
  loss = loss + term
  metrics.update(term_metrics)
  if ptx is not None:
    ptx_loss, _, _ = lm_loss(policy, {**ptx, "loss_mask": ptx["ptx_weight"]}, None)
    loss = loss + cfg.ptx_coef * ptx_loss
    metrics["ptx_loss"] = ptx_loss
  return loss, metrics


def _weights(cfg: RLConfig, mb, ptx):
  """The minibatch's token weights (minibatch_loss), from the whole minibatch."""
  rows = mb["mask"].shape[0]
  mb = {**mb, "agg_weight": core.aggregation_weights(mb["mask"], cfg.loss_aggregation),
        "token_weight": core.aggregation_weights(mb["mask"], "token"),
        "row_weight": jnp.full((rows,), 1.0 / rows, jnp.float32)}
  if ptx is not None:
    ptx_mask = ptx["loss_mask"].astype(jnp.float32)
    ptx = {**ptx, "ptx_weight": ptx_mask / jnp.maximum(jnp.sum(ptx_mask), 1e-9)}
  return mb, ptx


def accumulated(grad_fn, microbatches: int):
  """grad_fn(params, mb, kl_coef, ptx) -> ((loss, metrics), grads), summed over `microbatches`
  microbatches of mb (and of ptx) split as the loss stages' are (step.split_microbatches)."""
  if microbatches == 1:
    return grad_fn

  def run(params, mb, kl_coef, ptx):
    parts = (split_microbatches(mb, microbatches),
             split_microbatches(ptx, microbatches) if ptx is not None else None)
    return scan_sum(lambda part: grad_fn(params, part[0], kl_coef, part[1]), parts)

  return run


def _rows(tree, index):
  """Rows `index` of every [B, ...] array, kept split over the batch axes."""
  return jax.tree.map(lambda x: parallel.constrain(
      jnp.take(x, index, axis=0), ("batch",) + (None,) * (x.ndim - 1)), tree)


def group_permutation(rng, rows: int, group: int):
  """A random order of `rows` rows that keeps each `group` consecutive rows (the samples of one
  prompt) together and in order, the groups shuffled; group 1 is jax.random.permutation's."""
  order = jax.random.permutation(rng, rows // group)
  return (order[:, None] * group + jnp.arange(group)).reshape(-1)


def shared_rows(rows: int, group: int, microbatches: int = 1) -> int:
  """rollout.prompt_sharing for a minibatch of `rows` taken from whole groups of `group`
  consecutive rows, split into `microbatches` (split_microbatches: microbatch j takes rows
  j, j + n, ..., so a group of G leaves G / n consecutive rows in each when n divides it)."""
  if group % microbatches:
    return 1
  return prompt_sharing(rows // microbatches, group // microbatches)


def _split(tree, m):
  """[B, ...] -> [m, B/m, ...]: minibatch j is rows j*B/m .. (j+1)*B/m - 1."""
  return jax.tree.map(lambda x: x.reshape((m, x.shape[0] // m) + x.shape[1:]), tree)


def check_minibatches(rows: int, cfg: RLConfig, microbatches: int, shards: int):
  """One-line errors for rollouts that do not split into minibatches, microbatches and over the
  mesh's batch shards (a split the mesh does not divide would silently run less sharded)."""
  m = cfg.num_minibatches
  if rows % m:
    raise UserError(f"BATCH_SIZE={rows} does not divide into NUM_MINIBATCHES={m}")
  if (rows // m) % microbatches:
    raise UserError(f"a minibatch of {rows // m} rollouts (BATCH_SIZE={rows} / NUM_MINIBATCHES="
                    f"{m}) does not divide into MICROBATCHES={microbatches}")
  per = rows // m // microbatches
  if per % shards:
    raise UserError(f"{per} rollouts per {'microbatch' if microbatches > 1 else 'minibatch'} "
                    f"(BATCH_SIZE={rows} / NUM_MINIBATCHES={m}"
                    f"{f' / MICROBATCHES={microbatches}' if microbatches > 1 else ''}) do not "
                    f"divide over the mesh's {shards} batch shards (data x fsdp)")


def update(policy_graphdef, value_graphdef, cfg: RLConfig, optimizer, schedule, state, data,
           score, microbatches: int = 1, trainable=None, group: int = 1):
  """One iteration's optimisation of a rollout `data` whose sequence scores are `score` [B]
  (reward model or scorer, before REWARD_CLIP and the missing-EOS penalty). Epoch 0 takes its
  minibatches in the shuffled order; later epochs reshuffle. Each minibatch's gradient is
  accumulated over `microbatches` (the same update within fp32 rounding, less activation
  memory). `trainable`: params -> the mask of the trained ones (optim.roles_trainable_fn; the
  optimizer gives the others no state), or None when all train. `group`: each `group`
  consecutive rows of `data` hold the same prompt (the rollout's samples of one prompt, as
  the RL stage's prompt batches give them to GRPO): they stay together through the shuffles and
  every pass computes their prompt once (shared_rows); 1 (any rows): neither. Returns (new
  state, metrics averaged over the minibatches, per-minibatch metrics [E*M])."""
  algorithm = get_algorithm(cfg.algorithm)
  value_graphdef = value_graphdef if algorithm.uses_value else None
  graphdefs = Graphdefs(policy_graphdef, value_graphdef)
  kl_ctl = state.extras[roles.KL_CONTROLLER]
  kl_coef = kl_ctl["kl_coef"]
  rows = data["mask"].shape[0]
  m = cfg.num_minibatches
  check_minibatches(rows, cfg, microbatches, shards=1)
  batch = {k: data[k] for k in ROW_KEYS}
  if cfg.reward_clip is not None:
    score = jnp.clip(score, -cfg.reward_clip, cfg.reward_clip)
  batch["score"] = score + jnp.where(data["done"], 0.0, cfg.missing_eos_penalty)
  batch.update(algorithm.score_features(cfg, batch))
  rng = jax.random.fold_in(state.rng, 1)
  # Whole groups (a prompt's samples, consecutive) stay together: the passes below compute each
  # minibatch's shared prompts once (shared_rows). Groups that minibatches cut share nothing.
  group = group if rows % group == 0 and (rows // m) % group == 0 else 1
  permute = lambda key: group_permutation(key, rows, group)
  batch = _rows(batch, permute(jax.random.fold_in(rng, 0)))

  fresh = on_policy(cfg, algorithm)
  # The same sharing in these passes and the losses': the first minibatch's ratio stays exactly 1.
  share = shared_rows(rows // m, group, microbatches)
  old = jax.lax.map(
      lambda mb: evaluate_roles(policy_graphdef, value_graphdef, cfg, state.params,
                                state.extras, mb, with_policy=not fresh, share=share),
      _split(batch, m))
  batch.update(jax.tree.map(lambda x: x.reshape((rows,) + x.shape[2:]), old))
  mask = batch["mask"]
  adv, returns, kl = algorithm.advantages(cfg, batch, kl_coef)
  batch["advantages"] = adv
  if returns is not None:
    batch["returns"] = returns

  ptx = {k[len(PTX_PREFIX):]: v for k, v in data.items() if k.startswith(PTX_PREFIX)}
  if ptx:  # minibatch j of every epoch takes the j-th share of the ptx rows
    ptx = _split(ptx, m)
  order = [jnp.arange(rows)] + [permute(jax.random.fold_in(rng, e))
                                for e in range(1, cfg.epochs)]
  order = jnp.stack(order).reshape(cfg.epochs * m, rows // m)
  trained = trainable(state.params) if trainable is not None else None

  def loss_fn(params, mb, kl_coef, ptx):
    if trained is not None:
      params = optim.freeze(params, trained)
    return minibatch_loss(graphdefs, cfg, params, mb, kl_coef, ptx, share)

  grad_fn = accumulated(jax.value_and_grad(loss_fn, has_aux=True), microbatches)
  train_keys = ("prompt", "prompt_length", "response", "mask", "logp", "ref_logp", "values",
                "advantages", "returns")  # "logp" absent when on_policy
  train_batch = {k: batch[k] for k in train_keys if k in batch}

  def one_minibatch(carry, xs):
    params, opt_state, count = carry
    i, index = xs
    mb, ptx_mb = _weights(cfg, _rows(train_batch, index),
                          jax.tree.map(lambda x: x[i % m], ptx) if ptx else None)
    (loss, metrics), grads = grad_fn(params, mb, kl_coef, ptx_mb)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics.update(loss=loss, grad_norm=optax.tree.norm(grads), learning_rate=schedule(count))
    return (params, opt_state, count + 1), metrics

  count = state.step * cfg.epochs * m
  (params, opt_state, _), per_mb = jax.lax.scan(
      one_minibatch, (state.params, state.opt_state, count),
      (jnp.arange(cfg.epochs * m), order))

  if fresh:  # one minibatch: its pass gave the rollout's KL and entropy
    mean_kl, entropy = per_mb.pop("rollout_kl")[0], per_mb.pop("rollout_entropy")[0]
  else:
    mean_kl, entropy = jnp.mean(core.masked_sum(kl, mask, axis=1)), jnp.mean(batch["entropy"])
  metrics = {k: jnp.mean(v) for k, v in per_mb.items()}
  metrics.update(
      reward_mean=jnp.mean(batch["score"]), kl=mean_kl, kl_coef=kl_coef,
      non_score_reward=-kl_coef * mean_kl,
      entropy=entropy, response_length=jnp.mean(jnp.sum(mask, axis=1)),
      eos_fraction=jnp.mean(batch["done"].astype(jnp.float32)),
      advantages_mean=core.masked_mean(adv, mask))
  if returns is not None:
    metrics["explained_variance"] = core.explained_variance(batch["values"], returns, mask)
    metrics["returns_mean"] = core.masked_mean(returns, mask)
  new_ctl = core.kl_controller_update(kl_ctl, mean_kl, rows)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            rng=jax.random.split(state.rng)[0],
                            extras={**state.extras, roles.KL_CONTROLLER: new_ctl})
  return new_state, metrics, per_mb
