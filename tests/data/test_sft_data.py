"""SFT data: record forms, chat template and loss mask, packing, demo tasks, scorers, seqio."""

import collections
import json
import logging
import os
import subprocess
import sys

import gin
import numpy as np
import pytest

from lmtrain.data import demo
from lmtrain.data import formats
from lmtrain.data import scorers
from lmtrain.data import seqio_tasks
from lmtrain.data import sft
from lmtrain.data import tokenizer as tokenizer_lib
from lmtrain.errors import UserError

BOS, EOS = tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID
SEQ_LEN = 128

CHAT = {"messages": [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "Reverse the list: red, star"},
    {"role": "assistant", "content": "star, red"},
], "task": "chat"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("demo"))
  demo.write_pretrain_corpus(out)
  demo.write_sft_data(out, n_train=400, n_eval=50)
  return out


@pytest.fixture(scope="module")
def tok(data_dir, tmp_path_factory):
  """Trained on the pretraining corpus plus the rendered SFT text, so markers get pieces."""
  template = sft.ChatTemplate()
  text = tmp_path_factory.mktemp("toktext") / "sft.txt"
  with open(text, "w", encoding="utf-8") as f:
    for example in sft.iter_sft_records(os.path.join(data_dir, "sft_train.jsonl")):
      f.write("".join(run for run, _ in template.runs(example.turns)) + "\n\n")
  path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
  tokenizer_lib.train_tokenizer(
      [os.path.join(data_dir, "pretrain_train.jsonl"), str(text)], 1000, path)
  return tokenizer_lib.Tokenizer.load(path)


@pytest.fixture(scope="module")
def sft_file(data_dir):
  """48 distinct demo examples plus a multi-turn chat and an Alpaca record."""
  path = os.path.join(data_dir, "mixed.jsonl")
  by_prompt = {}
  for line in open(os.path.join(data_dir, "sft_train.jsonl"), encoding="utf-8"):
    by_prompt.setdefault(json.loads(line)["prompt"], json.loads(line))
  records = list(by_prompt.values())[:48]
  records += [CHAT, {"instruction": "Sort alphabetically", "input": "tree, key", "output":
                     "key, tree"}]
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  return path


def _write(tmp_path, name, lines):
  path = tmp_path / name
  path.write_text("".join(line + "\n" for line in lines))
  return str(path)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _rows(batches):
  return [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["inputs"]))]


def _segments(rows):
  """(inputs, targets, loss_mask) tuples of every segment of every row."""
  out = []
  for row in rows:
    for s in range(1, row["segment_ids"].max() + 1):
      where = row["segment_ids"] == s
      out.append((tuple(row["inputs"][where]), tuple(row["targets"][where]),
                  tuple(row["loss_mask"][where])))
  return out


def _chunk_key(chunk):
  return tuple(tuple(chunk[k]) for k in ("inputs", "targets", "loss_mask"))


# Records.


def test_record_forms_normalise_to_turns():
  pr = sft.parse_record({"prompt": "Q", "response": "A", "answer": "A", "task": "add"})
  assert pr.turns == (("user", "Q"), ("assistant", "A"))
  assert pr.record["answer"] == "A" and pr.record["task"] == "add"  # Extra fields kept.
  assert (pr.prompt_turns, pr.response) == ((("user", "Q"),), "A")
  alpaca = sft.parse_record({"instruction": "Do it", "input": "on this", "output": "done"})
  assert alpaca.turns == (("user", "Do it\n\non this"), ("assistant", "done"))
  for record in ({"instruction": "Do it", "output": "done"},
                 {"instruction": "Do it", "input": "", "output": "done"}):
    assert sft.parse_record(record).turns == (("user", "Do it"), ("assistant", "done"))
  chat = sft.parse_record(CHAT)
  assert [role for role, _ in chat.turns] == ["system", "user", "assistant", "user", "assistant"]
  assert chat.response == "star, red" and len(chat.prompt_turns) == 4
  # Prompt records (generation, PPO) need no response.
  prompt = sft.parse_record({"prompt": "Q", "answer": "1"}, training=False)
  assert (prompt.prompt_turns, prompt.response) == ((("user", "Q"),), None)
  open_chat = sft.parse_record({"messages": [{"role": "user", "content": "hi"}]}, training=False)
  assert open_chat.prompt_turns == (("user", "hi"),)


