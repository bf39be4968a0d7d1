"""PPO and GRPO: the SFT policy optimised against a reward with a KL penalty to the frozen SFT policy.

Roles. policy: trained, from the SFT checkpoint. reference: a frozen copy of the starting policy.
reward: the frozen reward model (REWARD = 'model'), or a rule-based scorer on the host (REWARD =
'scorer'). value (PPO only): trained, initialised from the reward model (from the SFT trunk with a
new scalar head when the reward is a scorer). The trained params are {"policy", "value"}; the frozen
models and the KL controller are TrainState extras, so one checkpoint holds the whole PPO state and a
resumed run continues exactly.

One iteration (one loop step) on a batch of prompts:
  1. rollout, jitted: sample a response to each prompt with the KV cache (truncated after its first
     EOS) and read the reward model at each response's last real token.
  2. host: decode the responses and score them with the prompts' scorer (`task_score`; the reward
     itself when REWARD = 'scorer'). A response without EOS gets MISSING_EOS_PENALTY added.
  3. update, jitted: the policy's and reference's log-probs (of logits / temperature) and the value
     model's values over the whole sequences, minibatch by minibatch; PPO: per-token rewards
     -kl_coef * kl_t plus the score at the last token, GAE, masked whitening, then PPO_EPOCHS
     epochs over NUM_MINIBATCHES shuffled minibatches of the
     clipped policy loss + vf_coef * clipped value loss (- entropy bonus, + ptx_coef * LM loss on
     PTX_DATA); the adaptive KL controller updates from the measured KL.
     GRPO: GROUP_SIZE samples per prompt, every token of a response gets its group-normalised score
     as advantage, no value model, and kl_coef * KL(k3) to the reference joins the loss instead of
     the reward.
"""

import dataclasses
import functools
import logging
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmtrain import fileio, parallel
from lmtrain.data import demo, loader, prompts as prompts_lib, scorers, sft as sft_data
from lmtrain.errors import UserError
from lmtrain.model import generate as generate_lib
from lmtrain.model import transformer
from lmtrain.stages import rl
from lmtrain.stages.common import resolve_sources, stage_tokenizer, text_corpora
from lmtrain.stages.pretrain import lm_loss, resolve_text_data
from lmtrain.stages.reward import NORMALIZATION_FILE
from lmtrain.train import checkpoint as ckpt_lib
from lmtrain.train.loop import LoopConfig, Stage


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """The RL hyper-parameters (gin: ppo.build / grpo.build arguments, see gin_configs/stages/)."""
  algorithm: str = "ppo"  # ppo | grpo
  prompt_len: int = 64
  max_new_tokens: int = 32
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  kl_coef: float = 0.05
  kl_estimator: str = "k1"  # k1 | k2 | k3 | abs (PPO's reward penalty; GRPO's loss uses k3)
  kl_target: float | None = None  # adaptive KL controller target (None: fixed kl_coef)
  kl_horizon: float = 10000.0
  gamma: float = 1.0
  lam: float = 0.95
  epochs: int = 2
  num_minibatches: int = 2
  clip_eps: float = 0.2
  value_clip_eps: float = 0.2
  vf_coef: float = 0.1
  entropy_coef: float = 0.0
  whiten_advantages: bool = True
  missing_eos_penalty: float = -1.0
  group_size: int = 1  # GRPO: samples per prompt
  ptx_coef: float = 0.0
  reward_offset: float = 0.0  # the reward model's normalisation: (score - offset) / scale
  reward_scale: float = 1.0

  @property
  def grpo(self) -> bool:
    return self.algorithm == "grpo"

  def validate(self):
    if self.algorithm not in ("ppo", "grpo"):
      raise UserError(f"algorithm={self.algorithm!r}: choose ppo or grpo")
    if self.kl_estimator not in ("k1", "k2", "k3", "abs"):
      raise UserError(f"KL_ESTIMATOR={self.kl_estimator!r}: choose k1, k2, k3 or abs")
    if self.grpo and self.group_size < 2:
      raise UserError(f"GROUP_SIZE={self.group_size}: GRPO needs at least 2 samples per prompt")
    if self.epochs < 1 or self.num_minibatches < 1:
      raise UserError(f"PPO_EPOCHS={self.epochs} and NUM_MINIBATCHES={self.num_minibatches} "
                      "must be positive")
    if self.temperature <= 0:
      raise UserError(f"TEMPERATURE={self.temperature} must be positive")
    if self.kl_target is not None and self.kl_target <= 0:
      raise UserError(f"KL_TARGET={self.kl_target} must be positive (or None: fixed KL_COEF)")
    return self


