"""Data layer: tokenizer, record formats, grain pipeline, seqio sources, demo corpus."""

import json
import math
import os
import subprocess
import sys

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lmtrain.data import demo
from lmtrain.data import formats
from lmtrain.data import pipeline
from lmtrain.data import seqio_tasks
from lmtrain.data import tokenizer as tokenizer_lib
from lmtrain.errors import UserError

SEQ_LEN = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return demo.write_pretrain_corpus(str(tmp_path_factory.mktemp("demo")))


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
  assert tokenizer_lib.train_tokenizer([corpus[0]], 1024, path) == path
  return tokenizer_lib.Tokenizer.load(path)


@pytest.fixture(scope="module")
def docs(corpus):
  """40 documents of varied lengths, short and longer than SEQ_LEN tokens."""
  texts = [json.loads(line)["text"] for line in open(corpus[0], encoding="utf-8")][:40]
  return [text[:20 + 37 * i] for i, text in enumerate(texts)]


@pytest.fixture(scope="module")
def docs_file(docs, tmp_path_factory):
  path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  return str(path)


def _write(tmp_path, name, content):
  path = tmp_path / name
  path.write_text(content)
  return str(path)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def _rows(batches):
  """Each row of each batch as a dict of 1-D arrays."""
  return [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["inputs"]))]


def _documents_of_unpacked_rows(rows):
  """Reassembles document ids from unpacked chunk rows (a document starts with BOS)."""
  out = []
  for row in rows:
    n = int(row["segment_ids"].sum())
    if row["inputs"][0] == tokenizer_lib.BOS_ID:
      out.append(list(row["inputs"][:n]) + [row["targets"][n - 1]])
    else:
      out[-1].extend([row["targets"][n - 1]] if n == 1 else list(row["targets"][:n]))
  return out


# Tokenizer.


def test_tokenizer_special_ids_and_round_trip(tok):
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
  assert (tokenizer_lib.PAD_ID, tokenizer_lib.EOS_ID) == (0, 1)
  assert tok.vocab_size == 1024
  text = "  The quick brown fox\n\njumps über 日本語 \t twice.  "
  ids = tok.encode(text)
  assert tokenizer_lib.BOS_ID not in ids and tokenizer_lib.EOS_ID not in ids
  assert tok.decode(ids) == text
  assert tok.decode([0, 0] + ids + [0]) == text  # Padding is ignored.
  vocab = tokenizer_lib.seqio_vocabulary(tok.path)
  assert (vocab.vocab_size, vocab.eos_id, vocab.pad_id) == (1024, 1, 0)


def test_tokenizer_training_is_deterministic_and_reads_text_files(tmp_path, docs):
  txt = _write(tmp_path, "docs.txt", "\n\n".join(docs))
  a = tokenizer_lib.train_tokenizer([txt], 400, str(tmp_path / "a" / "tokenizer.model"))
  b = tokenizer_lib.train_tokenizer([txt], 400, str(tmp_path / "b.model"))
  assert sorted(os.listdir(tmp_path / "a")) == ["tokenizer.model"]
  assert open(a, "rb").read() == open(b, "rb").read()


def test_tokenizer_errors(tmp_path):
  missing = str(tmp_path / "nope.model")
  with pytest.raises(UserError, match=f"^{missing}: tokenizer model not found$"):
    tokenizer_lib.Tokenizer.load(missing)
  empty = _write(tmp_path, "empty.txt", "\n\n")
  with pytest.raises(UserError, match=f"^{empty}: no records$"):
    tokenizer_lib.train_tokenizer([empty], 300, str(tmp_path / "t.model"))
  with pytest.raises(UserError, match="nope.txt: file not found"):
    tokenizer_lib.train_tokenizer([str(tmp_path / "nope.txt")], 300, str(tmp_path / "t.model"))


# Record formats.


