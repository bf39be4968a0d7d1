"""Prepared corpora: `lmtrain prepare` (Beam, DirectRunner) and the loader over its shards."""

import collections
import gzip
import json
import os
import subprocess
import sys

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lmtrain import parallel
from lmtrain.data import batching, demo, loader, prepare, tokenizer as tokenizer_lib
from lmtrain.errors import UserError
from lmtrain.stages import common
from lmtrain.train import evaluation

SEQ_LEN = 32
ONE_WORKER = prepare.direct_runner_args(1)


@pytest.fixture(scope="module")
def tok(tokenizer_path):
  return tokenizer_lib.Tokenizer.load(tokenizer_path)


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
  """120 documents of varied lengths, short and longer than SEQ_LEN tokens."""
  train, _ = demo.write_pretrain_corpus(str(tmp_path_factory.mktemp("demo")))
  texts = [json.loads(line)["text"] for line in open(train, encoding="utf-8")][:120]
  return [text[:20 + 13 * i] for i, text in enumerate(texts)]


@pytest.fixture(scope="module")
def files(docs, tmp_path_factory):
  """The documents split over a JSONL file, a gzipped JSONL file and a plain text file."""
  d = tmp_path_factory.mktemp("raw")
  (d / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:50]))
  with gzip.open(d / "b.jsonl.gz", "wt") as f:
    f.write("".join(json.dumps({"text": t}) + "\n" for t in docs[50:100]))
  (d / "c.txt").write_text("\n\n".join(t.replace("\n\n", "\n") for t in docs[100:]) + "\n")
  return [str(d / "a.jsonl"), str(d / "b.jsonl.gz"), str(d / "c.txt")]


@pytest.fixture(scope="module")
def corpus_dir(files, tok, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("prepared") / "corpus")
  prepare.prepare(files, tok.path, out, num_shards=3, pipeline_args=ONE_WORKER)
  return out


def _expected_docs(docs, tok):
  return [batching.document_ids(tok, t.replace("\n\n", "\n") if i >= 100 else t)
          for i, t in enumerate(docs)]


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _segments(batches):
  """Every packed segment of the batches as a tuple of its inputs plus its last target."""
  out = []
  for b in batches:
    for r in range(len(b["inputs"])):
      seg = b["segment_ids"][r]
      for s in range(1, int(seg.max()) + 1):
        where = seg == s
        out.append(tuple(b["inputs"][r][where]) + (int(b["targets"][r][where][-1]),))
  return out


def _all_chunks(docs_ids):
  return collections.Counter(tuple(c["inputs"]) + (int(c["targets"][-1]),)
                             for ids in docs_ids for c in batching.chunk_ids(ids, SEQ_LEN))


# prepare


def test_manifest_counts_equal_a_direct_count(corpus_dir, docs, tok, files):
  expected = _expected_docs(docs, tok)
  manifest = prepare.read_manifest(corpus_dir)
  assert manifest["documents"] == len(docs) == sum(s["documents"] for s in manifest["shards"])
  assert manifest["tokens"] == sum(len(d) for d in expected)
  assert [s["documents"] for s in manifest["sources"]] == [50, 50, 20]
  assert [s["path"] for s in manifest["sources"]] == files
  assert len(manifest["shards"]) == 3 and manifest["dtype"] == "uint16"
  assert manifest["tokenizer"]["sha256"] == prepare.tokenizer_sha256(tok.path)
  assert manifest["tokenizer"]["vocab_size"] == tok.vocab_size
  counts = np.zeros(tok.vocab_size, np.int64)
  for d in expected:
    counts += np.bincount(d[1:], minlength=tok.vocab_size)
  np.testing.assert_array_equal(manifest["unigram_counts"], counts)
  corpus = loader.Corpus(corpus_dir)
  got = sorted(tuple(corpus[i]) for i in range(len(corpus)))
  assert got == sorted(tuple(d) for d in expected)
  assert open(os.path.join(corpus_dir, "tokenizer.model"), "rb").read() == open(tok.path,
                                                                                "rb").read()


