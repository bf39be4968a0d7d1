"""Reward model: the SFT trunk with a new scalar head, trained on preference rankings and pairs.

A batch element is a ranking of up to K responses (a pair is one of two), each response scored
once: r read at its last real token (its EOS); with `lm_score`, r also adds a learned weight x the
response's mean log-prob under the trunk's own LM head (rl.reward_scores). The element's loss is
the mean of -log sigmoid(r_better - r_worse - margin) over its ordered pairs, ties left out
(rl.ranking_reward_loss, InstructGPT's); for a pair, the Bradley-Terry loss. After training, the
rewards of the parent (SFT) policy's own samples for the training prompts (NORMALIZATION =
'policy', as lm-human-preferences does; or of every response of the held-out records,
'preference') give a normalisation (offset, scale) saved beside the checkpoint, which PPO applies
so that its first rollouts' rewards have mean 0 and std 1 and its KL coefficient, EOS penalty and
value clip mean the same across RMs.
"""

import dataclasses
import os

import gin
import jax
import numpy as np

from lmtrain import fileio, parallel
from lmtrain.data import demo, preference, prompts as prompts_lib, sft as sft_data
from lmtrain.errors import UserError
from lmtrain.losses import METRIC_WEIGHT, mean_metrics
from lmtrain.model import transformer
from lmtrain.rl import core as rl
from lmtrain.rl import rollout as rollout_lib
from lmtrain.rl.config import RLConfig
from lmtrain.stages import REGISTRY
from lmtrain.stages.common import data_factory, resolve_sources, stage_tokenizer
from lmtrain.train import checkpoint as ckpt_lib, roles
from lmtrain.train.evaluation import Evaluation
from lmtrain.train.loop import Hook, LoopConfig, Stage
from lmtrain.train.step import LossStep


# The features of a batch that hold one row per response ([B, K, T]).
RESPONSE_FEATURES = ("inputs", "positions", "segment_ids", "loss_mask")


def ranking_scores(model, batch, dropout_rng=None):
  """[B, K] the score of every response of the batch's B rankings: one forward pass over its
  B * K rows (with a training step's `dropout_rng`, the adapters' inputs dropped out)."""
  shape = batch["inputs"].shape
  rows = {k: batch[k].reshape(-1, shape[-1]) for k in RESPONSE_FEATURES}
  scores = rl.reward_scores(model, rows["inputs"], rows["positions"], rows["segment_ids"],
                            rows["loss_mask"], dropout_rng)
  return scores.reshape(shape[:-1])


def reward_loss(model, batch, rng):
  """Summed over the rankings of the batch that hold a pair (the step divides by their global
  count); the metrics are sums over the pairs, their count the METRIC_WEIGHT. `rng`: the step's
  key for the adapters' dropout (None in evaluation)."""
  loss, metrics = rl.ranking_reward_loss(ranking_scores(model, batch, rng), batch["ranks"],
                                         batch["valid"], batch["margin"])
  rankings, pairs = metrics.pop("rankings"), metrics.pop("pairs")
  return (loss * rankings, rankings,
          {**{k: v * pairs for k, v in metrics.items()}, METRIC_WEIGHT: pairs})


NORMALIZATION_SOURCES = ("policy", "preference")


def _on_mesh(rows, mesh, rules):
  """Rows that every host holds whole, stacked, padded with copies of the first to fill the
  mesh's batch shards (their results are dropped), as global arrays split over the batch."""
  padded = rows + [rows[0]] * (-len(rows) % parallel.batch_shard_count(mesh))
  stacked = {k: np.stack([r[k] for r in padded]) for k in rows[0]}
  return {k: parallel.from_host(v, parallel.batch_sharding(mesh, rules, v.ndim))
          for k, v in stacked.items()}


