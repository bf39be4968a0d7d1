"""Preference data for reward models and DPO: pairs and K-wise rankings, their encoding, and
the grain pipelines.

Records (JSONL or array_record, one per line):
  {"prompt": str, "chosen": str, "rejected": str, "margin": float (optional)}
  HH-RLHF style {"chosen": dialogue, "rejected": dialogue}: each a whole "\\n\\nHuman: ...
  \\n\\nAssistant: ..." dialogue that differs only in the final assistant turn.
  {"prompt": str, "responses": [str, ...], "ranking": [int, ...], "margin": float (optional)}:
  K >= 2 distinct responses (one may be empty), ranking[i] the rank of responses[i] (1 the best; equal
  ranks tie; ranks need not be dense), as `lmtrain label export` writes them.
Other fields (a rater, a timestamp, an answer) are ignored. A pair is a ranking of two: chosen
rank 1, rejected rank 2. The reward model reads rankings, each one example
(make_ranking_iterator); DPO reads pairs, a ranking giving each of its ordered pairs that is not a
tie (make_pair_iterator). Every response is rendered with the SFT chat template after the same
prompt, so the reward model reads the same text the policy writes; each response's last real
token is its EOS, where the score is read.
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


@dataclasses.dataclass(frozen=True)
class Ranking:
  """A prompt's responses ranked: ranks[i] is the rank of responses[i], 1 the best, equal ranks a
  tie."""
  prompt_turns: tuple[sft.Turn, ...]
  responses: tuple[str, ...]
  ranks: tuple[int, ...]
  margin: float
  record: dict[str, Any]

  def pairs(self) -> list[Pair]:
    """Its ordered (better, worse) pairs, ties left out, the best responses' first; a pair
    record's own pair."""
    order = sorted(range(len(self.ranks)), key=lambda i: self.ranks[i])
    return [Pair(self.prompt_turns, self.responses[i], self.responses[j], self.margin, self.record)
            for i in order for j in order if self.ranks[i] < self.ranks[j]]


def _hh_turns(dialogue: str, side: str) -> list[sft.Turn]:
  parts = _HH_TURN.split(dialogue)
  if len(parts) < 3 or parts[0].strip():
    raise formats.BadRecord(f'"{side}" is not a "\\n\\nHuman: ... \\n\\nAssistant: ..." dialogue')
  turns = [("user" if who == "Human" else "assistant", text.strip())
           for who, text in zip(parts[1::2], parts[2::2])]
  if turns[-1][0] != "assistant":
    raise formats.BadRecord(f'"{side}" must end with an Assistant turn')
  return turns


def _margin(record: dict[str, Any]) -> float:
  margin = record.get("margin", 0.0)
  if not isinstance(margin, (int, float)) or isinstance(margin, bool):
    raise formats.BadRecord(f'"margin" must be a number, got {type(margin).__name__}')
  return float(margin)


def parse_pair(record: dict[str, Any]) -> Pair:
  margin = _margin(record)
  chosen, rejected = formats.require_str(record, "chosen"), formats.require_str(record, "rejected")
  if "prompt" in record:
    if chosen.strip() == rejected.strip():
      raise formats.BadRecord('"chosen" and "rejected" are the same response: the pair says nothing')
    return Pair((("user", formats.require_str(record, "prompt")),), chosen, rejected, margin,
                record)
  chosen_turns, rejected_turns = _hh_turns(chosen, "chosen"), _hh_turns(rejected, "rejected")
  if chosen_turns[:-1] != rejected_turns[:-1]:
    raise formats.BadRecord('"chosen" and "rejected" dialogues differ before their last turn')
  if chosen_turns[-1][1].strip() == rejected_turns[-1][1].strip():
    raise formats.BadRecord('"chosen" and "rejected" are the same response: the pair says nothing')
  return Pair(tuple(chosen_turns[:-1]), chosen_turns[-1][1], rejected_turns[-1][1], margin,
              record)