@pytest.mark.parametrize("line,message", [
    ('{"text": "a"', "invalid JSON (Expecting ',' delimiter at column 13)"),
    ('["text"]', "expected a JSON object, got list"),
    ('{"txt": "a"}', 'missing "text" field'),
    ('{"text": 5}', '"text" must be a string, got int'),
    ('{"text": "\xff"}', "invalid UTF-8 at byte 10"),
])
def test_bad_jsonl_record_messages(tmp_path, line, message):
  path = str(tmp_path / "d.jsonl")
  with open(path, "wb") as f:
    f.write(b'{"text": "ok"}\n\n' + line.encode("latin-1") + b"\n")
  with pytest.raises(UserError) as e:
    list(formats.iter_text_records(path))
  assert str(e.value) == f"{path}:3: {message}"


def test_missing_and_empty_files(tmp_path):
  missing = str(tmp_path / "missing.jsonl")
  with pytest.raises(UserError) as e:
    list(formats.iter_text_records(missing))
  assert str(e.value) == f"{missing}: file not found"
  for name in ("empty.jsonl", "empty.txt"):
    path = _write(tmp_path, name, "\n \n")
    with pytest.raises(UserError) as e:
      list(formats.iter_text_records(path))
    assert str(e.value) == f"{path}: no records"


def test_skip_mode_counts_bad_records(tmp_path):
  path = _write(tmp_path, "d.jsonl", '{"text": "a"}\nnot json\n{"text": 1}\n{"text": "b"}\n')
  counter = formats.SkipCounter()
  assert list(formats.iter_text_records(path, on_error="skip", counter=counter)) == ["a", "b"]
  assert counter.count == 2
  assert counter.messages == [
      f"{path}:2: invalid JSON (Expecting value at column 1)",
      f'{path}:3: "text" must be a string, got int']
  bad = _write(tmp_path, "bad.jsonl", "[]\n")
  with pytest.raises(UserError, match=r"bad.jsonl: no records \(1 bad records skipped\)$"):
    list(formats.iter_text_records(bad, on_error="skip"))


def test_plain_text_documents_are_paragraphs(tmp_path):
  path = _write(tmp_path, "d.txt", "\n\nfirst doc\nline two\n\n\n\nsecond\n")
  assert list(formats.iter_text_records(path)) == ["first doc\nline two", "second"]


def test_array_record_matches_jsonl(tmp_path, docs, docs_file):
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "docs.array_record")
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for d in docs:
    writer.write(json.dumps({"text": d}).encode())
  writer.write(b'{"text": null}')
  writer.close()
  with pytest.raises(UserError) as e:
    list(formats.iter_text_records(path))
  assert str(e.value) == f'{path}:RECORD 41: "text" must be a string, got NoneType'
  got = list(formats.iter_text_records(path, on_error="skip"))
  assert got == list(formats.iter_text_records(docs_file)) == docs


# Pipeline.


def test_packed_rows(tok, docs, docs_file):
  doc_chunks = set()
  for d in docs:
    for c in pipeline.chunk_ids(pipeline.document_ids(tok, d), SEQ_LEN):
      doc_chunks.add(tuple(c["inputs"]) + (c["targets"][-1],))
  it = pipeline.make_iterator(docs_file, tok, seq_len=SEQ_LEN, batch_size=8, seed=0)
  batches = _take(it, 6)
  for b in batches:
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
        "inputs": ((8, SEQ_LEN), np.int32), "targets": ((8, SEQ_LEN), np.int32),
        "segment_ids": ((8, SEQ_LEN), np.int32), "positions": ((8, SEQ_LEN), np.int32),
        "loss_mask": ((8, SEQ_LEN), np.float32)}
    np.testing.assert_array_equal(b["loss_mask"], (b["segment_ids"] > 0).astype(np.float32))
  segments = 0
  for row in _rows(batches):
    seg = row["segment_ids"]
    assert seg[0] == 1 and np.all(np.diff(seg[seg > 0]) >= 0)  # 1, 2, 3... then padding.
    assert np.all(row["inputs"][seg == 0] == 0) and np.all(row["targets"][seg == 0] == 0)
    for s in range(1, seg.max() + 1):
      where = seg == s
      np.testing.assert_array_equal(row["positions"][where], np.arange(where.sum()))
      # Inputs and targets of a segment are one chunk of one document, shifted by one.
      inputs, targets = row["inputs"][where], row["targets"][where]
      np.testing.assert_array_equal(inputs[1:], targets[:-1])
      assert tuple(inputs) + (targets[-1],) in doc_chunks
      segments += 1
  assert segments > len(batches) * 8  # Rows do hold several segments.


