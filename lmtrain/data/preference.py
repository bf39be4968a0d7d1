"""Preference pairs for reward models and DPO: records, encoding, and the grain pipeline.

Records (JSONL or array_record, one per line):
  {"prompt": str, "chosen": str, "rejected": str, "margin": float (optional)}
  HH-RLHF style {"chosen": dialogue, "rejected": dialogue}: each a whole "\\n\\nHuman: ...\\n\\nAssistant:
  ..." dialogue that differs only in the final assistant turn.
Both sides are rendered with the SFT chat template, so the reward model reads the same text the policy
writes; each side's last real token is its EOS, where the score is read.
"""

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from lmtrain.data import batching, formats, sft
from lmtrain.data import sources as sources_lib
from lmtrain.errors import UserError

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclasses.dataclass(frozen=True)
class Pair:
  prompt_turns: tuple[sft.Turn, ...]
  chosen: str
  rejected: str
  margin: float
  record: dict[str, Any]


def _hh_turns(dialogue: str, side: str) -> list[sft.Turn]:
  parts = _HH_TURN.split(dialogue)
  if len(parts) < 3 or parts[0].strip():
    raise formats.BadRecord(f'"{side}" is not a "\\n\\nHuman: ... \\n\\nAssistant: ..." dialogue')
  turns = [("user" if who == "Human" else "assistant", text.strip())
           for who, text in zip(parts[1::2], parts[2::2])]
  if turns[-1][0] != "assistant":
    raise formats.BadRecord(f'"{side}" must end with an Assistant turn')
  return turns


def parse_pair(record: dict[str, Any]) -> Pair:
  margin = record.get("margin", 0.0)
  if not isinstance(margin, (int, float)) or isinstance(margin, bool):
    raise formats.BadRecord(f'"margin" must be a number, got {type(margin).__name__}')
  chosen, rejected = formats.require_str(record, "chosen"), formats.require_str(record, "rejected")
  if "prompt" in record:
    if chosen.strip() == rejected.strip():
      raise formats.BadRecord('"chosen" and "rejected" are the same response: the pair says nothing')
    return Pair((("user", formats.require_str(record, "prompt")),), chosen, rejected,
                float(margin), record)
  chosen_turns, rejected_turns = _hh_turns(chosen, "chosen"), _hh_turns(rejected, "rejected")
  if chosen_turns[:-1] != rejected_turns[:-1]:
    raise formats.BadRecord('"chosen" and "rejected" dialogues differ before their last turn')
  if chosen_turns[-1][1].strip() == rejected_turns[-1][1].strip():
    raise formats.BadRecord('"chosen" and "rejected" are the same response: the pair says nothing')
  return Pair(tuple(chosen_turns[:-1]), chosen_turns[-1][1], rejected_turns[-1][1],
              float(margin), record)


def load_pairs(sources: Sequence[str] | str, *, on_error: str = "raise") -> list[Pair]:
  sources = [sources] if isinstance(sources, str) else list(sources)
  if not sources:
    raise UserError("no preference data sources given")
  pairs = []
  for source in sources:
    for path in sources_lib.expand_source(source):
      pairs.extend(formats.iter_records(path, parse_pair, on_error=on_error))
  return pairs


def fit_pair(prompt, responses, seq_len: int):
  """(prompt ids, [response ids]) cut so that the prompt plus the longest response fit seq_len, the
  prompt the same for every response: responses lose their end first, down to half of seq_len (or
  their own length), then the prompt loses its start (its end, the assistant prefix the responses
  follow, stays)."""
  longest = max(len(r) for r in responses)
  if len(prompt) + longest <= seq_len:
    return prompt, responses
  budget = max(seq_len - len(prompt), min(longest, seq_len // 2))
  return prompt[len(prompt) - (seq_len - budget):], [r[:budget] for r in responses]


def encode_sides(turns, responses, tokenizer, template, seq_len: int):
  """[(tokens [seq_len] right-padded, response mask [seq_len], real-token count)] for each response
  after the same prompt turns (fit_pair cuts long ones). The mask is 1 on the response's tokens and
  its EOS, where a reward model reads its score (the last real token, if the cut took the EOS)."""
  prompt = sft.encode_prompt(list(turns), tokenizer, template)
  tails = []
  for response in responses:
    ids, _ = sft.encode_example(list(turns) + [("assistant", response)], tokenizer, template)
    tails.append(ids[len(prompt):])
  prompt, tails = fit_pair(prompt, tails, seq_len)
  out = []
  for tail in tails:
    tokens = np.full(seq_len, tokenizer.pad_id, np.int32)
    mask = np.zeros(seq_len, np.float32)
    n = len(prompt) + len(tail)
    tokens[:n] = np.concatenate([prompt, tail])
    mask[len(prompt):n] = 1.0
    out.append((tokens, mask, n))
  return out


def encode_pair(pair: Pair, tokenizer, template, seq_len: int) -> dict[str, np.ndarray]:
  row = {"margin": np.float32(pair.margin)}
  sides = encode_sides(pair.prompt_turns, (pair.chosen, pair.rejected), tokenizer, template,
                       seq_len)
  for side, (tokens, response, n) in zip(("chosen", "rejected"), sides):
    row[f"{side}_inputs"] = tokens
    row[f"{side}_loss_mask"] = response
    row[f"{side}_segment_ids"] = (np.arange(seq_len) < n).astype(np.int32)
    row[f"{side}_positions"] = np.arange(seq_len, dtype=np.int32)
  return row


def make_preference_iterator(sources, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                             process_index: int = 0, process_count: int = 1, shuffle: bool = True,
                             num_epochs: int | None = None, on_error: str = "raise",
                             template=None, info: dict | None = None):
  """Per-host batches of pairs: `{side}_inputs/_loss_mask/_segment_ids/_positions` [rows, seq_len]
  for side in chosen, rejected (inputs are whole sequences, EOS included), and `margin` [rows];
  deterministic by seed, with get/set_state for resume. `info`, if given, gets the number of pairs
  in all (`examples`) for the run's start-up block."""
  rows = batching.host_rows(seq_len=seq_len, batch_size=batch_size, process_index=process_index,
                            process_count=process_count)
  template = template or sft.ChatTemplate()
  pairs = load_pairs(sources, on_error=on_error)
  if info is not None:
    info["examples"] = len(pairs)
  pairs = pairs[process_index::process_count]
  if not pairs:
    raise UserError(f"no preference pairs for process {process_index} of {process_count}")
  encoded = [encode_pair(p, tokenizer, template, seq_len) for p in pairs]
  ds = grain.MapDataset.source(encoded)
  if shuffle:
    ds = ds.shuffle(seed)
  ds = ds.repeat(num_epochs).batch(rows, drop_remainder=True)  # every batch fills the mesh
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)))