def preference_scores(rm_graphdef, rm_params, rows, mesh, rules):
  """The reward-model scores of every response of the encoded rankings `rows`
  (preference.encode_ranking), record by record, padding left out, on any mesh and any number of
  hosts."""
  def score(params, batch):
    return ranking_scores(transformer.merge(rm_graphdef, params), batch)

  with parallel.activate(mesh, rules):
    scores = parallel.to_host(jax.jit(score)(rm_params, _on_mesh(rows, mesh, rules)))
  return scores[:len(rows)][np.stack([r["valid"] for r in rows]) > 0]


def policy_scores(policy_graphdef, policy_params, rm_graphdef, rm_params, prompt_rows, mesh,
                  rules, *, new_tokens: int, temperature: float, seed: int, eos_id: int,
                  pad_id: int):
  """([n] reward-model scores, [n] EOS flags) of one response sampled by the policy for each of the
  n encoded prompts (prompts.encode_prompts rows), through the RL stages' own rollout."""
  cfg = RLConfig(prompt_len=prompt_rows[0]["prompt"].shape[0], max_new_tokens=new_tokens,
                 temperature=temperature)

  def sample_and_score(policy, reward, batch):
    out = rollout_lib.rollout(policy_graphdef, rm_graphdef, cfg, policy, reward, batch["prompt"],
                              batch["prompt_length"], jax.random.PRNGKey(seed), eos_id=eos_id,
                              pad_id=pad_id)
    return out["rm_score"], out["done"]

  rows = [{k: r[k] for k in ("prompt", "prompt_length")} for r in prompt_rows]
  with parallel.activate(mesh, rules):
    scores, done = jax.jit(sample_and_score)(policy_params, rm_params,
                                             _on_mesh(rows, mesh, rules))
    scores, done = parallel.to_host(scores), parallel.to_host(done)
  return scores[:len(rows)], done[:len(rows)]


def normalizer(source: str, rankings, tokenizer, template, seq_len, rm_config, load_policy=None,
               *, new_tokens: int = 16, temperature: float = 1.0, seed: int = 0):
  """An end-of-run hook: the offset/scale that give the rewards of `source`'s responses mean 0,
  std 1, saved beside the checkpoint (roles.NORMALIZATION_FILE) before the last checkpoint is
  (lmtrain/train/loop.py), so a run cut off before it is written redoes it.

  source 'policy': one response of the parent policy (load_policy: abstract params -> (params,
  lineage)) sampled for each distinct prompt of `rankings` (preference.Ranking, pairs included),
  as PPO's first rollouts will see them; 'preference': every response of each ranking."""
  rm_graphdef, _, _ = transformer.abstract_model(rm_config)
  if source == "policy":
    prompt_len = seq_len - new_tokens
    if prompt_len < 2:
      raise UserError(f"reward.build.normalization_new_tokens={new_tokens} leaves "
                      f"{prompt_len} of SEQ_LEN={seq_len} tokens for the prompts")
    distinct = list({r.prompt_turns: r for r in rankings}.values())
    examples = [sft_data.Example(tuple(r.prompt_turns), r.record) for r in distinct]
    rows = prompts_lib.encode_prompts(examples, tokenizer, prompt_len, template)
    policy_config = dataclasses.replace(rm_config, head="lm", lm_score=False)
  else:
    k = preference.max_responses(rankings)
    rows = [preference.encode_ranking(r, tokenizer, template, seq_len, k) for r in rankings]

  def run(info):
    if not info.finished:
      return None
    norm = {"source": source}
    if source == "policy":
      graphdef, abstract, names = transformer.abstract_model(policy_config)
      shardings = parallel.tree_shardings(info.mesh, abstract, names, info.rules)
      policy, lineage = load_policy(parallel.with_shardings(abstract, shardings))
      scores, done = policy_scores(
          graphdef, policy, rm_graphdef, info.state.params, rows, info.mesh, info.rules,
          new_tokens=new_tokens, temperature=temperature, seed=seed, eos_id=tokenizer.eos_id,
          pad_id=tokenizer.pad_id)
      norm.update(policy=lineage["path"], new_tokens=new_tokens, temperature=temperature,
                  eos_fraction=float(done.mean()))
    else:
      scores = preference_scores(rm_graphdef, info.state.params, rows, info.mesh, info.rules)
    norm = {"offset": float(scores.mean()), "scale": float(scores.std() + 1e-6),
            "num_responses": int(scores.size), **norm}
    accuracy = info.evaluation.get("eval_accuracy")
    if accuracy is not None:  # PPO refuses a reward model at chance (rl/stage.read_normalization)
      norm["eval_accuracy"] = float(accuracy)
    if jax.process_index() == 0:
      fileio.write_json(os.path.join(info.stage_dir, roles.NORMALIZATION_FILE), norm)
    out = {"reward_offset": norm["offset"], "reward_scale": norm["scale"]}
    problem = roles.degenerate_reward(norm)
    if problem:
      out["reward_warning"] = problem
      print(f"warning: reward: {problem}", flush=True)
    return out

  return run