def test_unpacked_chunks_reassemble_documents(tok, docs, docs_file):
  assert [len(c["inputs"]) for c in pipeline.chunk_ids(np.arange(70), 32)] == [32, 32, 5]
  it = pipeline.make_iterator(docs_file, tok, seq_len=SEQ_LEN, batch_size=1, seed=0,
                              shuffle=False, num_epochs=1, pack=False)
  rows = _rows(list(it))
  for row in rows:
    n = int(row["segment_ids"].sum())
    np.testing.assert_array_equal(row["segment_ids"], np.arange(SEQ_LEN) < n)
    np.testing.assert_array_equal(row["positions"][:n], np.arange(n))
    assert np.all(row["inputs"][n:] == tokenizer_lib.PAD_ID)
  got = _documents_of_unpacked_rows(rows)
  assert got == [list(pipeline.document_ids(tok, d)) for d in docs]


def test_determinism(tok, docs_file):
  def first3(seed):
    return _take(pipeline.make_iterator([docs_file], tok, seq_len=SEQ_LEN, batch_size=4,
                                        seed=seed), 3)
  _assert_batches_equal(first3(0), first3(0))
  assert not np.array_equal(first3(0)[0]["inputs"], first3(1)[0]["inputs"])


def test_epochs_are_reshuffled(tok, docs, docs_file):
  it = pipeline.make_iterator(docs_file, tok, seq_len=SEQ_LEN, batch_size=1, seed=0,
                              num_epochs=2, pack=False)
  got = _documents_of_unpacked_rows(_rows(list(it)))
  assert len(got) == 2 * len(docs)
  assert sorted(got[:40]) == sorted(got[40:]) and got[:40] != got[40:]


def test_per_host_shards_are_disjoint_and_cover(tok, docs, docs_file):
  hosts = []
  for index in range(2):
    it = pipeline.make_iterator(docs_file, tok, seq_len=SEQ_LEN, batch_size=2, seed=3,
                                process_index=index, process_count=2, num_epochs=1,
                                pack=False)
    batches = list(it)
    assert batches[0]["inputs"].shape == (1, SEQ_LEN)
    hosts.append({tok.decode(d[1:-1]) for d in _documents_of_unpacked_rows(_rows(batches))})
  assert len(hosts[0]) == len(hosts[1]) == 20
  assert not hosts[0] & hosts[1]
  assert hosts[0] | hosts[1] == set(docs)
  with pytest.raises(UserError, match="batch_size 3 is not a positive multiple of the "
                                      "process count 2"):
    pipeline.make_text_dataset(docs_file, tok, seq_len=8, batch_size=3, seed=0, process_count=2)


def test_iterator_state_round_trip(tok, docs_file, tmp_path):
  kwargs = dict(seq_len=SEQ_LEN, batch_size=4, seed=0)
  it = pipeline.make_iterator(docs_file, tok, **kwargs)
  _take(it, 3)
  state = it.get_state()
  json.dumps(state)  # Plain JSON, as grain's checkpoint handler writes it.
  expected = _take(it, 2)
  fresh = pipeline.make_iterator(docs_file, tok, **kwargs)
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 2), expected)

  it = pipeline.make_iterator(docs_file, tok, **kwargs)
  _take(it, 3)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    restored = pipeline.make_iterator(docs_file, tok, **kwargs)
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  _assert_batches_equal(_take(restored, 2), expected)