# ---------------------------------------------------------------------------------------------
# Sequences: a left-padded prompt [B, P] followed directly by its response [B, N].


def sequences(prompt, prompt_length, response, response_mask):
  """Token rows [B, P+N] with their positions and segment ids (1 on real tokens, 0 on padding).

  The prompt's real tokens take positions 0..len-1 and the response continues from len, as during
  generation, so the padding changes nothing."""
  width = prompt.shape[1]
  total = width + response.shape[1]
  index = jnp.arange(total, dtype=jnp.int32)[None, :]
  start = (width - prompt_length.astype(jnp.int32))[:, None]
  in_prompt = (index >= start) & (index < width)
  in_response = jnp.concatenate(
      [jnp.zeros_like(prompt, dtype=bool), response_mask > 0], axis=1)
  tokens = jnp.concatenate([prompt, response], axis=1).astype(jnp.int32)
  segment_ids = (in_prompt | in_response).astype(jnp.int32)
  positions = jnp.maximum(index - start, 0)
  return tokens, positions, segment_ids


def response_hidden(model, prompt, prompt_length, response, response_mask):
  """Hidden states [B, N, D] that predict each response token (and the value before it)."""
  tokens, positions, segment_ids = sequences(prompt, prompt_length, response, response_mask)
  hidden = model.hidden(tokens[:, :-1], positions[:, :-1], segment_ids[:, :-1])
  return hidden[:, prompt.shape[1] - 1:]


def response_logprobs(model, prompt, prompt_length, response, mask, temperature):
  """([B, N] log-probs of the response tokens, [B, N, V] logits)."""
  logits = model.logits(response_hidden(model, prompt, prompt_length, response, mask))
  return rl.sequence_logprobs(logits, response, mask, temperature), logits


def response_values(model, prompt, prompt_length, response, mask):
  """[B, N] value of the state before each response token; 0 on padding."""
  values = model.scores(response_hidden(model, prompt, prompt_length, response, mask))
  return jnp.where(mask > 0, values, 0.0)


def sequence_reward(model, prompt, prompt_length, response, mask, offset=0.0, scale=1.0):
  """[B] reward-model score at each sequence's last real token (its EOS), normalised."""
  tokens, positions, segment_ids = sequences(prompt, prompt_length, response, mask)
  response_mask = jnp.concatenate([jnp.zeros_like(prompt, dtype=mask.dtype), mask], axis=1)
  scores = rl.reward_scores(model, tokens, positions, segment_ids, response_mask)
  return (scores - offset) / scale


# ---------------------------------------------------------------------------------------------
# The pure rollout and update.


def rollout(policy_graphdef, reward_graphdef, cfg: PPOConfig, policy_params, reward_params,
            prompt, prompt_length, rng, *, eos_id: int, pad_id: int, greedy: bool = False):
  """Samples a response to each prompt and scores it with the reward model (when there is one).

  Returns {response [B, N], mask [B, N] float (1 up to and including EOS), done [B], rm_score [B]
  (normalised; only with a reward model)}."""
  out = generate_lib.generate.__wrapped__(
      policy_graphdef, policy_params, prompt, prompt_length, rng,
      max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
      top_p=cfg.top_p, greedy=greedy, eos_id=eos_id, pad_id=pad_id, left_padded=True)
  response = parallel.constrain(out.tokens, ("batch", None))
  mask = parallel.constrain(out.mask.astype(jnp.float32), ("batch", None))
  result = {"response": response, "mask": mask, "done": out.done}
  if reward_graphdef is not None:
    result["rm_score"] = sequence_reward(transformer.merge(reward_graphdef, reward_params),
                                         prompt, prompt_length, response, mask,
                                         cfg.reward_offset, cfg.reward_scale)
  return result