@pytest.mark.parametrize("record,message", [
    ({"prompt": "Q"}, 'missing "response" field'),
    ({"prompt": 3, "response": "A"}, '"prompt" must be a string, got int'),
    ({"instruction": "I", "input": None, "output": "O"}, '"input" must be a string, got NoneType'),
    ({"instruction": "I"}, 'missing "output" field'),
    ({"text": "plain"}, 'expected "prompt" and "response", "instruction" and "output", or '
                        '"messages" fields'),
    ({"messages": {"role": "user"}}, '"messages" must be a list, got dict'),
    ({"messages": ["hi"]}, "messages[0]: expected an object, got str"),
    ({"messages": [{"role": "user", "content": "a"}, {"content": "b"}]},
     'messages[1]: missing "role" field'),
    ({"messages": [{"role": "user", "content": 1}]}, 'messages[0]: "content" must be a string, '
                                                     'got int'),
    ({"messages": [{"role": "bot", "content": "a"}]},
     'messages[0]: role must be one of system, user, assistant, got "bot"'),
    ({"messages": [{"role": "user", "content": "a"}]}, '"messages" has no assistant turn'),
    ({"messages": []}, '"messages" has no assistant turn'),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}]},
     'the last turn must be "assistant" to train on, got "user"'),
])
def test_bad_record_messages(tmp_path, record, message):
  path = _write(tmp_path, "sft.jsonl", [json.dumps({"prompt": "Q", "response": "A"}), "",
                                        json.dumps(record)])
  with pytest.raises(UserError) as e:
    list(sft.iter_sft_records(path))
  assert str(e.value) == f"{path}:3: {message}"


def test_skip_mode_and_sources(tmp_path, tok):
  path = _write(tmp_path, "sft.jsonl", ['{"prompt": "Q", "response": "A"}', "[1]",
                                        '{"prompt": "Q"}', '{"prompt": "R", "response": "B"}'])
  counter = formats.SkipCounter()
  got = sft.load_examples([str(tmp_path / "*.jsonl")], on_error="skip", counter=counter)
  assert [e.turns[0][1] for e in got] == ["Q", "R"]
  assert counter.messages == [f"{path}:2: expected a JSON object, got list",
                              f'{path}:3: missing "response" field']
  # Prompt-only reading accepts the record without a response.
  assert len(sft.load_examples(path, training=False, on_error="skip")) == 3
  with pytest.raises(UserError, match="^seqio:x: seqio sources are not supported for SFT data"):
    sft.make_sft_dataset("seqio:x", tok, seq_len=8, batch_size=1, seed=0)


def test_array_record_matches_jsonl(tmp_path, sft_file):
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "sft.array_record")
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for line in open(sft_file, encoding="utf-8"):
    writer.write(line.strip().encode())
  writer.close()
  assert sft.load_examples(path) == sft.load_examples(sft_file)


# Template and encoding.