def test_prepare_again_is_idempotent_and_drops_stale_shards(files, tok, tmp_path):
  out = str(tmp_path / "c")
  prepare.prepare(files, tok.path, out, num_shards=4, pipeline_args=ONE_WORKER)
  first = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)
           if n.startswith("shard-")}
  prepare.prepare(files, tok.path, out, num_shards=2, pipeline_args=ONE_WORKER)
  prepare.prepare(files, tok.path, out, num_shards=4, pipeline_args=ONE_WORKER)
  again = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)
           if n.startswith("shard-")}
  assert again == first and len(first) == 8  # 4 shards x (.tokens, .index); the 2-shard run's gone
  assert not os.path.exists(os.path.join(out, ".prepare"))


def test_bad_records_stop_with_file_and_line_or_are_skipped(tok, tmp_path, files):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "fine"}\n{"text": 1}\n{"text": "also fine"}\nnot json\n')
  out = str(tmp_path / "out")
  with pytest.raises(UserError, match=r'bad\.jsonl:2: "text" must be a string, got int '
                                      r'\(2 bad records in all; skip'):
    prepare.prepare([files[0], str(bad)], tok.path, out, pipeline_args=ONE_WORKER)
  assert not os.path.exists(os.path.join(out, "manifest.json"))
  manifest = prepare.prepare([str(bad)], tok.path, out, on_error="skip",
                             pipeline_args=ONE_WORKER)
  assert manifest["documents"] == 2 and manifest["bad_records"] == 2
  assert manifest["bad_record_examples"][1].endswith("bad.jsonl:4: invalid JSON "
                                                     "(Expecting value at column 1)")
  proc = subprocess.run([sys.executable, "-m", "lmtrain.cli", "prepare", "--input", str(bad),
                         "--tokenizer", tok.path, "--output", str(tmp_path / "cli"),
                         "--num_workers", "1"], capture_output=True, text=True)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith(
      f"lmtrain: error: {bad}:2: \"text\" must be a string")
  with pytest.raises(UserError, match="nothing.jsonl: file not found"):
    prepare.prepare([str(tmp_path / "nothing.jsonl")], tok.path, out, pipeline_args=ONE_WORKER)


# loader


def test_packed_rows_hold_chunks_of_the_documents(corpus_dir, docs, tok):
  corpus = loader.Corpus(corpus_dir)
  chunks = _all_chunks(_expected_docs(docs, tok))
  batches = _take(loader.make_iterator([corpus], seq_len=SEQ_LEN, batch_size=8, seed=0), 6)
  for b in batches:
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
        "inputs": ((8, SEQ_LEN), np.int32), "targets": ((8, SEQ_LEN), np.int32),
        "segment_ids": ((8, SEQ_LEN), np.int32), "positions": ((8, SEQ_LEN), np.int32),
        "loss_mask": ((8, SEQ_LEN), np.float32)}
    np.testing.assert_array_equal(b["loss_mask"], (b["segment_ids"] > 0).astype(np.float32))
    for r in range(8):
      seg = b["segment_ids"][r]
      assert seg[0] == 1 and np.all(np.diff(seg[seg > 0]) >= 0)
      for s in range(1, seg.max() + 1):
        np.testing.assert_array_equal(b["positions"][r][seg == s], np.arange((seg == s).sum()))
  segments = _segments(batches)
  assert all(s in chunks for s in segments) and len(segments) > 6 * 8


