"""Direct preference optimisation: the SFT policy against a frozen copy of itself on preference pairs.

The pairs are the pair records of the preference data and the ordered pairs of its rankings, ties
left out (preference.load_pairs), each one example.

Summed completion log-probs (response tokens and their EOS) of chosen and rejected under the policy
and the reference give the DPO logits beta * ((pc - rc) - (pr - rr)); at initialisation policy ==
reference, so the loss is ln 2.
"""

import gin
import jax
import jax.numpy as jnp

from lmtrain.data import demo, preference, sft as sft_data
from lmtrain.errors import UserError
from lmtrain.losses import mean_metrics
from lmtrain.rl import core as rl
from lmtrain.stages import REGISTRY
from lmtrain.stages.common import data_factory, resolve_sources, stage_tokenizer
from lmtrain.train import checkpoint as ckpt_lib
from lmtrain.train import optim
from lmtrain.train.evaluation import Evaluation
from lmtrain.train.loop import LoopConfig, Stage
from lmtrain.train.step import LossStep


def completion_logprobs(model, batch, side: str, dropout_rng=None):
  """[B] summed log-probs of the response tokens of `side` (chosen or rejected); with a training
  step's `dropout_rng`, the adapters' inputs dropped out."""
  tokens = batch[f"{side}_inputs"]
  hidden = model.hidden(tokens[:, :-1], batch[f"{side}_positions"][:, :-1],
                        batch[f"{side}_segment_ids"][:, :-1], dropout_rng)
  mask = batch[f"{side}_loss_mask"][:, 1:]
  return rl.token_logprobs(model, hidden, tokens[:, 1:], mask)[0].sum(-1)


def make_dpo_loss(beta: float, label_smoothing: float):
  def dpo_loss(model, batch, rng, reference):
    # With LORA_DROPOUT the policy's adapters drop out their inputs in training steps (rng None
    # in evaluation), chosen and rejected with masks of their own; the reference has no adapters.
    keys = (jax.random.split(rng) if rng is not None and model.cfg.lora_dropout
            else (None, None))
    policy = [completion_logprobs(model, batch, s, key)
              for s, key in zip(("chosen", "rejected"), keys)]
    ref = [completion_logprobs(reference, batch, s) for s in ("chosen", "rejected")]
    loss, metrics = rl.dpo_loss(*policy, *ref, beta=beta, label_smoothing=label_smoothing)
    n = jnp.asarray(policy[0].shape[0], jnp.float32)
    return loss * n, n, {k: v * n for k, v in metrics.items()}
  return dpo_loss


@gin.configurable
def build(workdir: str, model_cfg, loop_cfg: LoopConfig, train_data=gin.REQUIRED, eval_data=None,
          tokenizer="auto", init_from=None, beta=0.1, label_smoothing=0.0,
          on_bad_record="raise") -> Stage:
  if model_cfg.lora_rank and optim.trainable_setting() != "all":
    raise UserError(f"TRAINABLE={optim.trainable_setting()!r} with LORA_RANK="
                    f"{model_cfg.lora_rank}: DPO's reference is the base without the adapters, "
                    f"so with LoRA only the adapters may train (TRAINABLE='all')")
  train, evals = resolve_sources(workdir, train_data, eval_data, demo.write_preference_data,
                                 "preference JSONL")
  tok = stage_tokenizer(workdir, tokenizer)
  template = sft_data.ChatTemplate()

  # Filled by the training iterator when the loop opens it (the pairs are read once).
  data_info = {"unit": "pairs", "per_step": loop_cfg.batch_size}

  def batches(sources, train):
    return data_factory(preference.make_pair_iterator, sources, tok, loop_cfg, train=train,
                        info=data_info if train else None,
                        on_error=on_bad_record, template=template)

  loss = make_dpo_loss(beta, label_smoothing)
  return Stage(
      name="dpo", step=LossStep(model_cfg, loss, frozen_reference=True, rows_per_example=2),
      train_data=batches(train, True),
      evaluation=Evaluation(data=batches(evals, False), loss_fn=loss, metrics=mean_metrics(
          "reward_accuracy", "chosen_reward", "rejected_reward", "margin")) if evals else None,
      init_from_parent=ckpt_lib.parent_initializer(workdir, init_from, REGISTRY["dpo"].parent,
                                                   tokenizer=tok.path),
      tokenizer_path=tok.path, data_sources=train, data_info=data_info)
