"""Preference data: pairs and rankings parsed alike, bad records named by file and line, long
ones cut so that every response keeps the same prompt, rankings as DPO's pairs, and the demo's
rankings."""

import json
import re

import numpy as np
import pytest

from lmtrain.data import demo, preference, scorers, sft as sft_data
from lmtrain.data import tokenizer as tokenizer_lib
from lmtrain.errors import UserError


def test_fit_pair_cuts_the_responses_first_then_the_prompts_start():
  prompt, short, long = list(range(10)), [20, 21], list(range(30, 50))
  assert preference.fit_pair(prompt, [short, long[:4]], 16) == (prompt, [short, long[:4]])
  # The responses fit with the whole prompt once cut to the 10 tokens it leaves.
  assert preference.fit_pair(prompt[:6], [short, long], 16) == (prompt[:6], [short, long[:10]])
  # Cut to half of seq_len at most, then the prompt gives up its start.
  assert preference.fit_pair(prompt, [short, long], 16) == (prompt[2:], [short, long[:8]])
  # A prompt that leaves under half of seq_len: the responses keep 8, the prompt its last 8.
  p, (a, b) = preference.fit_pair(list(range(14)), [short, long], 16)
  assert p == list(range(6, 14)) and a == short and b == long[:8]
  # A short response keeps its length; the prompt gives the rest.
  p, (a, b) = preference.fit_pair(list(range(30)), [short, [40, 41, 42]], 16)
  assert p == list(range(17, 30)) and a == short and b == [40, 41, 42]


@pytest.fixture(scope="module")
def tok(tokenizer_path):
  return tokenizer_lib.Tokenizer.load(tokenizer_path)


