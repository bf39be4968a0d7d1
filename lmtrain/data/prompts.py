"""Prompts for PPO and GRPO rollouts: records, encoding, and the grain pipeline.

Records (JSONL or array_record, one per line) are the SFT forms without a response:
  {"prompt": str, ...}, Alpaca {"instruction", "input"}, or chat {"messages": [...]} ending in a
  user turn; any other fields ("answer", "task") stay with the record for rule-based scorers.
Each prompt is rendered with the SFT chat template up to the assistant prefix, so the policy
continues exactly where its SFT examples had their response.

A batch row is the prompt left-padded to `prompt_len` (the response a rollout appends then follows
it directly), its length and its index in the whole prompt list, by which every host finds the
record that scores the row's response.
"""

import json
import logging
from collections.abc import Sequence

import grain
import numpy as np

from lmtrain.data import batching, sft
from lmtrain.errors import UserError


def load_prompts(sources: Sequence[str] | str, *, on_error: str = "raise") -> list[sft.Example]:
  """Every prompt record of `sources`, in order (a record's response, if any, is ignored)."""
  return sft.load_examples(sources, training=False, on_error=on_error)


def encode_prompts(examples: Sequence[sft.Example], tokenizer, prompt_len: int,
                   template: sft.ChatTemplate | None = None) -> list[dict[str, np.ndarray]]:
  """Rows {prompt [prompt_len] left-padded, prompt_length, index}. A prompt longer than prompt_len
  keeps its end (the assistant prefix the response follows) and loses its start; logged."""
  if prompt_len < 2:
    raise UserError(f"PROMPT_LEN={prompt_len}: a prompt needs at least 2 tokens")
  rows, cut = [], 0
  for index, example in enumerate(examples):
    ids = sft.encode_prompt(example.prompt_turns, tokenizer, template)
    cut += len(ids) > prompt_len
    ids = ids[-prompt_len:]
    prompt = np.full(prompt_len, tokenizer.pad_id, np.int32)
    prompt[prompt_len - len(ids):] = ids
    rows.append({"prompt": prompt, "prompt_length": np.int32(len(ids)),
                 "index": np.int32(index)})
  if cut:
    logging.warning("%d of %d prompts are longer than PROMPT_LEN=%d tokens: their start was cut",
                    cut, len(examples), prompt_len)
  return rows


class _Repeat(grain.transforms.Map):
  """Each field of a batch repeated `n` times along its rows (GRPO's samples per prompt)."""

  def __init__(self, n: int):
    self.n = n

  def map(self, batch):
    return {k: np.repeat(v, self.n, axis=0) for k, v in batch.items()}


def make_prompt_iterator(sources, tokenizer, *, prompt_len: int, batch_size: int, seed: int,
                         process_index: int = 0, process_count: int = 1, shuffle: bool = True,
                         num_epochs: int | None = None, on_error: str = "raise", template=None,
                         group_size: int = 1):
  """Per-host batches {prompt [rows, prompt_len], prompt_length [rows], index [rows]}.

  With group_size G > 1 each prompt fills G consecutive rows (rows must divide by G). Indices
  refer to `load_prompts(sources)`; each host draws from its own share of the prompts. Deterministic
  by seed, with get/set_state for resume.
  """
  rows = batching.host_rows(seq_len=prompt_len, batch_size=batch_size,
                            process_index=process_index, process_count=process_count)
  if group_size < 1 or rows % group_size:
    raise UserError(f"BATCH_SIZE={batch_size} ({rows} per host) is not a multiple of "
                    f"GROUP_SIZE={group_size}")
  encoded = encode_prompts(load_prompts(sources, on_error=on_error), tokenizer, prompt_len,
                           template)
  mine = encoded[process_index::process_count]
  if not mine:
    raise UserError(f"{len(encoded)} prompts cannot feed {process_count} processes")
  ds = grain.MapDataset.source(mine)
  if shuffle:
    ds = ds.shuffle(seed)
  ds = ds.repeat(num_epochs).batch(rows // group_size, drop_remainder=True)
  if group_size > 1:
    ds = ds.map(_Repeat(group_size))
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)))


class ZipIterator:
  """A main grain iterator's batches with other iterators' batches merged in under prefixed keys
  (`{name}_{key}`), and one checkpointable state (JSON of the parts' states): e.g. PPO prompts plus
  the PPO-ptx language-model rows."""

  def __init__(self, main, **others):
    self.iterators = {"main": main, **others}

  def __iter__(self):
    return self

  def __next__(self):
    batch = dict(next(self.iterators["main"]))
    for name, it in self.iterators.items():
      if name != "main":
        batch.update({f"{name}_{k}": v for k, v in next(it).items()})
    return batch

  def get_state(self) -> bytes:
    return json.dumps({name: it.get_state() for name, it in self.iterators.items()}).encode()

  def set_state(self, state: bytes):
    states = json.loads(state)
    for name, it in self.iterators.items():
      it.set_state(states[name])

  def start_prefetch(self):
    for it in self.iterators.values():
      start = getattr(it, "start_prefetch", None)
      if start is not None:
        start()

  def close(self):
    for it in self.iterators.values():
      close = getattr(it, "close", None)
      if close is not None:
        close()