@gin.configurable
def build(workdir: str, model_cfg, loop_cfg: LoopConfig, train_data=gin.REQUIRED, eval_data=None,
          tokenizer="auto", init_from=None, on_bad_record="raise",
          normalization="policy", normalization_pairs=256, normalization_new_tokens=16,
          normalization_temperature=1.0, lm_score=False) -> Stage:
  train, evals = resolve_sources(workdir, train_data, eval_data, demo.write_preference_data,
                                 "preference JSONL")
  tok = stage_tokenizer(workdir, tokenizer)
  rm_cfg = dataclasses.replace(model_cfg, head="scalar", lm_score=bool(lm_score))
  template = sft_data.ChatTemplate()

  if normalization not in NORMALIZATION_SOURCES:
    raise UserError(f"NORMALIZATION={normalization!r}: choose one of {NORMALIZATION_SOURCES}")
  if normalization_pairs < 1:
    raise UserError(f"reward.build.normalization_pairs={normalization_pairs} must be at least 1")
  train_records = preference.load_rankings(train, on_error=on_bad_record)
  eval_records = preference.load_rankings(evals, on_error=on_bad_record) if evals else []
  # Train and eval batches hold as many responses, so that a host whose eval data ran out can go
  # on with zeros shaped like its train batch (train/evaluation.host_eval_batches).
  num_responses = preference.max_responses(train_records + eval_records)

  # Filled by the training iterator when the loop opens it (the records are read once more).
  data_info = {"unit": "rankings", "per_step": loop_cfg.batch_size}

  def batches(sources, train):
    return data_factory(preference.make_ranking_iterator, sources, tok, loop_cfg, train=train,
                        info=data_info if train else None, on_error=on_bad_record,
                        template=template, num_responses=num_responses)

  # The policy's samples answer the training prompts; the preference responses are held out.
  norm_records = (train_records if normalization == "policy"
                  else (eval_records or train_records))[:normalization_pairs]
  parent = ckpt_lib.parent_initializer(workdir, init_from, REGISTRY["reward"].parent)
  norm_hook = normalizer(normalization, norm_records, tok, template, loop_cfg.seq_len, rm_cfg,
                         parent, new_tokens=normalization_new_tokens,
                         temperature=normalization_temperature, seed=loop_cfg.seed)
  return Stage(
      name="reward", step=LossStep(rm_cfg, reward_loss, rows_per_example=num_responses),
      train_data=batches(train, True),
      evaluation=Evaluation(data=batches(evals, False), loss_fn=reward_loss, metrics=mean_metrics(
          "accuracy", "margin", "chosen_mean", "rejected_mean")) if evals else None,
      init_from_parent=ckpt_lib.parent_initializer(workdir, init_from, REGISTRY["reward"].parent,
                                                   rm_cfg, loop_cfg.seed, tokenizer=tok.path),
      hooks=(Hook(norm_hook, at_end=True),),
      tokenizer_path=tok.path, data_sources=train, data_info=data_info)