def test_prompt_response_layout(tok):
  template = sft.ChatTemplate()
  assert (template.system, template.user, template.assistant_prefix) == (
      "<|system|>\n{content}\n", "<|user|>\n{content}\n", "<|assistant|>\n")
  turns = sft.parse_record({"prompt": "What is 2 + 3?", "response": "5"}).turns
  ids, mask = sft.encode_example(turns, tok)
  prompt = [BOS] + tok.encode("<|user|>\nWhat is 2 + 3?\n<|assistant|>\n")
  response = tok.encode("5") + [EOS]
  assert ids.dtype == np.int32 and mask.dtype == np.float32
  assert list(ids) == prompt + response
  assert list(mask) == [0.0] * len(prompt) + [1.0] * len(response)
  assert list(ids[mask > 0]) == response and tok.decode(ids[mask > 0]) == "5"
  assert tok.decode(ids).startswith("<|user|>\nWhat is 2 + 3?\n<|assistant|>\n")
  assert list(sft.encode_prompt(turns[:1], tok)) == prompt
  # The Alpaca form with the same user text encodes identically.
  alpaca = sft.parse_record({"instruction": "What is", "input": "2 + 3?", "output": "5"}).turns
  assert list(sft.encode_example(alpaca, tok)[0]) == list(
      sft.encode_example([("user", "What is\n\n2 + 3?"), ("assistant", "5")], tok)[0])


def test_multi_turn_masks_only_assistant_turns(tok):
  turns = sft.parse_record(CHAT).turns
  ids, mask = sft.encode_example(turns, tok)
  assert ids[0] == BOS and mask[0] == 0
  # Masked-in runs are exactly each assistant turn's tokens and its EOS, in order.
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
  runs = [list(ids[a:b]) for a, b in zip(edges[::2], edges[1::2])]
  assert runs == [tok.encode("5") + [EOS], tok.encode("star, red") + [EOS]]
  unmasked = tok.decode(ids[mask == 0])
  for text in ("<|system|>\nAnswer briefly.\n<|user|>\nWhat is 2 + 3?\n<|assistant|>\n",
               "<|user|>\nReverse the list: red, star\n<|assistant|>\n"):
    assert text in unmasked
  # The generation prompt is a prefix of the example that continues it.
  prompt = sft.encode_prompt(turns[:-1], tok)
  assert list(ids[:len(prompt)]) == list(prompt) and not mask[len(prompt) - 1]
  assert list(ids[len(prompt):]) == tok.encode("star, red") + [EOS]


def test_template_is_gin_configurable(tok):
  with gin.unlock_config():
    gin.parse_config(["ChatTemplate.user = 'Q: {content}\\n'",
                      "ChatTemplate.assistant_prefix = 'A: '"])
    try:
      template = sft.ChatTemplate()
    finally:
      gin.clear_config()
  assert template.runs([("user", "hi"), ("assistant", "yo")]) == [("Q: hi\nA: ", False),
                                                                  ("yo", True)]
  assert list(sft.encode_prompt([("user", "hi")], tok, template)) == [BOS] + tok.encode(
      "Q: hi\nA: ")
  with pytest.raises(UserError, match=r"ChatTemplate.user must contain \{content\} exactly once"):
    sft.ChatTemplate(user="<|user|>\n")


# Pipeline.


def test_packed_rows_mask_only_responses(tok, sft_file):
  examples = sft.load_examples(sft_file)
  chunks, counts = sft.encode_examples(examples, tok, seq_len=SEQ_LEN)
  assert counts.kept == len(examples)
  example_of = {_chunk_key(c): e for c, e in zip(chunks, examples)}
  batches = _take(sft.make_sft_iterator(sft_file, tok, seq_len=SEQ_LEN, batch_size=4, seed=0), 8)
  for b in batches:
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
        "inputs": ((4, SEQ_LEN), np.int32), "targets": ((4, SEQ_LEN), np.int32),
        "segment_ids": ((4, SEQ_LEN), np.int32), "positions": ((4, SEQ_LEN), np.int32),
        "loss_mask": ((4, SEQ_LEN), np.float32)}
  rows = _rows(batches)
  for row in rows:
    seg = row["segment_ids"]
    assert seg[0] == 1 and np.all(np.diff(seg[seg > 0]) >= 0)
    assert not row["loss_mask"][seg == 0].any() and not row["targets"][seg == 0].any()
    for s in range(1, seg.max() + 1):
      where = np.flatnonzero(seg == s)
      np.testing.assert_array_equal(row["positions"][where], np.arange(len(where)))
      assert row["inputs"][where[0]] == BOS and row["loss_mask"][where[0]] == 0
  segments = _segments(rows)
  assert len(segments) > 2 * len(rows)  # Rows do hold several examples.
  assert set(segments) <= set(example_of)  # Each segment is one whole example: none crosses.
  for segment in segments:
    _, targets, mask = segment
    trained = [t for t, m in zip(targets, mask) if m]
    assert trained == [i for role, content in example_of[segment].turns if role == "assistant"
                       for i in tok.encode(content) + [EOS]]