@pytest.mark.parametrize("hosts", [1, 2, 4])
def test_an_epoch_over_all_hosts_is_every_chunk_exactly_once(corpus_dir, docs, tok, hosts):
  corpus = loader.Corpus(corpus_dir)
  got = collections.Counter()
  for p in range(hosts):
    it = loader.make_iterator([corpus], seq_len=SEQ_LEN, batch_size=8, seed=5, process_index=p,
                              process_count=hosts, num_epochs=1)
    batches = list(it)
    assert batches and all(b["inputs"].shape == (8 // hosts, SEQ_LEN) for b in batches)
    got.update(_segments(batches))
  assert got == _all_chunks(_expected_docs(docs, tok))


def test_same_seed_same_batches_and_epochs_reshuffle(corpus_dir):
  corpus = loader.Corpus(corpus_dir)
  first = lambda seed: _take(loader.make_iterator([corpus], seq_len=SEQ_LEN, batch_size=4,
                                                  seed=seed), 3)
  for x, y in zip(first(0), first(0)):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(first(0)[0]["inputs"], first(1)[0]["inputs"])
  stream = loader.DocumentStream([corpus], None, seed=0, shuffle=True, num_epochs=2)
  n = len(corpus)
  epochs = [[stream(g)[1] for g in range(e * n, (e + 1) * n)] for e in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(n)) and epochs[0] != epochs[1]
  assert stream(2 * n) is None


def test_resume_on_the_same_host_count_is_exact(corpus_dir, tmp_path):
  corpus = loader.Corpus(corpus_dir)
  kwargs = dict(seq_len=SEQ_LEN, batch_size=4, seed=0, process_index=1, process_count=2)
  it = loader.make_iterator([corpus], **kwargs)
  _take(it, 5)
  state = it.get_state()
  json.dumps(state)
  expected = _take(it, 3)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
    again = loader.make_iterator([corpus], **kwargs)
    _take(again, 5)
    manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(again)))
    manager.wait_until_finished()
    restored = loader.make_iterator([corpus], **kwargs)
    manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  for x, y in zip(_take(restored, 3), expected):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("new_hosts", [1, 4])
def test_resume_on_another_host_count_continues_without_replay(corpus_dir, docs, tok,
                                                                new_hosts):
  corpus = loader.Corpus(corpus_dir)
  kwargs = dict(seq_len=SEQ_LEN, batch_size=8, seed=2, num_epochs=1)
  seen, states = collections.Counter(), []
  for p in range(2):
    it = loader.make_iterator([corpus], process_index=p, process_count=2, **kwargs)
    seen.update(_segments(_take(it, 4)))
    states.append(it.get_state())
  start, carry, skip = loader.resume_position(states)
  assert start > 0 and carry and skip  # not the corpus's start; the old hosts' lead is skipped
  for p in range(new_hosts):
    it = loader.make_iterator([corpus], process_index=p, process_count=new_hosts, **kwargs)
    it.set_state({"resume_from_hosts": states})
    assert it.get_state()["base"] == start
    seen.update(_segments(list(it)))
  # The old hosts' batches and the new hosts' epoch hold every chunk once: none skipped or replayed.
  assert seen == _all_chunks(_expected_docs(docs, tok))


def test_mixture_proportions_hold_over_10k_rows_and_across_a_resume(corpus_dir, files, tok,
                                                                    tmp_path):
  other = str(tmp_path / "other")
  prepare.prepare(files[:1], tok.path, other, num_shards=1, pipeline_args=ONE_WORKER)
  corpora = [loader.Corpus(corpus_dir), loader.Corpus(other)]
  stream = loader.DocumentStream(corpora, [0.7, 0.3], seed=0, shuffle=True, num_epochs=None)
  picks = np.array([stream(g)[0] for g in range(10_000)])
  assert abs((picks == 0).mean() - 0.7) < 0.02
  for lo in range(0, 10_000, 2_000):  # and over every stretch, not only on average
    assert abs((picks[lo:lo + 2_000] == 0).mean() - 0.7) < 0.02
  # An iterator reads positions in order; after a resume it reads the very same positions.
  kwargs = dict(seq_len=SEQ_LEN, batch_size=4, seed=0, weights=[0.7, 0.3])
  it = loader.make_iterator(corpora, **kwargs)
  _take(it, 20)
  state = it.get_state()
  restored = loader.make_iterator(corpora, **kwargs)
  restored.set_state(state)
  for x, y in zip(_take(restored, 10), _take(it, 10)):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  assert restored.get_state() == it.get_state()  # the same positions of the same stream
  with pytest.raises(UserError, match="mixture weights must be positive"):
    loader.DocumentStream(corpora, [1.0, 0.0], seed=0, shuffle=True, num_epochs=None)


def test_a_corpus_of_another_tokenizer_is_a_one_line_error(corpus_dir, files, tmp_path):
  other = tokenizer_lib.train_tokenizer(files[:1], 400, str(tmp_path / "other.model"))
  with pytest.raises(UserError, match=r"^TRAIN_DATA=.*corpus: prepared with tokenizer sha256 "
                                      r"\w+\.\.\. .* but the run's tokenizer .*other.model has"):
    common.text_corpora(str(tmp_path), [corpus_dir], tokenizer_lib.Tokenizer.load(other),
                        what="TRAIN_DATA")
  with pytest.raises(UserError, match="no manifest.json"):
    loader.Corpus(str(tmp_path))


