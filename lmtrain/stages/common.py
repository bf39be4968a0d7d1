"""What every stage's `build` needs: its sources (or the demo data), the run's tokenizer, and
per-host data iterators for the loop."""

import os

from lmtrain import fileio
from lmtrain.data import tokenizer as tokenizer_lib
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
