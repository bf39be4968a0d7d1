"""Data layer: tokenizer, record formats, shared batching, seqio sources, demo corpus."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lmtrain.data import demo
from lmtrain.data import formats
from lmtrain.data import batching
from lmtrain.data import seqio_tasks
from lmtrain.data import tokenizer as tokenizer_lib
from lmtrain.errors import UserError

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
  with pytest.raises(UserError, match=r"bad.jsonl: no records \(1 bad records skipped; the first: "
                                      r".*bad.jsonl:1: expected a JSON object, got list\)$"):
    list(formats.iter_text_records(bad, on_error="skip"))


def test_plain_text_that_is_not_utf8_or_binary_is_a_bad_record(tmp_path):
  path = tmp_path / "mixed.txt"
  path.write_bytes(b"first doc\n\nbad \xff\xfe line\nsame paragraph\n\nthird\x00doc\n\nlast doc\n")
  with pytest.raises(UserError, match=r"mixed.txt:3: invalid UTF-8 at byte 4$"):
    list(formats.iter_text_records(str(path)))
  counter = formats.SkipCounter()
  docs = list(formats.iter_text_records(str(path), on_error="skip", counter=counter))
  assert docs == ["first doc", "last doc"]  # the bad lines' paragraphs are left out whole
  assert counter.messages == [f"{path}:3: invalid UTF-8 at byte 4",
                              f"{path}:6: binary data (a NUL byte); pretraining text must be UTF-8"]
  binary = tmp_path / "model.bin"
  binary.write_bytes(bytes(range(256)) * 4)
  with pytest.raises(UserError, match=r"model.bin:1: (invalid UTF-8|binary data)"):
    list(formats.iter_text_records(str(binary)))


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


# Shared batching.


def test_chunks_overlap_by_one(tok):
  assert [len(c["inputs"]) for c in batching.chunk_ids(np.arange(70), 32)] == [32, 32, 5]
  ids = batching.document_ids(tok, "a b")
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and ids.dtype == np.int32


def test_data_imports_are_lazy_and_acyclic():
  code = ("import sys, lmtrain.data.loader, lmtrain.data.prepare, lmtrain.data.sft, "
          "lmtrain.data.tokenizer; "
          "print(sorted(m for m in ('seqio', 'tensorflow', 'apache_beam') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def test_seqio_task_documents_and_mixture_rates(tok, docs, docs_file):
  seqio_tasks.register_text_task("lmtrain_test_docs", [docs_file], tok.path)
  assert list(seqio_tasks.seqio_documents("lmtrain_test_docs")) == docs
  import seqio  # pylint: disable=g-import-not-at-top
  seqio_tasks.register_text_task("lmtrain_test_head", [docs_file], tok.path)
  seqio.MixtureRegistry.remove("lmtrain_test_mix")
  seqio.MixtureRegistry.add("lmtrain_test_mix", [("lmtrain_test_docs", 3.0),
                                                 ("lmtrain_test_head", 1.0)])
  assert list(seqio_tasks.seqio_documents("lmtrain_test_mix")) == docs + docs
  assert seqio_tasks.mixture_rates("lmtrain_test_mix") == [("lmtrain_test_docs", 0.75),
                                                          ("lmtrain_test_head", 0.25)]
  assert seqio_tasks.mixture_rates("lmtrain_test_docs") is None
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