def test_packed_and_padded_hold_the_same_examples(tok, sft_file):
  examples = sft.load_examples(sft_file)
  expected = collections.Counter(
      _chunk_key(c) for c in sft.encode_examples(examples, tok, seq_len=SEQ_LEN)[0])
  kwargs = dict(seq_len=SEQ_LEN, batch_size=1, seed=0, shuffle=False, num_epochs=1)
  packed = _rows(list(sft.make_sft_iterator(sft_file, tok, pack=True, **kwargs)))
  padded = _rows(list(sft.make_sft_iterator(sft_file, tok, pack=False, **kwargs)))
  assert len(padded) == len(examples) > len(packed)
  assert collections.Counter(_segments(packed)) == collections.Counter(_segments(padded)) == (
      expected)
  for row in padded:
    n = int(row["segment_ids"].sum())
    np.testing.assert_array_equal(row["segment_ids"], np.arange(SEQ_LEN) < n)
    assert not row["inputs"][n:].any() and not row["loss_mask"][n:].any()


def test_truncation_and_dropping_are_counted(tok, tmp_path, caplog):
  long_prompt = " ".join(demo.WORDS)
  path = _write(tmp_path, "long.jsonl", [
      json.dumps({"prompt": "What is 2 + 3?", "response": "5"}),
      json.dumps({"prompt": "Say the words.", "response": long_prompt}),
      json.dumps({"prompt": long_prompt, "response": "5"}),
  ])
  examples = sft.load_examples(path)
  with caplog.at_level(logging.WARNING):
    chunks, counts = sft.encode_examples(examples, tok, seq_len=32)
  assert (counts.kept, counts.truncated, counts.dropped) == (2, 1, 1)
  assert "1 of 3 truncated (start kept), 1 dropped" in caplog.text
  ids, mask = sft.encode_example(examples[1].turns, tok)
  np.testing.assert_array_equal(chunks[1]["inputs"], ids[:32])
  np.testing.assert_array_equal(chunks[1]["targets"], ids[1:33])
  np.testing.assert_array_equal(chunks[1]["loss_mask"], mask[1:33])
  rows = _rows(list(sft.make_sft_iterator(path, tok, seq_len=32, batch_size=1, seed=0,
                                          num_epochs=1, pack=False)))
  assert len(rows) == 2
  with pytest.raises(UserError, match="no SFT example has a response token within seq_len=4"):
    sft.make_sft_dataset(path, tok, seq_len=4, batch_size=1, seed=0)


def test_determinism_hosts_and_state(tok, sft_file):
  def first(seed, n=3, **kwargs):
    return _take(sft.make_sft_iterator(sft_file, tok, seq_len=SEQ_LEN, batch_size=4, seed=seed,
                                       **kwargs), n)
  for a, b in zip(first(0), first(0)):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(first(0)[0]["inputs"], first(1)[0]["inputs"])

  hosts = []
  for index in range(2):
    it = sft.make_sft_iterator(sft_file, tok, seq_len=SEQ_LEN, batch_size=2, seed=3,
                               process_index=index, process_count=2, num_epochs=1, pack=False)
    hosts.append(collections.Counter(_segments(_rows(list(it)))))
  everything = sft.encode_examples(sft.load_examples(sft_file), tok, seq_len=SEQ_LEN)[0]
  assert sum(hosts[0].values()) == sum(hosts[1].values()) == 25
  assert hosts[0] + hosts[1] == collections.Counter(_chunk_key(c) for c in everything)
  assert not set(hosts[0]) & set(hosts[1])

  it = sft.make_sft_iterator(sft_file, tok, seq_len=SEQ_LEN, batch_size=4, seed=0)
  _take(it, 3)
  state = it.get_state()
  json.dumps(state)
  expected = _take(it, 2)
  fresh = sft.make_sft_iterator(sft_file, tok, seq_len=SEQ_LEN, batch_size=4, seed=0)
  fresh.set_state(state)
  for a, b in zip(_take(fresh, 2), expected):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


