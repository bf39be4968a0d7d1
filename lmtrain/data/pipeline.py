"""Grain input pipeline: documents -> tokens -> chunks -> packed or padded rows -> host batches.

The iterator is a grain `DatasetIterator`; its `get_state()` is a small JSON-able dict, so a run
resumes exactly from a checkpoint (see `grain.checkpoint.CheckpointSave/CheckpointRestore`).
"""

import glob
import math
import os

import grain
import numpy as np

from lmtrain.data import formats
from lmtrain.data import seqio_tasks
from lmtrain.data.tokenizer import PAD_ID
from lmtrain.errors import UserError

SEQIO_PREFIX = "seqio:"


def expand_source(source: str) -> list[str]:
  """Files of one source entry: a path, a glob pattern, or a seqio name (kept as is)."""
  if source.startswith(SEQIO_PREFIX) or os.path.exists(source):
    return [source]
  if glob.has_magic(source):
    matches = sorted(glob.glob(source))
    if not matches:
      raise UserError(f"{source}: no files match")
    return matches
  raise UserError(f"{source}: file not found")


def load_documents(sources: list[str] | str, *, on_error: str = "raise",
                   counter: formats.SkipCounter | None = None) -> list[str]:
  """All documents of `sources`, in order: files, glob patterns, or "seqio:NAME[@SPLIT]"."""
  if isinstance(sources, str):
    sources = [sources]
  if not sources:
    raise UserError("no data sources given")
  docs = []
  for source in sources:
    for path in expand_source(source):
      if path.startswith(SEQIO_PREFIX):
        name, _, split = path[len(SEQIO_PREFIX):].partition("@")
        docs.extend(seqio_tasks.seqio_documents(name, split=split or "train"))
      else:
        docs.extend(formats.iter_text_records(path, on_error=on_error, counter=counter))
  return docs


def document_ids(tokenizer, text: str) -> np.ndarray:
  """[BOS] + encode(text) + [EOS] as int32."""
  return np.asarray([tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id], np.int32)


def chunk_ids(ids: np.ndarray, seq_len: int) -> list[dict[str, np.ndarray]]:
  """Splits ids into chunks of <= seq_len + 1 tokens overlapping by one, as inputs/targets.

  The overlap makes every token after the first a target exactly once.
  """
  chunks = (ids[start:start + seq_len + 1] for start in range(0, len(ids) - 1, seq_len))
  return [{"inputs": chunk[:-1], "targets": chunk[1:]} for chunk in chunks]


class _Tokenize(grain.transforms.Map):

  def __init__(self, tokenizer):
    self._tokenizer = tokenizer

  def map(self, element):
    return document_ids(self._tokenizer, element)


class _Chunk(grain.experimental.FlatMapTransform):

  def __init__(self, seq_len: int):
    self._seq_len = seq_len
    self.max_fan_out = 1  # Unused by the IterDataset flat map; documents may be any length.

  def flat_map(self, element):
    return chunk_ids(element, self._seq_len)


def _loss_mask(element, real: np.ndarray) -> np.ndarray:
  """The chunk's own loss weights when it has them (SFT), else 1.0 on every real target."""
  return element["loss_mask"] if "loss_mask" in element else real


def _from_packed(row):
  segment_ids = row["inputs_segment_ids"]
  return {
      "inputs": row["inputs"].astype(np.int32),
      "targets": row["targets"].astype(np.int32),
      "segment_ids": segment_ids.astype(np.int32),
      "positions": row["inputs_positions"].astype(np.int32),
      "loss_mask": _loss_mask(row, segment_ids > 0).astype(np.float32),
  }


class _Pad(grain.transforms.Map):
  """One chunk per row, right-padded with PAD_ID."""

  def __init__(self, seq_len: int):
    self._seq_len = seq_len

  def map(self, element):
    n = len(element["inputs"])
    pad = self._seq_len - n
    real = np.ones(n, np.int32)
    return {
        "inputs": np.pad(element["inputs"], (0, pad), constant_values=PAD_ID),
        "targets": np.pad(element["targets"], (0, pad), constant_values=PAD_ID),
        "segment_ids": np.pad(real, (0, pad)),
        "positions": np.pad(np.arange(n, dtype=np.int32), (0, pad)),
        "loss_mask": np.pad(_loss_mask(element, real).astype(np.float32), (0, pad)),
    }