def _parse_ranking(record: dict[str, Any]) -> Ranking:
  prompt = formats.require_str(record, "prompt")
  for field in ("responses", "ranking"):
    if field not in record:
      raise formats.BadRecord(f'missing "{field}" field')
  responses, ranks = record["responses"], record["ranking"]
  if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
    raise formats.BadRecord('"responses" must be a list of strings')
  # bool is an int to Python, and 1.0 is a float: neither is a rank.
  if not isinstance(ranks, list) or not all(type(r) is int for r in ranks):
    raise formats.BadRecord(f'"ranking" must be a list of integer ranks (1 = best), got '
                            f'{str(ranks)[:60]}')
  if len(responses) < 2:
    raise formats.BadRecord(f'"responses" holds {len(responses)}: a ranking needs at least 2')
  if len(ranks) != len(responses):
    raise formats.BadRecord(f'"ranking" has {len(ranks)} ranks for {len(responses)} responses')
  if min(ranks) < 1:
    raise formats.BadRecord(f'"ranking" holds rank {min(ranks)}: ranks start at 1 (the best)')
  seen = {}
  # An empty response stays: a policy that answers nothing at once is a failure raters rank last
  # (scored as the prompt and its EOS).
  for i, response in enumerate(responses):
    text = response.strip()
    if text in seen:
      raise formats.BadRecord(f'responses[{seen[text]}] and responses[{i}] are the same response')
    seen[text] = i
  if len(set(ranks)) == 1:
    raise formats.BadRecord('every response ties: the ranking says nothing')
  return Ranking((("user", prompt),), tuple(responses), tuple(ranks), _margin(record), record)


def parse_record(record: dict[str, Any]) -> Ranking:
  """A ranking record, or a pair record as a ranking of two."""
  if "responses" in record or "ranking" in record:
    if "chosen" in record or "rejected" in record:
      raise formats.BadRecord('both "responses"/"ranking" and "chosen"/"rejected": a record is '
                              'either a ranking or a pair')
    return _parse_ranking(record)
  pair = parse_pair(record)
  return Ranking(pair.prompt_turns, (pair.chosen, pair.rejected), (1, 2), pair.margin, record)


def load_rankings(sources: Sequence[str] | str, *, on_error: str = "raise") -> list[Ranking]:
  """Every record of the sources, pairs as rankings of two."""
  sources = [sources] if isinstance(sources, str) else list(sources)
  if not sources:
    raise UserError("no preference data sources given")
  rankings = []
  for source in sources:
    for path in sources_lib.expand_source(source):
      rankings.extend(formats.iter_records(path, parse_record, on_error=on_error))
  return rankings


def load_pairs(sources: Sequence[str] | str, *, on_error: str = "raise") -> list[Pair]:
  """Every pair record, and the ordered pairs of every ranking (ties left out)."""
  return [pair for ranking in load_rankings(sources, on_error=on_error)
          for pair in ranking.pairs()]


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


def encode_ranking(ranking: Ranking, tokenizer, template, seq_len: int,
                   num_responses: int) -> dict[str, np.ndarray]:
  """One reward-model example: `inputs`, `loss_mask`, `segment_ids`, `positions` [num_responses,
  seq_len] (each response after the same prompt, as encode_sides gives them), `ranks` and `valid`
  [num_responses], `margin`. Rows past the ranking's own responses are padding: valid 0, segment 0,
  rank 0."""
  k = len(ranking.responses)
  if k > num_responses:
    raise ValueError(f"a ranking of {k} responses in examples of {num_responses}")
  row = {"inputs": np.full((num_responses, seq_len), tokenizer.pad_id, np.int32),
         "loss_mask": np.zeros((num_responses, seq_len), np.float32),
         "segment_ids": np.zeros((num_responses, seq_len), np.int32),
         "positions": np.zeros((num_responses, seq_len), np.int32),
         "ranks": np.zeros(num_responses, np.int32), "valid": np.zeros(num_responses, np.float32),
         "margin": np.float32(ranking.margin)}
  sides = encode_sides(ranking.prompt_turns, ranking.responses, tokenizer, template, seq_len)
  for i, (tokens, response, n) in enumerate(sides):
    row["inputs"][i], row["loss_mask"][i] = tokens, response
    row["segment_ids"][i, :n] = 1
    row["positions"][i] = np.arange(seq_len)
  row["ranks"][:k], row["valid"][:k] = ranking.ranks, 1.0
  return row


