"""What every stage's `build` needs: its sources (or the demo data), the run's tokenizer, and
per-host data iterators for the loop."""

import os

from lmtrain import fileio
from lmtrain.data import demo, loader, prepare, sources as sources_lib, tokenizer as tokenizer_lib
from lmtrain.errors import UserError


def resolve_sources(workdir: str, train_data, eval_data, write_demo, what: str):
  """(train files, eval files). `'demo'` means the embedded data that `write_demo(DIR/data)` writes,
  whose held-out split is the eval data unless EVAL_DATA names other files. The readers take local
  files, so for a bucket work dir (gs://...) the demo data goes to a local directory instead."""
  train = [train_data] if isinstance(train_data, str) else list(train_data or [])
  evals = [eval_data] if isinstance(eval_data, str) else list(eval_data or [])
  if train == ["demo"]:
    train_path, eval_path = write_demo(fileio.local_dir(workdir, "data"))
    train, evals = [train_path], ([eval_path] if evals in ([], ["demo"]) else evals)
  if not train:
    raise UserError(f"TRAIN_DATA is empty: name {what} files, or 'demo'")
  return train, evals


def as_list(sources):
  if sources is None:
    return []
  if isinstance(sources, dict):
    return list(sources)
  return [sources] if isinstance(sources, str) else list(sources)


def resolve_text_data(workdir: str, train_data, eval_data):
  """`'demo'` means the embedded corpus (written under DIR/data, or a local directory for a bucket
  work dir); anything else (a source, a list, a {source: weight} mixture) passes through."""
  train, evals = as_list(train_data), as_list(eval_data)
  if not train:
    raise UserError("TRAIN_DATA is empty: name a prepared corpus, text/JSONL/array_record files, "
                    "a 'seqio:TASK', a {source: weight} mixture, or 'demo'")
  if train == ["demo"]:
    train_path, eval_path = demo.write_pretrain_corpus(fileio.local_dir(workdir, "data"))
    train_data = [train_path]
    if evals in ([], ["demo"]):
      eval_data, evals = [eval_path], [eval_path]
  return train_data, (eval_data if evals else None)


def stage_tokenizer(workdir: str, tokenizer: str):
  """A chained stage uses the run's tokenizer: DIR/tokenizer.model for 'auto', else the path."""
  path = os.path.join(workdir, "tokenizer.model") if tokenizer == "auto" else tokenizer
  if not fileio.exists(path):
    raise UserError(f"TOKENIZER={tokenizer!r}: {path} does not exist; run `lmtrain pretrain` in "
                    f"this work dir first, or set --gin.TOKENIZER to a sentencepiece model")
  return tokenizer_lib.Tokenizer.load(path)


def data_factory(make_iterator, sources, tokenizer, loop_cfg, *, train: bool, **kwargs):
  """`Stage.train_data`/`eval_data`: (process_index, process_count) -> this host's iterator;
  shuffled and endless for training, one ordered pass for evaluation."""
  def make(process_index, process_count):
    return make_iterator(
        sources, tokenizer, seq_len=loop_cfg.seq_len, batch_size=loop_cfg.batch_size,
        seed=loop_cfg.seed if train else 0, process_index=process_index,
        process_count=process_count, shuffle=train, num_epochs=None if train else 1, **kwargs)
  return make


def text_corpora(workdir: str, data, tokenizer, *, what: str, on_error: str = "raise"):
  """(prepared corpora, mixture weights or None) of a pretraining-text setting.

  `data` is a source, a list of sources (one corpus: the prepared directories in turn, then the
  raw files as one), or a {source: weight} mixture. A source is a prepared corpus directory (local
  or gs://), raw files or globs (prepared once into DIR/data/prepared/), or "seqio:NAME" (a
  Mixture on its own mixes its Tasks at its rates). Corpora prepared with another tokenizer are a
  one-line error.
  """
  cache = fileio.local_dir(workdir, os.path.join("data", "prepared"))

  def open_group(entries):
    prepared = [e for e in entries if sources_lib.is_prepared(e)]
    raw = [e for e in entries if e not in prepared]
    paths = list(prepared)
    if raw:
      paths.append(prepare.cached_prepare(raw, tokenizer.path, cache, on_error=on_error))
    return [loader.Corpus(p) for p in paths]

  if isinstance(data, dict):
    if not data:
      raise UserError(f"{what} is an empty mixture")
    corpora, weights = [], []
    for source, weight in data.items():
      try:
        weight = float(weight)
      except (TypeError, ValueError):
        raise UserError(f"{what}: weight of {source} must be a number, got {weight!r}") from None
      group = open_group([source])
      corpora.extend(group)
      weights.extend([weight / len(group)] * len(group))
  else:
    entries = [data] if isinstance(data, str) else list(data or [])
    if not entries:
      raise UserError(f"{what} is empty")
    mixture = (seqio_mixture(entries[0][len(sources_lib.SEQIO_PREFIX):])
               if len(entries) == 1 and sources_lib.is_seqio(entries[0]) else None)
    if mixture:
      corpora = [c for task, _ in mixture for c in open_group([f"seqio:{task}"])]
      weights = [rate for _, rate in mixture]
    else:
      corpora, weights = open_group(entries), None
  for corpus in corpora:
    loader.check_tokenizer(corpus, tokenizer, what)
  return corpora, weights


def seqio_mixture(name_and_split: str):
  """The (task, rate) list of a seqio Mixture name (with an optional @SPLIT), None for a Task."""
  from lmtrain.data import seqio_tasks  # pylint: disable=g-import-not-at-top
  name, _, split = name_and_split.partition("@")
  rates = seqio_tasks.mixture_rates(name)
  if rates is None:
    return None
  return [(f"{task}@{split}" if split else task, rate) for task, rate in rates]


def corpus_data_factory(corpora, weights, loop_cfg, *, train: bool):
  """`Stage.train_data`/`eval_data` over prepared corpora: shuffled, mixed and endless for
  training; one ordered pass for evaluation."""
  def make(process_index, process_count):
    return loader.make_iterator(
        corpora, weights=weights if train else None, seq_len=loop_cfg.seq_len,
        batch_size=loop_cfg.batch_size, seed=loop_cfg.seed if train else 0,
        process_index=process_index, process_count=process_count, shuffle=train,
        num_epochs=None if train else 1)
  return make