# Demo tasks and scorers.


def _recompute(task, prompt):
  head, listed = prompt.split(": ", 1)
  words = listed.split(", ")
  assert len(set(words)) == len(words) and 3 <= len(words) <= 5
  assert set(words) <= set(demo.WORDS)
  if task == "count":
    assert head == "How many words are in the list"
    return str(len(words))
  if task == "last":
    assert head == "What is the last word of the list"
    return words[-1]
  if task == "reverse":
    assert head == "Reverse the list"
    return ", ".join(words[::-1])
  assert task == "sort" and head == "Sort alphabetically"
  return ", ".join(sorted(words))


def _read(path):
  return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_demo_task_data(data_dir, tmp_path, tok):
  again = demo.write_sft_data(str(tmp_path), n_train=400, n_eval=50)
  originals = [os.path.join(data_dir, f"sft_{s}.jsonl") for s in ("train", "eval")]
  assert [open(p, "rb").read() for p in again] == [open(p, "rb").read() for p in originals]
  mtime = os.path.getmtime(again[0])
  demo.write_sft_data(str(tmp_path), n_train=400, n_eval=50)  # Same records: left alone.
  assert os.path.getmtime(again[0]) == mtime

  train, evals = (_read(p) for p in again)
  assert (len(train), len(evals)) == (400, 50)
  assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
  for record in train + evals:
    assert record["response"] == record["answer"] == _recompute(record["task"], record["prompt"])
    assert scorers.demo_tasks(record["response"], record) == 1.0
  assert collections.Counter(r["task"] for r in train) == {t: 100 for t in demo.TASKS}
  # Short enough for small models: nothing is truncated at seq_len 128.
  assert sft.encode_examples(sft.load_examples(again[0]), tok, seq_len=SEQ_LEN)[1].truncated == 0

  # The careless annotator: count demonstrations one too low in about the share asked for, in
  # the training split only; the other tasks, the answers and the eval split are unchanged.
  flawed_dir = tmp_path / "careless"
  flawed, flawed_evals = (_read(p) for p in demo.write_sft_data(
      str(flawed_dir), n_train=400, n_eval=50, careless_count_share=0.65))
  assert [r["prompt"] for r in flawed] == [r["prompt"] for r in train]
  assert [r["answer"] for r in flawed] == [r["answer"] for r in train]
  assert flawed_evals == evals
  wrong = [r for r in flawed if r["response"] != r["answer"]]
  assert {r["task"] for r in wrong} == {"count"}
  assert all(int(r["response"]) == int(r["answer"]) - 1 for r in wrong)
  assert 0.55 <= len(wrong) / 100 <= 0.75, len(wrong)
  with pytest.raises(UserError, match=r"^careless_count_share=1.5: must be in \[0, 1\]$"):
    demo.write_sft_data(str(flawed_dir), careless_count_share=1.5)

  pref_train, pref_eval = (_read(p) for p in demo.write_preference_data(str(tmp_path), 300, 50))
  assert len(pref_train) == 300 and len(pref_eval) == 50
  for record in pref_train + pref_eval:  # rankings: the right answer alone first
    best = [text for text, rank in zip(record["responses"], record["ranking"]) if rank == 1]
    assert best == [record["answer"]] == [_recompute(record["task"], record["prompt"])]
    assert [scorers.demo_tasks(text, record) for text in record["responses"]].count(1.0) == 1
  # Every kind of near miss occurs: wrong order, a word left out or added, a repeat, an outsider.
  lists = [r for r in pref_train if r["task"] in ("reverse", "sort")]
  def kinds(r, wrong):
    chosen, rejected = r["answer"].split(", "), wrong.split(", ")
    if len(rejected) != len(chosen):
      return "drop" if len(rejected) < len(chosen) else "add"
    if sorted(rejected) == sorted(chosen):
      return "order"
    return "repeat" if len(set(rejected)) < len(rejected) else "replace"
  assert {kinds(r, text) for r in lists for text, rank in zip(r["responses"], r["ranking"])
          if rank == 2} == {"drop", "add", "order", "repeat", "replace"}
  ppo_train, ppo_eval = (_read(p) for p in demo.write_ppo_prompts(str(tmp_path), 100, 20))
  assert sorted(ppo_train[0]) == ["answer", "prompt", "task"] and len(ppo_eval) == 20
  assert all(r["answer"] == _recompute(r["task"], r["prompt"]) for r in ppo_train + ppo_eval)
  assert not {r["prompt"] for r in ppo_train} & {r["prompt"] for r in evals + ppo_eval}