def test_raw_files_are_prepared_once_into_the_work_dir(files, tok, tmp_path):
  corpora, weights = common.text_corpora(str(tmp_path), files, tok, what="TRAIN_DATA")
  assert weights is None and len(corpora) == 1 and len(corpora[0]) == 120
  assert corpora[0].path.startswith(str(tmp_path / "data" / "prepared"))
  again, _ = common.text_corpora(str(tmp_path), files, tok, what="TRAIN_DATA")
  assert again[0].path == corpora[0].path
  mixed, weights = common.text_corpora(str(tmp_path), {files[0]: 3, files[1]: 1}, tok,
                                       what="TRAIN_DATA")
  assert [len(c) for c in mixed] == [50, 50] and weights == [3.0, 1.0]


def test_unigram_perplexity_from_manifest_counts(tmp_path):
  class Counts:
    def __init__(self, counts):
      self.unigram_counts = np.asarray(counts)
  # Train targets a:3, b:1, eos:2 of 6 over 6 ids, add-one: /12. Eval targets a b eos.
  train = Counts([0, 2, 0, 0, 3, 1])
  evals = Counts([0, 1, 0, 0, 1, 1])
  expected = np.exp(-(np.log(4 / 12) + np.log(2 / 12) + np.log(3 / 12)) / 3)
  assert loader.unigram_perplexity([train], [evals], 6) == pytest.approx(expected)


# multi-host plumbing


def test_hosts_run_the_same_number_of_eval_batches(monkeypatch):
  """Host 0 has 3 eval batches, host 1 has 1: both run 3, host 1's last two at weight 0."""
  from jax.experimental import multihost_utils
  monkeypatch.setattr(evaluation.jax, "process_count", lambda: 2)
  batch = lambda v: {"inputs": np.full((2, 4), v, np.int32), "loss_mask": np.ones((2, 4),
                                                                                  np.float32)}
  counts = {0: 3, 1: 1}
  for me, other in ((0, 1), (1, 0)):
    calls = iter(range(10))
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda x, _o=other: np.array([bool(x), next(calls) < counts[_o]]))
    got = list(evaluation.host_eval_batches([batch(i + 1) for i in range(counts[me])], 8,
                                      batch(0)))
    assert len(got) == 3
    assert [float(b["loss_mask"].sum()) for b in got] == ([8.0] * 3 if me == 0 else
                                                          [8.0, 0.0, 0.0])
  # Batches without a loss mask stop where the first host ran out.
  calls = iter(range(10))
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: np.array([bool(x), next(calls) < 1]))
  assert len(list(evaluation.host_eval_batches([{"x": np.ones(2)}] * 3, 8, {"x": np.ones(2)}))) == 1


def test_a_multi_host_tpu_vm_starts_jax_distributed(monkeypatch):
  started = []
  monkeypatch.setattr(parallel.jax.distributed, "initialize", lambda **kw: started.append(kw))
  for name in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
               "LMTRAIN_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(name, raising=False)
  asked = []
  monkeypatch.setattr(parallel, "_tpu_metadata",
                      lambda attr: asked.append(attr) or "10.0.0.2:8470,10.0.0.3:8470")
  parallel.maybe_initialize_distributed()  # no TPU device files here: nothing asked or started
  assert not started and not asked
  real_exists = os.path.exists
  monkeypatch.setattr(parallel.os.path, "exists",
                      lambda p: p == "/dev/vfio/0" or real_exists(p))
  assert parallel.tpu_host_count() == 2
  parallel.maybe_initialize_distributed()
  assert len(started) == 1 and asked == ["worker-network-endpoints", "worker-network-endpoints"]
  monkeypatch.setattr(parallel, "_tpu_metadata", lambda attr: "10.0.0.2:8470")
  parallel.maybe_initialize_distributed()  # a single-host TPU VM needs no distributed runtime
  assert len(started) == 1
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1,w2,w3")
  assert parallel.tpu_host_count() == 4