def evaluate_roles(policy_graphdef, value_graphdef, cfg: PPOConfig, params, extras, mb):
  """The policy's and reference's log-probs, the policy's entropy and the value model's values on
  a minibatch of rollouts, before any update: the "old" quantities of the PPO losses. Computed by
  the same function on the same minibatches as the first epoch's losses, so the first minibatch's
  ratio is exactly 1; and policy == reference gives a KL of exactly 0."""
  args = (mb["prompt"], mb["prompt_length"], mb["response"], mb["mask"])
  policy = transformer.merge(policy_graphdef, params["policy"])
  logp, logits = response_logprobs(policy, *args, cfg.temperature)
  reference = transformer.merge(policy_graphdef, extras["reference"])
  ref_logp, _ = response_logprobs(reference, *args, cfg.temperature)
  out = {"logp": logp, "ref_logp": ref_logp,
         "entropy": rl.masked_mean(rl.entropy(logits, mb["mask"], cfg.temperature), mb["mask"],
                                   axis=1)}
  if value_graphdef is not None:
    out["values"] = response_values(transformer.merge(value_graphdef, params["value"]), *args)
  return out


def advantages(cfg: PPOConfig, data, score, kl_coef):
  """(advantages, returns or None, per-token KL). `score` [B] is each sequence's score; GRPO
  takes the group-normalised `data["group_advantage"]` [B] instead."""
  mask = data["mask"]
  kl = rl.kl_penalty(data["logp"], data["ref_logp"], mask, cfg.kl_estimator)
  if cfg.grpo:
    return data["group_advantage"][:, None] * mask, None, kl
  rewards = rl.per_token_rewards(score, kl, mask, kl_coef)
  adv, returns = rl.gae(rewards, data["values"], mask, cfg.gamma, cfg.lam)
  if cfg.whiten_advantages:
    adv = rl.masked_whiten(adv, mask)
  return adv, returns, kl


def minibatch_loss(policy_graphdef, value_graphdef, cfg: PPOConfig, params, mb, kl_coef,
                   ptx=None):
  """The PPO/GRPO objective on one minibatch -> (loss, metrics)."""
  mask = mb["mask"]
  args = (mb["prompt"], mb["prompt_length"], mb["response"], mask)
  policy = transformer.merge(policy_graphdef, params["policy"])
  logp, logits = response_logprobs(policy, *args, cfg.temperature)
  loss, metrics = rl.ppo_policy_loss(logp, mb["logp"], mb["advantages"], mask, cfg.clip_eps)
  metrics["policy_loss"] = loss
  if cfg.entropy_coef:
    ent = rl.masked_mean(rl.entropy(logits, mask, cfg.temperature), mask)
    loss = loss - cfg.entropy_coef * ent
  if cfg.grpo:
    kl = rl.masked_mean(rl.kl_penalty(logp, mb["ref_logp"], mask, "k3"), mask)
    loss = loss + kl_coef * kl
    metrics["kl_loss"] = kl
  else:
    value = transformer.merge(value_graphdef, params["value"])
    values = response_values(value, *args)
    value_loss, value_metrics = rl.ppo_value_loss(values, mb["values"], mb["returns"], mask,
                                                  cfg.value_clip_eps)
    loss = loss + cfg.vf_coef * value_loss
    metrics.update(value_metrics, value_loss=value_loss)
  if ptx is not None:
    ptx_sum, ptx_weight, _ = lm_loss(policy, ptx, None)
    ptx_loss = ptx_sum / jnp.maximum(ptx_weight, 1e-9)
    loss = loss + cfg.ptx_coef * ptx_loss
    metrics["ptx_loss"] = ptx_loss
  return loss, metrics


PTX_PREFIX = "ptx_"
ROW_KEYS = ("prompt", "prompt_length", "response", "mask", "done")


def _rows(tree, index):
  """Rows `index` of every [B, ...] array, kept split over the batch axes."""
  return jax.tree.map(lambda x: parallel.constrain(
      jnp.take(x, index, axis=0), ("batch",) + (None,) * (x.ndim - 1)), tree)


