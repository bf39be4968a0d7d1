"""Preference pairs: a long pair is cut so that chosen and rejected keep the same prompt."""

import numpy as np
import pytest

from lmtrain.data import preference, sft as sft_data
from lmtrain.data import tokenizer as tokenizer_lib


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