def test_a_long_pair_keeps_one_prompt_for_both_sides(tok):
  template = sft_data.ChatTemplate()
  pair = preference.Pair(
      (("user", "the quick brown fox jumps over the lazy dog " * 3),),
      chosen="one two three", rejected="a cat sat on the mat " * 6, margin=0.0, record={})
  seq_len = 40
  prompt = sft_data.encode_prompt(pair.prompt_turns, tok, template)
  assert len(prompt) > seq_len // 2  # the prompt must lose its start
  row = preference.encode_pair(pair, tok, template, seq_len)
  starts = {side: int(np.argmax(row[f"{side}_loss_mask"])) for side in ("chosen", "rejected")}
  assert starts["chosen"] == starts["rejected"] == seq_len // 2
  np.testing.assert_array_equal(row["chosen_inputs"][:starts["chosen"]],
                                row["rejected_inputs"][:starts["rejected"]])
  # ... the prompt's end: the assistant prefix the responses follow.
  np.testing.assert_array_equal(row["chosen_inputs"][:seq_len // 2], prompt[-(seq_len // 2):])
  # The short side whole, EOS last; the long side cut to the other half.
  n = int(row["chosen_segment_ids"].sum())
  assert row["chosen_inputs"][n - 1] == tok.eos_id
  assert row["chosen_loss_mask"][starts["chosen"]:n].all() and not row["chosen_loss_mask"][n:].any()
  assert row["rejected_segment_ids"].all() and row["rejected_inputs"][-1] != tok.eos_id


def test_a_pair_that_fits_is_not_cut(tok):
  pair = preference.Pair((("user", "the dog"),), "the fox", "a cat", 0.5, {})
  row = preference.encode_pair(pair, tok, None, 64)
  for side, text in (("chosen", "the fox"), ("rejected", "a cat")):
    ids, mask = sft_data.encode_example([("user", "the dog"), ("assistant", text)], tok)
    n = len(ids)
    np.testing.assert_array_equal(row[f"{side}_inputs"][:n], ids)
    np.testing.assert_array_equal(row[f"{side}_loss_mask"][:n], mask)
    assert (row[f"{side}_inputs"][n:] == tok.pad_id).all()
  assert row["margin"] == np.float32(0.5)


def test_a_pair_whose_sides_are_the_same_is_a_bad_record_naming_its_line(tmp_path):
  path = tmp_path / "pairs.jsonl"
  path.write_text('{"prompt": "Say hi", "chosen": "hi", "rejected": "bye"}\n'
                  '{"prompt": "Say hi", "chosen": "hi", "rejected": " hi "}\n'
                  '{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", '
                  '"rejected": "\\n\\nHuman: a\\n\\nAssistant: b"}\n')
  with pytest.raises(Exception, match=f"{path}:2: .*are the same response"):
    preference.load_pairs(str(path))
  kept = preference.load_pairs(str(path), on_error="skip")
  assert [p.rejected for p in kept] == ["bye"]  # lines 2 and 3 left out


def write_lines(path, records):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
  return str(path)


def test_rankings_and_pairs_parse_alike_and_extra_fields_are_ignored(tmp_path):
  path = write_lines(tmp_path / "mixed.jsonl", [
      {"prompt": "Say hi", "chosen": "hi", "rejected": "bye", "margin": 0.5},
      {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
      {"prompt": "Count", "responses": ["3", "4", "three", "2"], "ranking": [1, 2, 4, 2],
       "rater": "ann", "labeled_at": "2026-12-06T22:00:00Z", "source": "label", "answer": "3",
       "scores": [7, 3, 1, 3], "flags": [[], [], ["ignores the instruction"], []]},
      {"prompt": "Pick", "responses": ["a", "b", "c"], "ranking": [10, 30, 20], "margin": 1}])
  pair, hh, ranking, sparse = preference.load_rankings(path)
  assert (pair.responses, pair.ranks, pair.margin) == (("hi", "bye"), (1, 2), 0.5)
  assert hh.prompt_turns == (("user", "a"),) and (hh.responses, hh.ranks) == (("b", "c"), (1, 2))
  assert ranking.prompt_turns == (("user", "Count"),) and ranking.ranks == (1, 2, 4, 2)
  assert ranking.record["rater"] == "ann" and ranking.margin == 0.0
  assert sparse.margin == 1.0 and sparse.ranks == (10, 30, 20)


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 2, 2]},
     "every response ties: the ranking says nothing"),
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [1, 2]},
     '"ranking" has 2 ranks for 3 responses'),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [1, 2.5]},
     r'"ranking" must be a list of integer ranks \(1 = best\), got \[1, 2.5\]'),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [1.0, 2.0]},
     '"ranking" must be a list of integer ranks'),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [True, False]},
     '"ranking" must be a list of integer ranks'),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": "1,2"},
     '"ranking" must be a list of integer ranks'),
    ({"prompt": "p", "responses": ["a", " b", "c", "b "], "ranking": [1, 2, 3, 4]},
     r"responses\[1\] and responses\[3\] are the same response"),
    ({"prompt": "p", "responses": ["", "  "], "ranking": [1, 2]},
     r"responses\[0\] and responses\[1\] are the same response"),
    ({"prompt": "p", "responses": ["a"], "ranking": [1]},
     '"responses" holds 1: a ranking needs at least 2'),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1]},
     '"ranking" holds rank 0: ranks start at 1'),
    ({"prompt": "p", "responses": ["a", 2], "ranking": [1, 2]},
     '"responses" must be a list of strings'),
    ({"prompt": "p", "responses": ["a", "b"]}, 'missing "ranking" field'),
    ({"responses": ["a", "b"], "ranking": [1, 2]}, 'missing "prompt" field'),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [1, 2], "chosen": "a"},
     'both "responses"/"ranking" and "chosen"/"rejected": a record is either a ranking or a '
     'pair'),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [1, 2], "margin": "big"},
     '"margin" must be a number, got str'),
])
def test_a_bad_ranking_is_reported_with_its_file_and_line(tmp_path, record, message):
  good = {"prompt": "p", "responses": ["a", "b"], "ranking": [2, 1]}
  path = write_lines(tmp_path / "rankings.jsonl", [good, good, record])
  with pytest.raises(UserError, match=f"^{re.escape(path)}:3: {message}"):
    preference.load_rankings(path)
  assert len(preference.load_rankings(path, on_error="skip")) == 2


