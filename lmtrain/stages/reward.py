"""Reward model: the SFT trunk with a new scalar head, trained on preference pairs.

loss = -log sigmoid(r_chosen - r_rejected - margin), with r read at each sequence's last real token
(its EOS); with `lm_score`, r also adds a learned weight x the response's mean log-prob under the
trunk's own LM head (rl.reward_scores). After training, the rewards of the held-out responses give a
normalisation (offset, scale) saved beside the checkpoint, which PPO applies so its KL coefficient
means the same across RMs.
"""

import dataclasses
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np

from lmtrain import fileio, parallel
from lmtrain.data import demo, preference, sft as sft_data
from lmtrain.losses import mean_metrics
from lmtrain.model import transformer
from lmtrain.rl import core as rl
from lmtrain.stages import REGISTRY
from lmtrain.stages.common import data_factory, resolve_sources, stage_tokenizer
from lmtrain.train import checkpoint as ckpt_lib, roles
from lmtrain.train.evaluation import Evaluation
from lmtrain.train.loop import Hook, LoopConfig, Stage
from lmtrain.train.step import LossStep

def pair_scores(model, batch):
  both = {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]])
          for k in ("inputs", "positions", "segment_ids", "loss_mask")}
  scores = rl.reward_scores(model, both["inputs"], both["positions"], both["segment_ids"],
                            both["loss_mask"])
  return jnp.split(scores, 2)


def reward_loss(model, batch, rng):
  """Summed over the pairs of the batch (the step divides by the global pair count)."""
  del rng
  chosen, rejected = pair_scores(model, batch)
  loss, metrics = rl.pairwise_reward_loss(chosen, rejected, batch["margin"])
  n = jnp.asarray(chosen.shape[0], jnp.float32)
  return loss * n, n, {k: v * n for k, v in metrics.items()}


def normalizer(pairs, tokenizer, template, seq_len, model_config):
  """An end-of-run hook: the offset/scale that give the held-out responses' rewards mean 0, std 1,
  saved beside the checkpoint once the schedule is complete."""
  rows = [preference.encode_pair(p, tokenizer, template, seq_len) for p in pairs]

  def run(info):
    if not info.finished:
      return None
    params, mesh, rules = info.state.params, info.mesh, info.rules
    graphdef, _, _ = transformer.abstract_model(model_config)
    shards = parallel.batch_shard_count(mesh)
    n = len(rows) // shards * shards
    batch = {k: np.stack([r[k] for r in rows[:n]]) for k in rows[0]}

    def score_all(p, b):
      return jnp.concatenate(pair_scores(transformer.merge(graphdef, p), b))

    with parallel.activate(mesh, rules):
      scores = np.asarray(jax.device_get(jax.jit(score_all)(
          params, parallel.global_batch(batch, mesh, rules))))
    norm = {"offset": float(scores.mean()), "scale": float(scores.std() + 1e-6),
            "num_responses": int(scores.size)}
    if jax.process_index() == 0:
      fileio.write_json(os.path.join(info.stage_dir, roles.NORMALIZATION_FILE), norm)
    return {"reward_offset": norm["offset"], "reward_scale": norm["scale"]}

  return run


@gin.configurable
def build(workdir: str, model_cfg, loop_cfg: LoopConfig, train_data=gin.REQUIRED, eval_data=None,
          tokenizer="auto", init_from=None, on_bad_record="raise",
          normalization_pairs=256, lm_score=False) -> Stage:
  train, evals = resolve_sources(workdir, train_data, eval_data, demo.write_preference_data,
                                 "preference JSONL")
  tok = stage_tokenizer(workdir, tokenizer)
  rm_cfg = dataclasses.replace(model_cfg, head="scalar", lm_score=bool(lm_score))
  template = sft_data.ChatTemplate()

  def batches(sources, train):
    return data_factory(preference.make_preference_iterator, sources, tok, loop_cfg, train=train,
                        on_error=on_bad_record, template=template)

  norm_pairs = preference.load_pairs(evals or train, on_error=on_bad_record)[:normalization_pairs]
  return Stage(
      name="reward", step=LossStep(rm_cfg, reward_loss), train_data=batches(train, True),
      evaluation=Evaluation(data=batches(evals, False), loss_fn=reward_loss, metrics=mean_metrics(
          "accuracy", "margin", "chosen_mean", "rejected_mean")) if evals else None,
      init_from_parent=ckpt_lib.parent_initializer(workdir, init_from, REGISTRY["reward"].parent,
                                                   rm_cfg, loop_cfg.seed),
      hooks=(Hook(normalizer(norm_pairs, tok, template, loop_cfg.seq_len, rm_cfg), at_end=True),),
      tokenizer_path=tok.path)
