"""Supervised fine-tuning data: records, chat template, loss-masked encoding, grain pipeline.

Three record forms (JSONL or array_record), each normalised to a tuple of (role, content) turns:
  {"prompt": str, "response": str}
  {"instruction": str, "input": str (optional), "output": str}            (Alpaca)
  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}  (chat)
The whole record stays with its turns, so extra fields ("answer", "task") reach scorers and eval.

Loss is on assistant tokens only. The tokenizer has no special tokens beyond pad/eos/bos/unk, so the
template marks turns with plain text and ends each assistant turn with the EOS id. Text is encoded
in runs that never cross a loss boundary: the template and non-assistant text between two assistant
turns is one run, each assistant content another, so the mask is exact and a generation prompt is
a token prefix of the training example that continues it.
"""

import dataclasses
import functools
import logging
from typing import Any, Iterator, Sequence

import gin
import grain
import numpy as np

from lmtrain.data import formats
from lmtrain.data import batching
from lmtrain.data import sources as sources_lib
from lmtrain.errors import UserError

ROLES = ("system", "user", "assistant")
CONTENT = "{content}"

Turn = tuple[str, str]


@dataclasses.dataclass(frozen=True)
class Example:
  """One SFT record: its turns and the whole parsed record (extra fields included)."""

  turns: tuple[Turn, ...]
  record: dict[str, Any]

  @property
  def prompt_turns(self) -> tuple[Turn, ...]:
    """The turns before the final assistant turn (all of them when there is none)."""
    return self.turns[:-1] if self.turns[-1][0] == "assistant" else self.turns

  @property
  def response(self) -> str | None:
    """The final assistant turn's content, or None when the record has no response."""
    role, content = self.turns[-1]
    return content if role == "assistant" else None


def _optional_str(record: dict[str, Any], field: str) -> str | None:
  return formats.require_str(record, field) if field in record else None


def _chat_turns(messages: Any) -> list[Turn]:
  if not isinstance(messages, list):
    raise formats.BadRecord(f'"messages" must be a list, got {type(messages).__name__}')
  turns = []
  for i, message in enumerate(messages):
    where = f"messages[{i}]"
    if not isinstance(message, dict):
      raise formats.BadRecord(f"{where}: expected an object, got {type(message).__name__}")
    try:
      role = formats.require_str(message, "role")
      content = formats.require_str(message, "content")
    except formats.BadRecord as e:
      raise formats.BadRecord(f"{where}: {e}") from None
    if role not in ROLES:
      raise formats.BadRecord(f'{where}: role must be one of {", ".join(ROLES)}, got "{role}"')
    turns.append((role, content))
  return turns


def parse_record(record: dict[str, Any], *, training: bool = True) -> Example:
  """The Example of one parsed JSON record; raises BadRecord saying what is wrong.

  training=True needs a response to learn (a chat must end with an assistant turn);
  training=False also accepts prompts alone, for generation and scoring.
  """
  if "messages" in record:
    turns = _chat_turns(record["messages"])
    roles = [role for role, _ in turns]
    if training and "assistant" not in roles:
      raise formats.BadRecord('"messages" has no assistant turn')
    if training and roles[-1] != "assistant":
      raise formats.BadRecord(f'the last turn must be "assistant" to train on, got "{roles[-1]}"')
    if not turns:
      raise formats.BadRecord('"messages" is empty')
  elif "instruction" in record:
    instruction = formats.require_str(record, "instruction")
    extra = _optional_str(record, "input")
    turns = [("user", f"{instruction}\n\n{extra}" if extra else instruction)]
    output = formats.require_str(record, "output") if training else _optional_str(record, "output")
    if output is not None:
      turns.append(("assistant", output))
  elif "prompt" in record:
    turns = [("user", formats.require_str(record, "prompt"))]
    response = (formats.require_str(record, "response") if training
                else _optional_str(record, "response"))
    if response is not None:
      turns.append(("assistant", response))
  else:
    raise formats.BadRecord('expected "prompt" and "response", "instruction" and "output", '
                            'or "messages" fields')
  return Example(tuple(turns), record)


