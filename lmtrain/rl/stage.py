"""The RL stage on the loop, for any algorithm of lmtrain.rl.learner.ALGORITHMS (`lmtrain ppo`,
`lmtrain grpo`): the SFT policy optimised against a reward with a KL penalty to the frozen SFT policy.

Roles (lmtrain/train/roles.py). policy: trained, from the SFT checkpoint. reference: a frozen copy of
the starting policy. reward: the frozen reward model (REWARD = 'model'), or a rule-based scorer on
the host (REWARD = 'scorer'). value (algorithms that use one): trained, initialised from the reward
model (from the SFT trunk with a new scalar head when the reward is a scorer). The trained params are
{policy, value}; the frozen models and the KL controller are TrainState extras, so one checkpoint
holds the whole state and a resumed run continues exactly.

Training a fraction of the weights (optim.roles_trainable_fn): TRAINABLE's patterns name the
policy's parameters, and the value model trains the same ones plus its scalar head. With LORA_RANK
the policy gets fresh adapters over its parent's (merged) weights, and the reference is that base
with the adapters off, not a copy; the value model gets adapters too (and trains its scalar head)
unless make_stage.value_lora = False, which trains all of it.

One iteration (one loop step) on a batch of prompts:
  1. rollout, jitted: sample a response to each prompt with the KV cache (truncated after its first
     EOS) and read the reward model at each response's last real token (lmtrain/rl/rollout.py).
  2. host: decode the responses and score them with the prompts' scorer (`task_score`; the reward
     itself when REWARD = 'scorer'). A response without EOS gets MISSING_EOS_PENALTY added.
  3. update, jitted: the learner (lmtrain/rl/learner.py) with the algorithm's advantages and
     losses; the adaptive KL controller updates from the measured KL.
"""

import dataclasses
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
from lmtrain.model import lora, transformer
from lmtrain.rl import core, learner
from lmtrain.rl.config import Graphdefs, RLConfig
from lmtrain.rl.rollout import rollout, rollout_memory
from lmtrain.stages import REGISTRY
from lmtrain.stages.common import resolve_sources, resolve_text_data, stage_tokenizer, text_corpora
from lmtrain.train import checkpoint as ckpt_lib
from lmtrain.train import optim
from lmtrain.train import roles
from lmtrain.train.evaluation import Evaluation
from lmtrain.train.loop import Hook, LoopConfig, Stage
from lmtrain.train.state import TrainState
from lmtrain.train.step import StepFactory

FROZEN = "frozen"  # the optimizer label of the parameters TRAINABLE or LoRA leave frozen


def check_scorer(scorer_name, examples, sources):
  """Fails early, naming the data, when the prompt records lack what the scorer reads."""
  scorer = scorers.get_scorer(scorer_name)
  for i, ex in enumerate(examples):
    try:
      scorer("", ex.record)
    except UserError as e:
      raise UserError(f"{', '.join(sources)}: prompt record {i + 1}: {e}; set SCORER = None for "
                      "prompts without answers") from None