def _batched(encoded: list[dict], rows: int, seed: int, shuffle: bool, num_epochs: int | None):
  ds = grain.MapDataset.source(encoded)
  if shuffle:
    ds = ds.shuffle(seed)
  ds = ds.repeat(num_epochs).batch(rows, drop_remainder=True)  # every batch fills the mesh
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)))


def make_pair_iterator(sources, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                       process_index: int = 0, process_count: int = 1, shuffle: bool = True,
                       num_epochs: int | None = None, on_error: str = "raise", template=None,
                       info: dict | None = None):
  """Per-host batches of pairs (load_pairs: rankings give their ordered pairs):
  `{side}_inputs/_loss_mask/_segment_ids/_positions` [rows, seq_len] for side in chosen, rejected
  (inputs are whole sequences, EOS included), and `margin` [rows]; deterministic by seed, with
  get/set_state for resume. `info`, if given, gets the number of pairs in all (`examples`) for the
  run's start-up block."""
  rows = batching.host_rows(seq_len=seq_len, batch_size=batch_size, process_index=process_index,
                            process_count=process_count)
  template = template or sft.ChatTemplate()
  pairs = load_pairs(sources, on_error=on_error)
  if info is not None:
    info["examples"] = len(pairs)
  pairs = pairs[process_index::process_count]
  if not pairs:
    raise UserError(f"no preference pairs for process {process_index} of {process_count}")
  return _batched([encode_pair(p, tokenizer, template, seq_len) for p in pairs], rows, seed,
                  shuffle, num_epochs)


def max_responses(rankings: Sequence[Ranking]) -> int:
  """K of a batch that holds any of `rankings`: the most responses of one."""
  return max(len(r.responses) for r in rankings)


def make_ranking_iterator(sources, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                          process_index: int = 0, process_count: int = 1, shuffle: bool = True,
                          num_epochs: int | None = None, on_error: str = "raise", template=None,
                          info: dict | None = None, num_responses: int | None = None):
  """Per-host batches of rankings (pairs are rankings of two), one ranking a row:
  `inputs/loss_mask/segment_ids/positions` [rows, K, seq_len], `ranks` and `valid` [rows, K],
  `margin` [rows] (encode_ranking), K = num_responses or else the most responses of any ranking of
  the sources; deterministic by seed, with get/set_state for resume. `info`, if given, gets the
  number of records (`examples`) and what they are (`unit`) for the run's start-up block."""
  rows = batching.host_rows(seq_len=seq_len, batch_size=batch_size, process_index=process_index,
                            process_count=process_count)
  template = template or sft.ChatTemplate()
  rankings = load_rankings(sources, on_error=on_error)
  k = num_responses or max_responses(rankings)
  if info is not None:
    info["examples"] = len(rankings)
    fewest, most = min(len(r.responses) for r in rankings), max_responses(rankings)
    pairs = sum(len(r.pairs()) for r in rankings)
    info["unit"] = ("pairs" if most == 2 else
                    f"rankings of {most if fewest == most else f'{fewest} to {most}'} responses "
                    f"({pairs:,} ordered pairs)")
  rankings = rankings[process_index::process_count]
  if not rankings:
    raise UserError(f"no preference records for process {process_index} of {process_count}")
  return _batched([encode_ranking(r, tokenizer, template, seq_len, k) for r in rankings], rows,
                  seed, shuffle, num_epochs)