def test_a_long_ranking_keeps_one_prompt_for_every_response(tok):
  template = sft_data.ChatTemplate()
  turns = (("user", "the quick brown fox jumps over the lazy dog " * 3),)
  ranking = preference.Ranking(turns, ("one two three", "a cat sat on the mat " * 6, "the dog"),
                               (2, 1, 3), 0.25, {})
  seq_len = 40
  prompt = sft_data.encode_prompt(turns, tok, template)
  assert len(prompt) > seq_len // 2  # the prompt must lose its start
  row = preference.encode_ranking(ranking, tok, template, seq_len, num_responses=5)
  assert row["inputs"].shape == row["loss_mask"].shape == (5, seq_len)
  np.testing.assert_array_equal(row["ranks"], [2, 1, 3, 0, 0])
  np.testing.assert_array_equal(row["valid"], [1, 1, 1, 0, 0])
  assert row["margin"] == np.float32(0.25)
  # Every response starts after the same prompt: its end, the assistant prefix they follow.
  starts = [int(np.argmax(row["loss_mask"][i])) for i in range(3)]
  assert starts == [seq_len // 2] * 3
  for i in range(3):
    np.testing.assert_array_equal(row["inputs"][i, :seq_len // 2], prompt[-(seq_len // 2):])
  # The short responses whole, EOS last; the long one cut; the padding rows empty.
  for i in (0, 2):
    n = int(row["segment_ids"][i].sum())
    assert row["inputs"][i, n - 1] == tok.eos_id and not row["loss_mask"][i, n:].any()
  assert row["segment_ids"][1].all() and row["inputs"][1, -1] != tok.eos_id
  assert not row["segment_ids"][3:].any() and not row["loss_mask"][3:].any()
  # A pair as a ranking encodes as encode_pair's two sides.
  pair = preference.Pair(turns, "one two three", "a cat sat on the mat " * 6, 0.0, {})
  as_ranking = preference.encode_ranking(preference.Ranking(turns, (pair.chosen, pair.rejected),
                                                            (1, 2), 0.0, {}), tok, template,
                                         seq_len, 2)
  pair_row = preference.encode_pair(pair, tok, template, seq_len)
  for key in ("inputs", "loss_mask", "segment_ids", "positions"):
    np.testing.assert_array_equal(as_ranking[key], [pair_row[f"chosen_{key}"],
                                                    pair_row[f"rejected_{key}"]])


def test_dpo_reads_a_ranking_as_its_ordered_pairs_without_ties(tmp_path, tok):
  path = write_lines(tmp_path / "mixed.jsonl", [
      {"prompt": "p", "responses": ["a", "b", "c", "d"], "ranking": [2, 1, 2, 3], "margin": 0.5},
      {"prompt": "q", "chosen": "yes", "rejected": "no"}])
  pairs = preference.load_pairs(path)
  # C(4, 2) = 6 pairs, less the tie of "a" and "c"; then the pair record.
  assert [(p.chosen, p.rejected) for p in pairs] == [
      ("b", "a"), ("b", "c"), ("b", "d"), ("a", "d"), ("c", "d"), ("yes", "no")]
  assert [p.margin for p in pairs] == [0.5] * 5 + [0.0]
  assert all(p.prompt_turns == (("user", "p"),) for p in pairs[:5])
  info = {}
  batch = next(preference.make_pair_iterator(path, tok, seq_len=16, batch_size=6, seed=0,
                                             shuffle=False, info=info))
  assert info["examples"] == 6 and batch["chosen_inputs"].shape == (6, 16)


def test_the_ranking_iterator_batches_rankings_and_pairs_at_the_largest_k(tmp_path, tok):
  path = write_lines(tmp_path / "mixed.jsonl", [
      {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [1, 2, 2]},
      {"prompt": "q", "chosen": "yes", "rejected": "no"}] * 2)
  info = {}
  batches = preference.make_ranking_iterator(path, tok, seq_len=16, batch_size=4, seed=0,
                                             shuffle=False, num_epochs=1, info=info)
  batch = next(batches)
  assert batch["inputs"].shape == (4, 3, 16) and batch["ranks"].shape == (4, 3)
  np.testing.assert_array_equal(batch["valid"], [[1, 1, 1], [1, 1, 0]] * 2)
  np.testing.assert_array_equal(batch["ranks"], [[1, 2, 2], [1, 2, 0]] * 2)
  assert info == {"examples": 4, "unit": "rankings of 2 to 3 responses (6 ordered pairs)"}
  pairs_only = write_lines(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "y",
                                                       "rejected": "n"}] * 2)
  info = {}
  batch = next(preference.make_ranking_iterator(pairs_only, tok, seq_len=16, batch_size=2,
                                                seed=0, info=info, num_responses=4))
  assert info["unit"] == "pairs" and batch["inputs"].shape == (2, 4, 16)


def test_the_demo_rankings(tmp_path, tok):
  paths = demo.write_preference_data(str(tmp_path), n_train=200, n_eval=40)
  again = demo.write_preference_data(str(tmp_path / "again"), n_train=200, n_eval=40)
  assert [open(p, "rb").read() for p in paths] == [open(p, "rb").read() for p in again]
  train, evals = ([json.loads(line) for line in open(p)] for p in paths)
  assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
  for r in train + evals:
    assert len(r["responses"]) == 4 and sorted(r["ranking"]) == [1, 2, 2, 3]
    scores = [scorers.demo_tasks(text, r) for text in r["responses"]]
    # The right answer alone is best; the scorer's wrong answers follow, the off-format last.
    assert scores == [float(rank == 1) for rank in r["ranking"]]
    assert r["responses"][r["ranking"].index(1)] == r["answer"]
    if r["task"] == "count":  # the careless annotator's count is among the mistakes
      assert str(int(r["answer"]) - 1) in r["responses"]
  # Each ranking gives 5 pairs (C(4, 2) less the tie); short enough for small models: nothing is
  # cut at seq_len 128 (as the SFT demo data).
  rankings = preference.load_rankings(paths[0])
  assert sum(len(r.pairs()) for r in rankings) == 5 * 200
  template = sft_data.ChatTemplate()
  for r in rankings:
    row = preference.encode_ranking(r, tok, template, 128, 4)
    assert (row["inputs"][np.arange(4), row["segment_ids"].sum(-1) - 1] == tok.eos_id).all()