def host_rows(*, seq_len: int, batch_size: int, process_index: int, process_count: int) -> int:
  """Rows per host batch, after checking the shape arguments."""
  if seq_len < 1:
    raise UserError(f"seq_len must be positive, got {seq_len}")
  if batch_size < 1 or batch_size % process_count:
    raise UserError(f"batch_size {batch_size} is not a positive multiple of the "
                    f"process count {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return batch_size // process_count


def make_text_dataset(sources: list[str] | str, tokenizer, *, seq_len: int, batch_size: int,
                      seed: int, process_index: int = 0, process_count: int = 1,
                      shuffle: bool = True, num_epochs: int | None = None, pack: bool = True,
                      on_error: str = "raise",
                      counter: formats.SkipCounter | None = None) -> grain.IterDataset:
  """The per-host pretraining dataset: dicts of arrays [batch_size // process_count, seq_len].

  Features: inputs, targets, segment_ids (1, 2, ... per segment, 0 = padding), positions
  (restarting at 0 per segment) as int32, and loss_mask (1.0 on real targets) as float32.
  num_epochs=None repeats forever; each epoch has its own shuffled order. on_error="skip"
  skips bad records (counted in `counter`) instead of raising UserError.
  """
  rows = host_rows(seq_len=seq_len, batch_size=batch_size, process_index=process_index,
                   process_count=process_count)
  docs = load_documents(sources, on_error=on_error, counter=counter)
  ds = grain.MapDataset.source(docs)[process_index::process_count]
  if len(ds) == 0:
    raise UserError(f"{len(docs)} documents cannot feed {process_count} processes")
  if shuffle:
    ds = ds.shuffle(seed)
  ds = ds.repeat(num_epochs).map(_Tokenize(tokenizer))
  # Tokenizing happens in a small thread pool ahead of the consumer.
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=64))
  ds = grain.experimental.FlatMapIterDataset(ds, _Chunk(seq_len))
  return batch_chunks(ds, seq_len=seq_len, rows=rows, seed=seed, shuffle=shuffle, pack=pack)


def batch_chunks(ds: grain.IterDataset, *, seq_len: int, rows: int, seed: int, shuffle: bool,
                 pack: bool, features: tuple[str, ...] = ("inputs", "targets")
                 ) -> grain.IterDataset:
  """Chunks of <= seq_len tokens -> packed or padded rows -> batches of `rows`, prefetched.

  `features` are the per-token arrays of a chunk; a "loss_mask" among them is kept (0 on
  padding), otherwise the mask is 1.0 on every real target.
  """
  if pack:
    # First-fit packing pads rather than splits, so a chunk is never cut across rows. Its fill
    # value 0 is PAD_ID (and loss weight 0).
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct={name: seq_len for name in features},
        num_packing_bins=max(rows, 8), seed=seed, shuffle_bins=shuffle)
    ds = ds.map(_from_packed)
  else:
    ds = ds.map(_Pad(seq_len))
  ds = ds.batch(rows, drop_remainder=True)
  return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=2)


def make_iterator(sources: list[str] | str, tokenizer, **kwargs) -> grain.DatasetIterator:
  """An iterator over `make_text_dataset(sources, tokenizer, **kwargs)` with get/set_state."""
  return iter(make_text_dataset(sources, tokenizer, **kwargs))


def _target_counts(sources, tokenizer) -> np.ndarray:
  counts = np.zeros(tokenizer.vocab_size, np.int64)
  for text in load_documents(sources):
    counts += np.bincount(document_ids(tokenizer, text)[1:], minlength=tokenizer.vocab_size)
  return counts


def unigram_perplexity(train_sources, eval_sources, tokenizer) -> float:
  """Perplexity of the eval targets under add-one-smoothed unigram counts of the train targets.

  Targets are every token after BOS (text tokens and EOS), as the model predicts them. A trained
  model that does not beat this has learned nothing beyond token frequencies.
  """
  train = _target_counts(train_sources, tokenizer)
  evals = _target_counts(eval_sources, tokenizer)
  log_p = np.log((train + 1) / (train.sum() + tokenizer.vocab_size))
  return math.exp(-float((evals * log_p).sum()) / evals.sum())