class RLStep(StepFactory):
  """The RL stage's step: its roles' models and state, and an iteration (a jitted rollout, host
  scoring, a jitted update by the learner)."""

  def __init__(self, cfg: RLConfig, configs: dict, graphdefs: Graphdefs, tokenizer, host_scorer,
               reward_from_scorer: bool, rows: int):
    super().__init__(configs[roles.POLICY])
    self.cfg, self.configs, self.graphdefs = cfg, configs, graphdefs
    self.policy_gd, self.value_gd, self.reward_gd = graphdefs
    self.tokenizer = tokenizer
    self.host_scorer = host_scorer
    self.reward_from_scorer = reward_from_scorer
    self.rows = rows
    self.updates_per_step = cfg.epochs * cfg.num_minibatches
    # The prompt batches repeat each prompt on this many consecutive rows (train_data_fn).
    self.group = learner.get_algorithm(cfg.algorithm).samples_per_prompt(cfg)
    self.kl_init = core.kl_controller_init(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    self.names = {role: transformer.abstract_model(c)[2] for role, c in configs.items()}
    self.frozen_dtype = transformer.resolve_dtype(cfg.frozen_dtype, configs[roles.POLICY])
    # A LoRA policy's reference is its own base: no copy in the extras.
    self.copies_reference = not configs[roles.POLICY].lora_rank

  def models(self):
    """{policy, value, reward}: the roles this algorithm and reward use."""
    tree, names = {}, {}
    for role, config in self.configs.items():
      _, tree[role], names[role] = transformer.abstract_model(config)
    return tree, names

  def init_fresh(self, rng):
    raise UserError("the RL stages start from an SFT (and a reward) checkpoint")

  def check_batch(self, batch_size, microbatches, mesh):
    """MICROBATCHES splits each minibatch: the rollouts must split into NUM_MINIBATCHES x
    MICROBATCHES parts that the mesh's batch shards divide."""
    learner.check_minibatches(batch_size, self.cfg, microbatches,
                              parallel.batch_shard_count(mesh))

  def trainable(self):
    """{policy, value} -> their masks (optim.roles_trainable_fn), or None when all train."""
    return optim.roles_trainable_fn(
        {role: self.configs[role].lora_rank > 0 for role in (roles.POLICY, roles.VALUE)
         if role in self.configs})

  def optimizer(self, schedule, make_schedule):
    """One optimizer over {policy, value}, or with VALUE_LEARNING_RATE / VALUE_CLIP_NORM one
    each (optax.multi_transform): its own peak LR (same schedule shape) and its own clip. Frozen
    parameters get no state either way."""
    cfg = self.cfg
    if roles.VALUE not in self.configs or (cfg.value_learning_rate is None and
                                           cfg.value_clip_norm is None):
      return super().optimizer(schedule, make_schedule)
    value_schedule = (schedule if cfg.value_learning_rate is None else
                      make_schedule(learning_rate=cfg.value_learning_rate))
    clip = {} if cfg.value_clip_norm is None else {"clip_norm": cfg.value_clip_norm}
    transforms = {roles.POLICY: optim.make_optimizer(schedule),
                  roles.VALUE: optim.make_optimizer(value_schedule, **clip)}
    trainable = self.trainable()
    if trainable is not None:
      transforms[FROZEN] = optax.set_to_zero()

    def labels(params):
      masks = (trainable(params) if trainable is not None
               else jax.tree.map(lambda _: True, params))
      return {role: jax.tree.map(lambda m, r=role: r if m else FROZEN, masks[role])
              for role in params}

    return optax.multi_transform(transforms, labels)

  def init(self, loaded, optimizer, rng):
    params = {role: loaded[role] for role in (roles.POLICY, roles.VALUE) if role in loaded}
    frozen = lambda role, tree: transformer.cast_matrices(
        jax.tree.map(jnp.copy, tree), self.names[role], self.frozen_dtype)
    extras = {roles.KL_CONTROLLER: jax.tree.map(jnp.asarray, self.kl_init)}
    if self.copies_reference:
      extras[roles.REFERENCE] = frozen(roles.POLICY, loaded[roles.POLICY])
    if roles.REWARD in loaded:
      extras[roles.REWARD] = frozen(roles.REWARD, loaded[roles.REWARD])
    return TrainState.create(params, optimizer, rng, extras)

  def state_names(self, names):
    params = {k: v for k, v in names.items() if k in (roles.POLICY, roles.VALUE)}
    extras = {roles.KL_CONTROLLER: {k: () for k in self.kl_init}}
    if self.copies_reference:
      extras[roles.REFERENCE] = names[roles.POLICY]
    if roles.REWARD in names:
      extras[roles.REWARD] = names[roles.REWARD]
    return params, extras

  def work(self, batch_size, seq_len):
    """Tokens of the prompt + response rows, and FLOPs per token: sampling, then policy and
    reference passes; value and reward passes; epochs x (forward + backward) of policy and
    value. The value model's scalar head has no vocab projection; with lm_score the reward pass
    computes logits too."""
    del batch_size, seq_len  # PTX rows aside, the work is the rollouts'
    seq = self.cfg.prompt_len + self.cfg.max_new_tokens
    one_pass = {role: config.flops_per_token(seq) / 3 for role, config in self.configs.items()}
    policy, value = one_pass[roles.POLICY], one_pass.get(roles.VALUE, 0)
    flops = 3 * policy + value + one_pass.get(roles.REWARD, 0)
    flops += self.cfg.epochs * 3 * (policy + value)
    return self.rows * seq, flops

  def memory(self, mesh, batch_size, seq_len, microbatches):
    """The decode copy of the policy (whole along the batch axes, in ROLLOUT_DTYPE) and the KV
    cache of the rollouts beside the state; one microbatch of prompt + response rows trains."""
    del seq_len  # PTX rows aside, the trained rows are the rollouts'
    cfg = self.cfg
    length = cfg.prompt_len + cfg.max_new_tokens
    extra = rollout_memory(self.configs[roles.POLICY], cfg.rollout_dtype, mesh, batch_size,
                           length - 1)
    rows = batch_size // cfg.num_minibatches // microbatches // parallel.batch_shard_count(mesh)
    return extra, (max(rows, 1), length)

  def compile(self, ctx, state, first_batch):
    """Compiles the rollout and the update; returns `iteration`."""
    self.ctx, cfg = ctx, self.cfg
    rep = parallel.replicated(ctx.mesh)
    prompt_keys = ("prompt", "prompt_length")
    batch_shardings = {k: v.sharding for k, v in first_batch.items()}

    def do_rollout(state, batch):
      rng = jax.random.fold_in(state.rng, 0)
      out = rollout(self.policy_gd, self.reward_gd, cfg, state.params[roles.POLICY],
                    state.extras.get(roles.REWARD), batch["prompt"], batch["prompt_length"], rng,
                    eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
                    group=self.group)
      out.update({k: batch[k] for k in prompt_keys})
      out.update({k: v for k, v in batch.items() if k.startswith(learner.PTX_PREFIX)})
      return out

    def do_update(state, data, score):
      new_state, metrics, _ = learner.update(self.policy_gd, self.value_gd, cfg, ctx.optimizer,
                                             ctx.schedule, state, data, score, ctx.microbatches,
                                             self.trainable(), self.group)
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
            state, parallel.with_shardings(data, data_shardings), score).compile()
    return self.iteration

  def iteration(self, state, batch):
    """One RL iteration: rollout, host scoring, update -> (state, metrics)."""
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


