"""Supervised fine-tuning: next-token loss on response (assistant) tokens only, from a parent model.

The loss is `losses.lm_loss`: the SFT batches carry a loss_mask that is 1 only on response targets,
so the step's token-weighted mean is over response tokens across the whole global batch.
"""

import functools
import math

import gin
import jax
import numpy as np

from lmtrain import parallel
from lmtrain.data import demo, scorers, sft as sft_data
from lmtrain.errors import UserError
from lmtrain.losses import lm_loss, perplexity_metrics
from lmtrain.model import generate as generate_lib
from lmtrain.stages import REGISTRY
from lmtrain.stages.common import data_factory, resolve_sources, stage_tokenizer
from lmtrain.train import checkpoint as ckpt_lib
from lmtrain.train.evaluation import Evaluation
from lmtrain.train.loop import LoopConfig, Stage
from lmtrain.train.step import LossStep


def answer_eval(examples, tokenizer, model_cfg, template, scorer_name: str,
                max_new_tokens: int, name: str = "exact_match"):
  """Evaluation.measure: greedy answers to held-out prompts, scored against their reference
  answers."""
  scorer = scorers.ResponseScorer(scorer_name, [ex.record for ex in examples], tokenizer)
  prompts = [sft_data.encode_prompt(ex.prompt_turns, tokenizer, template) for ex in examples]
  compiled = {}

  def run(params, extras, mesh, rules):
    del extras  # the SFT eval needs only the policy
    shards = parallel.batch_shard_count(mesh)
    batch = math.ceil(len(prompts) / shards) * shards
    padded = prompts + [prompts[0]] * (batch - len(prompts))  # fill the mesh; scored once only
    ids, lengths = generate_lib.pad_prompts(padded, pad_id=tokenizer.pad_id)
    key = (id(mesh), ids.shape)
    if key not in compiled:
      compiled[key] = generate_lib.make_generate(
          mesh, rules, model_cfg, batch, ids.shape[1], max_new_tokens=max_new_tokens,
          greedy=True, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    out = compiled[key](params, ids, lengths, jax.random.PRNGKey(0))
    n = len(examples)
    tokens, mask = parallel.to_host(out.tokens), parallel.to_host(out.mask)
    scores = scorer(tokens[:n], mask[:n], np.arange(n))
    return {f"eval_{name}": float(np.mean(scores)),
            **scorers.per_task(f"eval_{name}", scores, scorer.records)}

  return run


@gin.configurable
def build(workdir: str, model_cfg, loop_cfg: LoopConfig, train_data=gin.REQUIRED, eval_data=None,
          tokenizer="auto", init_from=None, template=None, pack=True, on_bad_record="raise",
          scorer="exact_match", eval_examples=64, eval_max_new_tokens=16,
          demo_careless_count=0.0) -> Stage:
  """`lmtrain sft`. `demo_careless_count`: with TRAIN_DATA='demo', the share of the count
  demonstrations written wrong by a careless annotator (`demo.write_sft_data`)."""
  write_demo = functools.partial(demo.write_sft_data, careless_count_share=demo_careless_count)
  train, evals = resolve_sources(workdir, train_data, eval_data, write_demo, "SFT JSONL")
  tok = stage_tokenizer(workdir, tokenizer)
  if tok.vocab_size > model_cfg.vocab_size:
    raise UserError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but the model's vocab_size "
                    f"is {model_cfg.vocab_size}")
  template = template or sft_data.ChatTemplate()

  # Filled by the training iterator when the loop opens it (the examples are read once).
  data_info = {"unit": "examples", "per_step": None if pack else loop_cfg.batch_size}

  def batches(sources, train):
    return data_factory(sft_data.make_sft_iterator, sources, tok, loop_cfg, train=train,
                        pack=pack, on_error=on_bad_record, template=template,
                        info=data_info if train else None)

  measure = None
  if evals:
    with_answers = [ex for ex in sft_data.load_examples(evals, on_error=on_bad_record)
                    if "answer" in ex.record][:eval_examples]
    if with_answers:
      measure = answer_eval(with_answers, tok, model_cfg, template, scorer,
                               eval_max_new_tokens)
  return Stage(
      name="sft", step=LossStep(model_cfg, lm_loss), train_data=batches(train, True),
      evaluation=Evaluation(data=batches(evals, False) if evals else None, loss_fn=lm_loss,
                            metrics=perplexity_metrics, measure=measure),
      init_from_parent=ckpt_lib.parent_initializer(workdir, init_from, REGISTRY["sft"].parent,
                                                   tokenizer=tok.path),
      tokenizer_path=tok.path, data_sources=train, data_info=data_info)