def test_source_errors(tok, tmp_path):
  with pytest.raises(UserError, match=r"/nothing\*.jsonl: no files match$"):
    pipeline.make_text_dataset(str(tmp_path / "nothing*.jsonl"), tok, seq_len=8, batch_size=1,
                               seed=0)
  bad = _write(tmp_path, "bad.jsonl", '{"text": "fine"}\n{"text": 1}\n')
  with pytest.raises(UserError, match="bad.jsonl:2: "):
    pipeline.make_text_dataset([bad], tok, seq_len=8, batch_size=1, seed=0)
  counter = formats.SkipCounter()
  pipeline.make_text_dataset([str(tmp_path / "*.jsonl")], tok, seq_len=8, batch_size=1, seed=0,
                             on_error="skip", counter=counter)
  assert counter.count == 1


def test_unigram_perplexity_hand_case(tmp_path):
  class CharTokenizer:
    """ids: pad 0, eos 1, bos 2, unk 3, "a" 4, "b" 5."""
    vocab_size, bos_id, eos_id = 6, 2, 1

    def encode(self, text):
      return [4 + "ab".index(c) for c in text]

  train = _write(tmp_path, "train.txt", "aab\n\na")
  evals = _write(tmp_path, "eval.txt", "ab")
  # Train targets: a a b eos a eos -> a:3, b:1, eos:2 of 6; add-one over 6 ids: /12.
  # Eval targets: a b eos -> p = 4/12, 2/12, 3/12.
  expected = math.exp(-(math.log(4 / 12) + math.log(2 / 12) + math.log(3 / 12)) / 3)
  assert pipeline.unigram_perplexity([train], [evals], CharTokenizer()) == pytest.approx(expected)


def test_pipeline_import_is_lazy():
  code = ("import sys, lmtrain.data.pipeline, lmtrain.data.tokenizer; "
          "print(sorted(m for m in ('seqio', 'tensorflow') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def test_seqio_task_as_source(tok, docs, docs_file):
  seqio_tasks.register_text_task("lmtrain_test_docs", [docs_file], tok.path)
  assert list(seqio_tasks.seqio_documents("lmtrain_test_docs")) == docs
  import seqio  # pylint: disable=g-import-not-at-top
  seqio_tasks.register_text_task("lmtrain_test_head", [docs_file], tok.path)
  seqio.MixtureRegistry.remove("lmtrain_test_mix")
  seqio.MixtureRegistry.add("lmtrain_test_mix", ["lmtrain_test_docs", "lmtrain_test_head"],
                            default_rate=1.0)
  assert list(seqio_tasks.seqio_documents("lmtrain_test_mix")) == docs + docs
  kwargs = dict(seq_len=SEQ_LEN, batch_size=4, seed=0)
  _assert_batches_equal(_take(pipeline.make_iterator("seqio:lmtrain_test_docs", tok, **kwargs), 3),
                        _take(pipeline.make_iterator(docs_file, tok, **kwargs), 3))
  with pytest.raises(UserError, match="^seqio:nope: not a registered Task or Mixture$"):
    list(seqio_tasks.seqio_documents("nope"))


# Demo corpus.


def test_demo_corpus(corpus, tmp_path):
  train, evals = corpus
  assert os.path.getsize(train) + os.path.getsize(evals) > 500_000
  train_docs = list(formats.iter_text_records(train))
  eval_docs = list(formats.iter_text_records(evals))
  assert 0.02 < len(eval_docs) / (len(train_docs) + len(eval_docs)) < 0.1
  assert all(demo.is_eval(d) for d in eval_docs) and not any(demo.is_eval(d) for d in train_docs)
  again = demo.write_pretrain_corpus(str(tmp_path))
  assert [open(p, "rb").read() for p in again] == [open(p, "rb").read() for p in corpus]
  mtime = os.path.getmtime(again[0])
  demo.write_pretrain_corpus(str(tmp_path))  # Present: left alone.
  assert os.path.getmtime(again[0]) == mtime