def _split(tree, m):
  """[B, ...] -> [m, B/m, ...]: minibatch j is rows j*B/m .. (j+1)*B/m - 1."""
  return jax.tree.map(lambda x: x.reshape((m, x.shape[0] // m) + x.shape[1:]), tree)


def update(policy_graphdef, value_graphdef, cfg: PPOConfig, optimizer, schedule, state, data,
           score):
  """One PPO/GRPO iteration's optimisation of a rollout `data` whose sequence scores are
  `score` [B] (reward model or scorer, before the missing-EOS penalty).

  The rows are shuffled once; epoch 0 takes its minibatches in that order (so the old log-probs
  and values, computed minibatch by minibatch, come from exactly the same computation as the first
  minibatch's loss), later epochs reshuffle. Returns (new state, metrics averaged over the
  minibatches, per-minibatch metrics [E*M])."""
  kl_ctl = state.extras["kl_ctl"]
  kl_coef = kl_ctl["kl_coef"]
  rows = data["mask"].shape[0]
  m = cfg.num_minibatches
  if rows % m:
    raise UserError(f"BATCH_SIZE={rows} does not divide into NUM_MINIBATCHES={m}")
  batch = {k: data[k] for k in ROW_KEYS}
  batch["score"] = score + jnp.where(data["done"], 0.0, cfg.missing_eos_penalty)
  if cfg.grpo:  # groups are contiguous rows: normalise before shuffling
    batch["group_advantage"] = rl.group_advantages(batch["score"], cfg.group_size)
  rng = jax.random.fold_in(state.rng, 1)
  batch = _rows(batch, jax.random.permutation(jax.random.fold_in(rng, 0), rows))

  old = jax.lax.map(
      lambda mb: evaluate_roles(policy_graphdef, value_graphdef, cfg, state.params,
                                state.extras, mb), _split(batch, m))
  batch.update(jax.tree.map(lambda x: x.reshape((rows,) + x.shape[2:]), old))
  mask = batch["mask"]
  adv, returns, kl = advantages(cfg, batch, batch["score"], kl_coef)
  batch["advantages"] = adv
  if returns is not None:
    batch["returns"] = returns

  ptx = {k[len(PTX_PREFIX):]: v for k, v in data.items() if k.startswith(PTX_PREFIX)}
  if ptx:  # minibatch j of every epoch takes the j-th share of the ptx rows
    ptx = _split(ptx, m)
  order = [jnp.arange(rows)] + [jax.random.permutation(jax.random.fold_in(rng, e), rows)
                                for e in range(1, cfg.epochs)]
  order = jnp.stack(order).reshape(cfg.epochs * m, rows // m)
  grad_fn = jax.value_and_grad(
      functools.partial(minibatch_loss, policy_graphdef, value_graphdef, cfg), has_aux=True)
  train_keys = ("prompt", "prompt_length", "response", "mask", "logp", "ref_logp", "values",
                "advantages", "returns")
  train_batch = {k: batch[k] for k in train_keys if k in batch}

  def one_minibatch(carry, xs):
    params, opt_state, count = carry
    i, index = xs
    mb = _rows(train_batch, index)
    ptx_mb = jax.tree.map(lambda x: x[i % m], ptx) if ptx else None
    (loss, metrics), grads = grad_fn(params, mb, kl_coef, ptx_mb)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics.update(loss=loss, grad_norm=optax.tree.norm(grads), learning_rate=schedule(count))
    return (params, opt_state, count + 1), metrics

  count = state.step * cfg.epochs * m
  (params, opt_state, _), per_mb = jax.lax.scan(
      one_minibatch, (state.params, state.opt_state, count),
      (jnp.arange(cfg.epochs * m), order))

  seq_kl = rl.masked_sum(kl, mask, axis=1)
  metrics = {k: jnp.mean(v) for k, v in per_mb.items()}
  metrics.update(
      reward_mean=jnp.mean(batch["score"]), kl=jnp.mean(seq_kl), kl_coef=kl_coef,
      non_score_reward=-kl_coef * jnp.mean(seq_kl),
      entropy=jnp.mean(batch["entropy"]), response_length=jnp.mean(jnp.sum(mask, axis=1)),
      eos_fraction=jnp.mean(batch["done"].astype(jnp.float32)),
      advantages_mean=rl.masked_mean(adv, mask))
  if returns is not None:
    metrics["explained_variance"] = rl.explained_variance(batch["values"], returns, mask)
    metrics["returns_mean"] = rl.masked_mean(returns, mask)
  new_ctl = rl.kl_controller_update(kl_ctl, jnp.mean(seq_kl), rows)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            rng=jax.random.split(state.rng)[0],
                            extras={**state.extras, "kl_ctl": new_ctl})
  return new_state, metrics, per_mb


# ---------------------------------------------------------------------------------------------
# Host-side scoring.


def check_scorer(scorer_name, examples, sources):
  """Fails early, naming the data, when the prompt records lack what the scorer reads."""
  scorer = scorers.get_scorer(scorer_name)
  for i, ex in enumerate(examples):
    try:
      scorer("", ex.record)
    except UserError as e:
      raise UserError(f"{', '.join(sources)}: prompt record {i + 1}: {e}; set SCORER = None for "
                      "prompts without answers") from None


# ---------------------------------------------------------------------------------------------
# The stage.


class PPOStep:
  """`Stage.make_step` for PPO/GRPO: compiles the rollout and the update, and runs an iteration."""

  def __init__(self, ctx, cfg: PPOConfig, graphdefs, tokenizer, host_scorer, reward_from_scorer):
    self.ctx, self.cfg = ctx, cfg
    self.policy_gd, self.value_gd, self.reward_gd = graphdefs
    self.tokenizer = tokenizer
    self.host_scorer = host_scorer
    self.reward_from_scorer = reward_from_scorer

  def compile(self, state, first_batch):
    ctx, cfg = self.ctx, self.cfg
    rep = parallel.replicated(ctx.mesh)
    prompt_keys = ("prompt", "prompt_length")
    batch_shardings = {k: v.sharding for k, v in first_batch.items()}

    def do_rollout(state, batch):
      rng = jax.random.fold_in(state.rng, 0)
      out = rollout(self.policy_gd, self.reward_gd, cfg, state.params["policy"],
                    state.extras.get("reward"), batch["prompt"], batch["prompt_length"], rng,
                    eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id)
      out.update({k: batch[k] for k in prompt_keys})
      out.update({k: v for k, v in batch.items() if k.startswith(PTX_PREFIX)})
      return out

    def do_update(state, data, score):
      new_state, metrics, _ = update(self.policy_gd, self.value_gd, cfg, ctx.optimizer,
                                     ctx.schedule, state, data, score)
      return new_state, metrics

    self.rollout_fn = jax.jit(do_rollout, in_shardings=(ctx.shardings, batch_shardings)).lower(
        state, first_batch).compile()
    data = jax.eval_shape(do_rollout, state, first_batch)
    data_shardings = self.rollout_fn.output_shardings
    rows = first_batch["prompt"].shape[0]
    score = jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=rep)
    self.update_fn = jax.jit(
        do_update, in_shardings=(ctx.shardings, data_shardings, rep),
        out_shardings=(ctx.shardings, rep), donate_argnums=0).lower(
            state, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                data, data_shardings), score).compile()
    return self

  def __call__(self, state, batch):
    data = self.rollout_fn(state, batch)
    task = None
    if self.host_scorer is not None:
      response, mask, index = (parallel.to_host(data["response"]), parallel.to_host(data["mask"]),
                               parallel.to_host(batch["index"]))
      task = self.host_scorer(response, mask, index)
    if self.reward_from_scorer:
      score = parallel.from_host(task, parallel.replicated(self.ctx.mesh))
    else:
      score = jax.device_put(data["rm_score"], parallel.replicated(self.ctx.mesh))
    state, metrics = self.update_fn(state, data, score)
    if task is not None:
      metrics = {**metrics, "task_score": float(task.mean())}
    return state, metrics


def make_eval(examples, tokenizer, cfg: PPOConfig, graphdefs, template, host_scorer):
  """extra_eval: greedy responses to held-out prompts: eval_task_score (scorer), eval_reward_mean
  (reward model, normalised), eval_response_length."""
  rows = prompts_lib.encode_prompts(examples, tokenizer, cfg.prompt_len, template)
  policy_gd, _, reward_gd = graphdefs
  compiled = {}

  def run(params, mesh, rules, extras=None):
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    n = len(rows)
    padded = rows + [rows[0]] * (-n % shards)  # fill the mesh; scored once only
    prompt = np.stack([r["prompt"] for r in padded])
    length = np.stack([r["prompt_length"] for r in padded])

    def fn(policy, reward, prompt, length):
      out = rollout(policy_gd, reward_gd, cfg, policy, reward, prompt, length,
                    jax.random.PRNGKey(0), eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                    greedy=True)
      result = {"response": out["response"], "mask": out["mask"], "done": out["done"]}
      if reward_gd is not None:  # the reward PPO optimises, missing-EOS penalty included
        result["rm_score"] = out["rm_score"] + jnp.where(out["done"], 0.0,
                                                         cfg.missing_eos_penalty)
      return result

    frozen = extras.get("reward") if reward_gd is not None else None
    key = (id(mesh), prompt.shape)
    if key not in compiled:
      row_sharding = parallel.named_sharding(mesh, ("batch", None), rules, prompt.shape)
      len_sharding = parallel.named_sharding(mesh, ("batch",), rules, length.shape)
      shard_of = lambda tree: jax.tree.map(lambda a: a.sharding, tree)
      with parallel.activate(mesh, rules):
        jitted = jax.jit(fn, in_shardings=(shard_of(params["policy"]), shard_of(frozen),
                                           row_sharding, len_sharding))
      compiled[key] = (jitted, row_sharding, len_sharding)
    fn_compiled, row_sharding, len_sharding = compiled[key]
    with parallel.activate(mesh, rules):  # every host holds all the eval prompts
      out = fn_compiled(params["policy"], frozen, parallel.from_host(prompt, row_sharding),
                        parallel.from_host(length, len_sharding))
    mask = parallel.to_host(out["mask"])[:n]
    result = {"eval_response_length": float(mask.sum(axis=1).mean()),
              "eval_eos_fraction": float(parallel.to_host(out["done"])[:n].mean())}
    if "rm_score" in out:
      result["eval_reward_mean"] = float(parallel.to_host(out["rm_score"])[:n].mean())
    if host_scorer is not None:
      scores = host_scorer(parallel.to_host(out["response"])[:n], mask, np.arange(n))
      result["eval_task_score"] = float(scores.mean())
      result.update(scorers.per_task("eval_task_score", scores, host_scorer.records[:n]))
    return result

  return run


def _read_normalization(reward_dir):
  path = os.path.join(reward_dir, NORMALIZATION_FILE)
  if not fileio.exists(path):
    logging.warning("%s not found: the reward model's scores are used unnormalised", path)
    return 0.0, 1.0
  norm = fileio.read_json(path)
  return float(norm["offset"]), float(norm["scale"])


def normalized_head(reward_params, offset: float, scale: float, keep=None):
  """A copy of the reward model whose scalar head gives (score - offset) / scale: the value model
  then starts in the units of the normalised rewards it learns to predict, rather than with errors
  of the raw scores' size that would make the first iterations' advantages noise. `keep`: the
  value model's params (tree); the reward model's LM head and LM-score weight are left out."""
  value = {k: jax.tree.map(jnp.copy, v) for k, v in reward_params.items()
           if keep is None or k in keep}
  value["score"] = reward_params["score"] / scale
  value["score_bias"] = (reward_params["score_bias"] - offset) / scale
  return value


def make_stage(workdir: str, model_cfg, loop_cfg: LoopConfig, *, algorithm: str, train_data,
               eval_data=None, tokenizer="auto", init_from=None, reward_from=None, reward="model",
               scorer="demo_tasks", eval_examples=128, kl_bound=None, ptx_data=None,
               on_bad_record="raise", **hparams) -> Stage:
  """The PPO or GRPO stage. `reward`: 'model' (the reward model in REWARD_FROM, default
  DIR/reward) or 'scorer' (the rule-based SCORER). `hparams` are PPOConfig fields."""
  name = algorithm
  unknown = sorted(set(hparams) - {f.name for f in dataclasses.fields(PPOConfig)})
  if unknown:
    raise UserError(f"{name}.build: unknown setting(s) {unknown}")
  if reward not in ("model", "scorer"):
    raise UserError(f"REWARD={reward!r}: choose 'model' (the reward model) or 'scorer'")
  if reward == "scorer" and not scorer:
    raise UserError("REWARD='scorer' needs SCORER, the name of a rule-based scorer")
  reward_dir = fileio.absolute(reward_from or os.path.join(workdir, "reward"))
  if reward == "model" and not fileio.isdir(os.path.join(reward_dir, "checkpoints")):
    raise UserError(f"REWARD_FROM={reward_dir}: no checkpoints there (run `lmtrain reward` "
                    "first, set --gin.REWARD_FROM, or use --gin.REWARD=scorer)")
  offset, scale = _read_normalization(reward_dir) if reward == "model" else (0.0, 1.0)
  cfg = PPOConfig(algorithm=algorithm, reward_offset=offset, reward_scale=scale,
                  **hparams).validate()
  if cfg.ptx_coef and not ptx_data:
    raise UserError(f"PTX_COEF={cfg.ptx_coef} needs PTX_DATA (language-model text, or 'demo')")

  train, evals = resolve_sources(workdir, train_data, eval_data, demo.write_ppo_prompts,
                                 "prompt JSONL")
  tok = stage_tokenizer(workdir, tokenizer)
  template = sft_data.ChatTemplate()
  train_examples = prompts_lib.load_prompts(train, on_error=on_bad_record)
  eval_list = (prompts_lib.load_prompts(evals, on_error=on_bad_record)[:eval_examples]
               if evals else [])
  if scorer:
    check_scorer(scorer, train_examples, train)
    if eval_list:
      check_scorer(scorer, eval_list, evals)
  train_scorer = (scorers.ResponseScorer(scorer, [ex.record for ex in train_examples], tok)
                  if scorer else None)
  eval_scorer = (scorers.ResponseScorer(scorer, [ex.record for ex in eval_list], tok)
                 if scorer else None)

  policy_cfg = model_cfg
  value_cfg = dataclasses.replace(model_cfg, head="scalar")
  reward_cfg = value_cfg
  rm_json = os.path.join(reward_dir, "model.json")
  if reward == "model" and fileio.exists(rm_json):  # its head settings; its trunk is the policy's
    lm_score = bool(fileio.read_json(rm_json).get("lm_score", False))
    reward_cfg = dataclasses.replace(value_cfg, lm_score=lm_score)
  policy_gd, policy_abs, policy_names = transformer.abstract_model(policy_cfg)
  value_gd, value_abs, value_names = transformer.abstract_model(value_cfg)
  reward_gd, reward_abs, reward_names = transformer.abstract_model(reward_cfg)
  use_value = not cfg.grpo
  use_rm = reward == "model"
  graphdefs = (policy_gd, value_gd if use_value else None, reward_gd if use_rm else None)

  def abstract_params():
    tree, names = {"policy": policy_abs}, {"policy": policy_names}
    if use_value:
      tree["value"], names["value"] = value_abs, value_names
    if use_rm:
      tree["reward"], names["reward"] = reward_abs, reward_names
    return tree, names

  kl_init = rl.kl_controller_init(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)

  def split_loaded(loaded):
    params = {"policy": loaded["policy"]}
    extras = {"reference": jax.tree.map(jnp.copy, loaded["policy"]),
              "kl_ctl": jax.tree.map(jnp.asarray, kl_init)}
    if use_value:
      params["value"] = loaded["value"]
    if use_rm:
      extras["reward"] = loaded["reward"]
    return params, extras

  def split_names(names):
    params = {k: v for k, v in names.items() if k in ("policy", "value")}
    extras = {"reference": names["policy"], "kl_ctl": {k: () for k in kl_init}}
    if use_rm:
      extras["reward"] = names["reward"]
    return params, extras

  policy_init = ckpt_lib.parent_initializer(workdir, init_from, "sft")
  rm_init = ckpt_lib.parent_initializer(workdir, reward_dir, "reward")
  # With a scorer as the reward there is no reward model: the value model is the SFT trunk with
  # a fresh scalar head.
  value_init = (rm_init if use_rm else
                ckpt_lib.parent_initializer(workdir, init_from, "sft", value_cfg, loop_cfg.seed))

  def init_from_parent(abstract):
    policy, parent = policy_init(abstract["policy"])
    loaded = {"policy": policy}
    if use_rm:
      loaded["reward"], parent["reward_model"] = rm_init(abstract["reward"])
    if use_value:
      if use_rm:  # the same checkpoint: a second copy, trained from here on
        loaded["value"] = normalized_head(loaded["reward"], offset, scale, value_abs)
        parent["value_model"] = parent["reward_model"]
      else:
        loaded["value"], parent["value_model"] = value_init(abstract["value"])
    return loaded, parent

  rows = loop_cfg.batch_size
  if rows % cfg.num_minibatches:
    raise UserError(f"BATCH_SIZE={rows} does not divide into NUM_MINIBATCHES="
                    f"{cfg.num_minibatches}")

  def train_data_fn(process_index, process_count):
    prompt_iter = prompts_lib.make_prompt_iterator(
        train, tok, prompt_len=cfg.prompt_len, batch_size=rows, seed=loop_cfg.seed,
        process_index=process_index, process_count=process_count, on_error=on_bad_record,
        template=template, group_size=cfg.group_size if cfg.grpo else 1)
    if not cfg.ptx_coef:
      return prompt_iter
    ptx_sources, _ = resolve_text_data(workdir, ptx_data, None)
    corpora, weights = text_corpora(workdir, ptx_sources, tok, what="PTX_DATA",
                                    on_error=on_bad_record)
    ptx_iter = loader.make_iterator(
        corpora, weights=weights, seq_len=loop_cfg.seq_len, batch_size=rows, seed=loop_cfg.seed,
        process_index=process_index, process_count=process_count, shuffle=True,
        num_epochs=None)
    return prompts_lib.ZipIterator(prompt_iter, ptx=ptx_iter)

  seq = cfg.prompt_len + cfg.max_new_tokens
  fp = policy_cfg.flops_per_token(seq) / 3  # one forward pass
  fv = value_cfg.flops_per_token(seq) / 3  # scalar head: no vocab projection
  fr = reward_cfg.flops_per_token(seq) / 3  # with lm_score the reward pass computes logits too
  # sampling, then policy and reference passes; value and reward passes; epochs x (fwd + bwd).
  flops = 3 * fp + (fv if use_value else 0) + (fr if use_rm else 0)
  flops += cfg.epochs * 3 * (fp + (fv if use_value else 0))

  def make_step(ctx):
    return PPOStep(ctx, cfg, graphdefs, tok, train_scorer, reward == "scorer")

  extra_eval = (make_eval(eval_list, tok, cfg, graphdefs, template, eval_scorer)
                if eval_list else None)
  summary = {"reward": reward if reward == "scorer" else f"model {reward_dir}",
             "reward_offset": offset, "reward_scale": scale}
  if kl_bound is not None:
    summary["kl_bound"] = float(kl_bound)
  return Stage(
      name=name, model_config=policy_cfg, loss_fn=None, train_data=train_data_fn,
      init_from_parent=init_from_parent, extra_eval=extra_eval, tokenizer_path=tok.path,
      abstract_params=abstract_params, split_loaded=split_loaded, split_names=split_names,
      make_step=make_step, updates_per_step=cfg.epochs * cfg.num_minibatches,
      tokens_per_step=rows * seq, flops_per_token=flops, summary=summary,
      summary_keys=("kl", "reward_mean", "task_score", "entropy", "response_length"))


@gin.configurable
def build(workdir: str, model_cfg, loop_cfg: LoopConfig, train_data=gin.REQUIRED, **kwargs):
  """`lmtrain ppo`; keyword arguments as `make_stage` takes them (PPOConfig fields included)."""
  return make_stage(workdir, model_cfg, loop_cfg, algorithm="ppo", train_data=train_data,
                    **kwargs)