def test_scorers():
  exact = scorers.get_scorer("exact_match")
  assert exact("  81\n", {"answer": "81"}) == 1.0
  assert exact("81.", {"answer": "81"}) == 0.0
  score = scorers.get_scorer("demo_tasks")
  assert score(" 4.", {"task": "count", "answer": "4"}) == 1.0
  assert score("5", {"task": "count", "answer": "4"}) == 0.0
  assert score("four", {"task": "count", "answer": "4"}) == 0.0
  assert score("tree key  red", {"task": "reverse", "answer": "tree, key, red"}) == 1.0
  assert score("key, tree, red", {"task": "reverse", "answer": "tree, key, red"}) == 0.0
  assert score("key, red", {"task": "reverse", "answer": "tree, key, red"}) == 0.0
  assert score(" red.", {"task": "last", "answer": "red"}) == 1.0
  assert score("Red", {"task": "last", "answer": "red"}) == 0.0
  assert score("key, red", {"task": "last", "answer": "red"}) == 0.0
  with pytest.raises(UserError, match="^unknown scorer 'nope'; known scorers: demo_tasks, "
                                      "exact_match$"):
    scorers.get_scorer("nope")
  with pytest.raises(UserError, match='^scorer exact_match: record has no "answer" field$'):
    exact("1", {"prompt": "x"})
  with pytest.raises(UserError, match="unknown task 'poem'"):
    score("1", {"task": "poem", "answer": "1"})
  records = [{"task": "count"}, {"task": "sort"}, {"task": "count"}, {}, {"task": "a b"}]
  assert scorers.per_task("eval_x", [1.0, 0.0, 0.0, 1.0, 1.0], records) == {
      "eval_x_count": 0.5, "eval_x_sort": 0.0}


# seqio.


def test_seqio_sft_task_round_trip(tok, sft_file):
  task = seqio_tasks.register_sft_task("lmtrain_test_sft", [sft_file], tok.path)
  got = list(task.get_dataset(sequence_length=None, split="train", shuffle=False, num_epochs=1)
             .as_numpy_iterator())
  examples = sft.load_examples(sft_file)
  assert len(got) == len(examples)
  for example, features in zip(examples, got):
    assert tok.decode(features["targets"]) == example.response
    assert list(features["targets"]) == tok.encode(example.response) + [EOS]
    if len(example.turns) == 2:  # Single turn: the same ids as our generation prompt.
      assert list(features["inputs"]) == list(sft.encode_prompt(example.prompt_turns, tok)[1:])
  assert tok.decode(got[-2]["inputs"]).endswith("<|user|>\nReverse the list: red, star\n"
                                                "<|assistant|>\n")


def test_sft_import_is_lazy():
  code = ("import sys, lmtrain.data.sft, lmtrain.data.scorers; "
          "print(sorted(m for m in ('seqio', 'tensorflow') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"
