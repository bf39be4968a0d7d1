"""Pre-training: next-token cross-entropy on packed raw text."""

import os

import gin

from lmtrain import fileio
from lmtrain.data import loader, prepare, sources as sources_lib, tokenizer as tokenizer_lib
from lmtrain.errors import UserError
from lmtrain.losses import lm_loss, perplexity_metrics
from lmtrain.stages.common import as_list, corpus_data_factory, resolve_text_data, text_corpora
from lmtrain.train.evaluation import Evaluation
from lmtrain.train.loop import LoopConfig, Stage
from lmtrain.train.step import LossStep


@gin.configurable
def resolve_tokenizer(workdir: str, train_sources, tokenizer=gin.REQUIRED, vocab_size=None):
  """(tokenizer, how this run made it or None). `tokenizer='auto'`: DIR/tokenizer.model; when
  missing, a prepared corpus's own tokenizer, or one trained on the raw training files."""
  if tokenizer != "auto":
    return tokenizer_lib.Tokenizer.load(tokenizer), None
  made = None
  path = os.path.join(workdir, "tokenizer.model")
  if not fileio.exists(path):
    entries = as_list(train_sources)
    prepared = [s for s in entries if sources_lib.is_prepared(s)]
    files = [s for s in entries if not sources_lib.is_seqio(s) and s not in prepared]
    if prepared:
      fileio.write_bytes(path, fileio.read_bytes(os.path.join(prepared[0],
                                                              prepare.TOKENIZER_COPY)))
      made = f"copied from {prepared[0]}"
    elif not files:
      raise UserError("TOKENIZER='auto' needs text files to train on; with a seqio source set "
                      "TOKENIZER to a sentencepiece model")
    else:
      print(f"pretrain: training a {vocab_size}-piece tokenizer on {len(files)} file(s) -> {path}",
            flush=True)
      tokenizer_lib.train_tokenizer(files, vocab_size, path)
      made = f"trained by this run on {len(files)} file(s)"
  return tokenizer_lib.Tokenizer.load(path), made


def check_vocab(tok, model_cfg):
  if tok.vocab_size > model_cfg.vocab_size:
    raise UserError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but the model's vocab_size "
                    f"is {model_cfg.vocab_size}; train the tokenizer with --vocab_size "
                    f"{model_cfg.vocab_size} or pick a larger MODEL")


@gin.configurable
def build(workdir: str, model_cfg, loop_cfg: LoopConfig, train_data=gin.REQUIRED,
          eval_data=None, on_bad_record="raise") -> Stage:
  if model_cfg.lora_rank:
    raise UserError(f"LORA_RANK={model_cfg.lora_rank}: pretraining starts from fresh weights, "
                    f"which adapters would leave frozen at random; LoRA is for sft, reward and dpo")
  train, evals = resolve_text_data(workdir, train_data, eval_data)
  tok, tokenizer_made = resolve_tokenizer(workdir, train, vocab_size=model_cfg.vocab_size)
  check_vocab(tok, model_cfg)

  train_corpora, weights = text_corpora(workdir, train, tok, what="TRAIN_DATA",
                                       on_error=on_bad_record)
  eval_corpora = (text_corpora(workdir, evals, tok, what="EVAL_DATA", on_error=on_bad_record)[0]
                  if evals else None)
  summary = {}
  skipped = sum(c.manifest.get("bad_records", 0) for c in train_corpora)
  if skipped:  # on_bad_record='skip': the records left out of the corpus
    summary["bad_records_skipped"] = skipped
  if eval_corpora:
    summary["unigram_perplexity"] = loader.unigram_perplexity(train_corpora, eval_corpora,
                                                              tok.vocab_size)

  data_info = {"documents": sum(len(c) for c in train_corpora),
               "tokens": sum(c.tokens for c in train_corpora), "tokenizer_made": tokenizer_made}
  return Stage(name="pretrain", step=LossStep(model_cfg, lm_loss), data_info=data_info,
               train_data=corpus_data_factory(train_corpora, weights, loop_cfg, train=True),
               evaluation=(Evaluation(data=corpus_data_factory(eval_corpora, None, loop_cfg,
                                                               train=False),
                                      loss_fn=lm_loss, metrics=perplexity_metrics)
                           if eval_corpora else None),
               summary=summary, tokenizer_path=tok.path, data_sources=train)