def make_eval(examples, tokenizer, cfg: RLConfig, graphdefs, template, host_scorer):
  """Evaluation.measure: greedy responses to held-out prompts: eval_task_score (scorer),
  eval_reward_mean (reward model, normalised), eval_response_length."""
  rows = prompts_lib.encode_prompts(examples, tokenizer, cfg.prompt_len, template)
  policy_gd, _, reward_gd = graphdefs
  compiled = {}

  def run(params, extras, mesh, rules):
    shards = parallel.batch_shard_count(mesh)
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

    frozen = extras.get(roles.REWARD) if reward_gd is not None else None
    key = (id(mesh), prompt.shape)
    if key not in compiled:
      row_sharding = parallel.named_sharding(mesh, ("batch", None), rules, prompt.shape)
      len_sharding = parallel.named_sharding(mesh, ("batch",), rules, length.shape)
      shard_of = lambda tree: jax.tree.map(lambda a: a.sharding, tree)
      with parallel.activate(mesh, rules):
        jitted = jax.jit(fn, in_shardings=(shard_of(params[roles.POLICY]), shard_of(frozen),
                                           row_sharding, len_sharding))
      compiled[key] = (jitted, row_sharding, len_sharding)
    fn_compiled, row_sharding, len_sharding = compiled[key]
    with parallel.activate(mesh, rules):  # every host holds all the eval prompts
      out = fn_compiled(params[roles.POLICY], frozen, parallel.from_host(prompt, row_sharding),
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


def read_normalization(reward_dir, allow_degenerate: bool = False):
  """(offset, scale) the reward stage saved beside its checkpoint; (0, 1) without the file.

  A reward model at chance on its held-out pairs, or whose scores barely spread (e.g. trained on
  pairs it cannot tell apart: dividing by that scale would blow the rewards, the KL penalty's
  units and the losses up by orders of magnitude) cannot rank rollouts (roles.degenerate_reward):
  refused unless `allow_degenerate`."""
  path = os.path.join(reward_dir, roles.NORMALIZATION_FILE)
  if not fileio.exists(path):
    logging.warning("%s not found: the reward model's scores are used unnormalised", path)
    return 0.0, 1.0
  norm = fileio.read_json(path)
  offset, scale = float(norm["offset"]), float(norm["scale"])
  problem = roles.degenerate_reward(norm)
  if problem and not allow_degenerate:
    raise UserError(f"{path}: the reward model cannot rank rollouts: {problem}; retrain it on "
                    f"pairs it can tell apart, or set --gin_param "
                    f"make_stage.allow_degenerate_reward=True to use it anyway")
  return offset, scale


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


@gin.configurable
def make_stage(workdir: str, model_cfg, loop_cfg: LoopConfig, *, algorithm: str,
               train_data=gin.REQUIRED, eval_data=None, tokenizer="auto", init_from=None, reward_from=None, reward="model",
               scorer="demo_tasks", eval_examples=128, kl_bound=None, ptx_data=None,
               on_bad_record="raise", allow_degenerate_reward=False, value_lora=True,
               **hparams) -> Stage:
  """The stage of `algorithm` (gin: bound in gin_configs/stages/rl.gin; `ppo.build.X` or
  `grpo.build.X` overrides for one of them). `reward`: 'model' (the reward model in REWARD_FROM,
  default DIR/reward) or 'scorer' (the rule-based SCORER). `value_lora`: with LORA_RANK, the
  value model gets adapters too (False: it trains every weight). `hparams` are RLConfig
  fields."""
  name = algorithm
  unknown = sorted(set(hparams) - {f.name for f in dataclasses.fields(RLConfig)})
  if unknown:
    raise UserError(f"{name}.build: unknown setting(s) {unknown}")
  if model_cfg.lora_rank and optim.trainable_setting() != "all":
    raise UserError(f"TRAINABLE={optim.trainable_setting()!r} with LORA_RANK="
                    f"{model_cfg.lora_rank}: {name}'s reference is the base without the "
                    f"adapters, so with LoRA only the adapters may train (TRAINABLE='all')")
  if model_cfg.lora_dropout:
    raise UserError(f"LORA_DROPOUT={model_cfg.lora_dropout}: {name} takes no dropout (its ratios "
                    f"compare the policy with the rollouts' log-probs); set LORA_DROPOUT = 0.0")
  if optim.trainable_layers_setting() is not None:
    raise UserError(f"TRAINABLE_LAYERS={optim.trainable_layers_setting()!r}: {name} does not "
                    f"restrict training to the last layers; use the loss stages (pretrain, SFT, "
                    f"reward, DPO) or TRAINABLE patterns")
  if reward not in ("model", "scorer"):
    raise UserError(f"REWARD={reward!r}: choose 'model' (the reward model) or 'scorer'")
  if reward == "scorer" and not scorer:
    raise UserError("REWARD='scorer' needs SCORER, the name of a rule-based scorer")
  reward_dir = fileio.absolute(reward_from or os.path.join(workdir, "reward"))
  if reward == "model" and not fileio.isdir(os.path.join(reward_dir, "checkpoints")):
    raise UserError(f"REWARD_FROM={reward_dir}: no checkpoints there (run `lmtrain reward` "
                    "first, set --gin.REWARD_FROM, or use --gin.REWARD=scorer)")
  offset, scale = (read_normalization(reward_dir, allow_degenerate_reward) if reward == "model"
                   else (0.0, 1.0))
  cfg = learner.validate(RLConfig(algorithm=algorithm, reward_offset=offset, reward_scale=scale,
                                 **hparams))
  method = learner.get_algorithm(algorithm)
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
  value_cfg = dataclasses.replace(model_cfg if value_lora else lora.base_config(model_cfg),
                                  head="scalar")
  reward_cfg = lora.base_config(value_cfg)
  rm_json = os.path.join(reward_dir, "model.json")
  if reward == "model" and fileio.exists(rm_json):  # its head settings; its trunk is the policy's
    lm_score = bool(fileio.read_json(rm_json).get("lm_score", False))
    reward_cfg = dataclasses.replace(reward_cfg, lm_score=lm_score)
  policy_gd, _, _ = transformer.abstract_model(policy_cfg)
  value_gd, value_abs, _ = transformer.abstract_model(value_cfg)
  reward_gd, _, _ = transformer.abstract_model(reward_cfg)
  use_value = method.uses_value
  use_rm = reward == "model"
  graphdefs = Graphdefs(policy_gd, value_gd if use_value else None, reward_gd if use_rm else None)
  configs = {roles.POLICY: policy_cfg}
  if use_value:
    configs[roles.VALUE] = value_cfg
  if use_rm:
    configs[roles.REWARD] = reward_cfg

  parent_stage = REGISTRY[algorithm].parent
  policy_init = ckpt_lib.parent_initializer(workdir, init_from, parent_stage, tokenizer=tok.path)
  rm_init = ckpt_lib.parent_initializer(workdir, reward_dir, "reward", tokenizer=tok.path)
  # With a scorer as the reward there is no reward model: the value model is the SFT trunk with
  # a fresh scalar head.
  value_init = (rm_init if use_rm else
                ckpt_lib.parent_initializer(workdir, init_from, parent_stage, value_cfg,
                                            loop_cfg.seed))

  def init_from_parent(abstract, pinned=None):
    pinned = pinned or {}
    policy, parent = policy_init(abstract[roles.POLICY], pinned=pinned or None)
    loaded = {roles.POLICY: policy}
    if use_rm:
      loaded[roles.REWARD], parent["reward_model"] = rm_init(abstract[roles.REWARD],
                                                             pinned=pinned.get("reward_model"))
    if use_value:
      if use_rm:  # the same checkpoint: a second copy, trained from here on
        loaded[roles.VALUE] = normalized_head(loaded[roles.REWARD], offset, scale, value_abs)
        if lora.has_adapters(abstract[roles.VALUE]):
          # B = 0: the value model starts as the normalised reward model.
          rng = jax.random.fold_in(jax.random.PRNGKey(loop_cfg.seed), 2)
          loaded[roles.VALUE][lora.KEY] = lora.placed_fresh_adapters(
              abstract[roles.VALUE][lora.KEY], rng)
        parent["value_model"] = parent["reward_model"]
      else:
        loaded[roles.VALUE], parent["value_model"] = value_init(
            abstract[roles.VALUE], pinned=pinned.get("value_model"))
    return loaded, parent

  rows = loop_cfg.batch_size
  learner.check_minibatches(rows, cfg, loop_cfg.microbatches, shards=1)  # the mesh's: check_batch

  def train_data_fn(process_index, process_count):
    prompt_iter = prompts_lib.make_prompt_iterator(
        train, tok, prompt_len=cfg.prompt_len, batch_size=rows, seed=loop_cfg.seed,
        process_index=process_index, process_count=process_count, on_error=on_bad_record,
        template=template, group_size=method.samples_per_prompt(cfg))
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

  measure = (make_eval(eval_list, tok, cfg, graphdefs, template, eval_scorer)
                if eval_list else None)
  summary = {"reward": reward if reward == "scorer" else f"model {reward_dir}",
             "reward_offset": offset, "reward_scale": scale}
  if kl_bound is not None:
    summary["kl_bound"] = float(kl_bound)
  return Stage(
      name=name, step=RLStep(cfg, configs, graphdefs, tok, train_scorer, reward == "scorer", rows),
      train_data=train_data_fn, init_from_parent=init_from_parent,
      evaluation=Evaluation(measure=measure) if measure else None,
      hooks=(Hook(recent_means("kl", "reward_mean", "task_score", "entropy", "response_length"),
                  at_end=True),),
      tokenizer_path=tok.path, summary=summary, data_sources=train,
      data_info={"examples": len(train_examples), "unit": "prompts",
                 "per_step": loop_cfg.batch_size})


def recent_means(*keys: str):
  """An end-of-run hook: the mean of each key over the last few steps' metrics, for the summary
  (a single RL iteration's figures are noisy)."""
  def means(info):
    return {k: float(np.mean([r[k] for r in info.recent])) for k in keys
            if info.recent and all(k in r for r in info.recent)}
  return means