def iter_sft_records(path: str, *, training: bool = True, on_error: str = "raise",
                     counter: formats.SkipCounter | None = None) -> Iterator[Example]:
  """Yields the Examples of a JSONL or array_record file, reporting `FILE:LINE: what is wrong`."""
  schema = functools.partial(parse_record, training=training)
  return formats.iter_records(path, schema, on_error=on_error, counter=counter)


def load_examples(sources: Sequence[str] | str, *, training: bool = True,
                  on_error: str = "raise",
                  counter: formats.SkipCounter | None = None) -> list[Example]:
  """All Examples of `sources` (files or glob patterns), in order."""
  if isinstance(sources, str):
    sources = [sources]
  if not sources:
    raise UserError("no data sources given")
  examples = []
  for source in sources:
    for path in sources_lib.expand_source(source):
      if path.startswith(sources_lib.SEQIO_PREFIX):
        raise UserError(f"{path}: seqio sources are not supported for SFT data; give JSONL or "
                        "array_record files")
      examples.extend(iter_sft_records(path, training=training, on_error=on_error,
                                       counter=counter))
  return examples


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """Plain-text turn markers. `{content}` stands for a turn's text; an assistant turn is
  `assistant_prefix`, its content, then the EOS id."""

  system: str = "<|system|>\n{content}\n"
  user: str = "<|user|>\n{content}\n"
  assistant_prefix: str = "<|assistant|>\n"

  def __post_init__(self):
    for role in ("system", "user"):
      if getattr(self, role).count(CONTENT) != 1:
        raise UserError(f"ChatTemplate.{role} must contain {CONTENT} exactly once, got "
                        f"{getattr(self, role)!r}")

  def format(self, role: str, content: str) -> str:
    """The text of a system or user turn."""
    before, _, after = getattr(self, role).partition(CONTENT)
    return before + content + after

  def runs(self, turns: Sequence[Turn], *,
           generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """(text, is_response) runs of `turns`: template and non-assistant text merged up to each
    assistant content, which is a run of its own. generation_prompt=True ends with the
    assistant prefix of the next turn."""
    runs = []
    text = ""
    for role, content in turns:
      if role == "assistant":
        runs.append((text + self.assistant_prefix, False))
        runs.append((content, True))
        text = ""
      else:
        text += self.format(role, content)
    if generation_prompt:
      text += self.assistant_prefix
    if text:
      runs.append((text, False))
    return runs


def _encode_runs(runs: list[tuple[str, bool]], tokenizer) -> tuple[np.ndarray, np.ndarray]:
  ids, mask = [tokenizer.bos_id], [0.0]
  for text, is_response in runs:
    piece = tokenizer.encode(text) + ([tokenizer.eos_id] if is_response else [])
    ids.extend(piece)
    mask.extend([float(is_response)] * len(piece))
  return np.asarray(ids, np.int32), np.asarray(mask, np.float32)


def encode_example(turns: Sequence[Turn], tokenizer,
                   template: ChatTemplate | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(ids, loss_mask) of a training example: [BOS] + the template-rendered turns.

  loss_mask is 1.0 exactly on assistant content tokens and the EOS closing each assistant turn.
  The model trains on inputs = ids[:-1], targets = ids[1:] weighted by loss_mask[1:].
  """
  return _encode_runs((template or ChatTemplate()).runs(turns), tokenizer)


def encode_prompt(turns: Sequence[Turn], tokenizer,
                  template: ChatTemplate | None = None) -> np.ndarray:
  """Ids to generate the next assistant turn from: [BOS] + turns + the assistant prefix.

  encode_example(turns + [("assistant", r)]) starts with exactly these ids.
  """
  runs = (template or ChatTemplate()).runs(turns, generation_prompt=True)
  return _encode_runs(runs, tokenizer)[0]


@dataclasses.dataclass
class FitCounts:
  """What fitting examples into seq_len + 1 tokens did."""

  kept: int = 0
  truncated: int = 0  # Kept, cut to their first seq_len + 1 tokens.
  dropped: int = 0  # None of the response fitted.


def fit_example(ids: np.ndarray, loss_mask: np.ndarray,
                seq_len: int) -> dict[str, np.ndarray] | None:
  """{inputs, targets, loss_mask} of the first seq_len + 1 ids, or None if no target is trained."""
  ids, loss_mask = ids[:seq_len + 1], loss_mask[:seq_len + 1]
  if not loss_mask[1:].any():
    return None
  return {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": loss_mask[1:]}


def encode_examples(examples: Sequence[Example], tokenizer, *, seq_len: int,
                    template: ChatTemplate | None = None
                    ) -> tuple[list[dict[str, np.ndarray]], FitCounts]:
  """Encodes and fits every example; logs a warning when some were truncated or dropped."""
  template = template or ChatTemplate()
  chunks, counts = [], FitCounts()
  for example in examples:
    ids, loss_mask = encode_example(example.turns, tokenizer, template)
    chunk = fit_example(ids, loss_mask, seq_len)
    if chunk is None:
      counts.dropped += 1
      continue
    counts.kept += 1
    counts.truncated += len(ids) > seq_len + 1
    chunks.append(chunk)
  if counts.truncated or counts.dropped:
    logging.warning("SFT examples longer than seq_len + 1 = %d tokens: %d of %d truncated (start "
                    "kept), %d dropped (no response token fitted)", seq_len + 1,
                    counts.truncated, len(examples), counts.dropped)
  return chunks, counts


def make_sft_dataset(sources: Sequence[str] | str, tokenizer, *, seq_len: int, batch_size: int,
                     seed: int, process_index: int = 0, process_count: int = 1,
                     shuffle: bool = True, num_epochs: int | None = None, pack: bool = True,
                     on_error: str = "raise", template: ChatTemplate | None = None,
                     counter: formats.SkipCounter | None = None,
                     info: dict | None = None) -> grain.IterDataset:
  """The per-host SFT dataset, with the features of `batching.batch_chunks`.

  One example per segment (packed several to a row, or one per row with pack=False); loss_mask
  is 1.0 only on response targets. Each host encodes its own share of the examples up front,
  so truncation counts are known (and logged) before the first batch. `info`, if given, gets the
  number of examples in all (`examples`) for the run's start-up block.
  """
  rows = batching.host_rows(seq_len=seq_len, batch_size=batch_size, process_index=process_index,
                            process_count=process_count)
  examples = load_examples(sources, on_error=on_error, counter=counter)
  if info is not None:
    info["examples"] = len(examples)
  mine = examples[process_index::process_count]
  if not mine:
    raise UserError(f"{len(examples)} SFT examples cannot feed {process_count} processes")
  chunks, _ = encode_examples(mine, tokenizer, seq_len=seq_len, template=template)
  if not chunks:
    raise UserError(f"no SFT example has a response token within seq_len={seq_len}")
  ds = grain.MapDataset.source(chunks)
  if shuffle:
    ds = ds.shuffle(seed)
  # Already tokenized: reading needs no thread pool.
  ds = ds.repeat(num_epochs).to_iter_dataset(grain.ReadOptions(num_threads=0))
  return batching.batch_chunks(ds, seq_len=seq_len, rows=rows, seed=seed, shuffle=shuffle,
                               pack=pack, features=("inputs", "targets", "loss_mask"))


def make_sft_iterator(sources: Sequence[str] | str, tokenizer,
                      **kwargs) -> grain.DatasetIterator:
  """An iterator over `make_sft_dataset(sources, tokenizer, **kwargs)` with get/set_state."""
  return iter(make_sft_dataset(sources, tokenizer, **kwargs))
