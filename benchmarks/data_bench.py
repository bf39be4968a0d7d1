"""Data benchmark: `lmtrain prepare` and the loader on synthetic corpora made on the fly.

    python benchmarks/data_bench.py --sizes_mb 10 100 1000 --prepare_max_mb 100

For each size: a JSONL corpus of demo-corpus paragraphs in random order (prepared with one Beam
worker, next to the raw sentencepiece encode rate on one core in the same run, up to
--prepare_max_mb), then the loader in a fresh process over a prepared corpus of that size (the larger
ones written directly as token shards): time to first batch, tokens/s on one core, and after 100
batches the peak resident memory (VmHWM: mapped shard pages, which are page cache, included) and
the process's own memory (RssAnon). Figures are printed, never asserted.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import numpy as np

from lmtrain.data import demo, formats, prepare, tokenizer as tokenizer_lib

SEQ_LEN, BATCH = 2048, 16


def write_corpus(path: str, size_mb: int, seed: int = 0) -> int:
  train, _ = demo.write_pretrain_corpus(os.path.join(os.path.dirname(path), "demo"))
  docs = list(formats.iter_text_records(train))
  rng = random.Random(seed)
  written = 0
  with open(path, "w", encoding="utf-8") as f:
    while written < size_mb << 20:
      line = json.dumps({"text": rng.choice(docs)}) + "\n"
      f.write(line)
      written += len(line)
  return written


def synthetic_prepared(out: str, tokens: int, tokenizer_path: str, vocab: int):
  """A prepared corpus of `tokens` random ids in documents of 200-2000 tokens, written directly."""
  os.makedirs(out, exist_ok=True)
  rng = np.random.default_rng(0)
  lengths = rng.integers(200, 2000, size=tokens // 1100 + 1)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  ids = rng.integers(4, vocab, size=int(offsets[-1]), dtype=np.uint16)
  ids[offsets[:-1]] = 2
  name = prepare.shard_name(0, 1)
  ids.tofile(os.path.join(out, f"{name}.tokens"))
  offsets.tofile(os.path.join(out, f"{name}.index"))
  manifest = {"format": prepare.FORMAT, "name": "synthetic", "dtype": "uint16",
              "tokenizer": {"sha256": prepare.tokenizer_sha256(tokenizer_path), "vocab_size": vocab},
              "documents": int(len(lengths)), "tokens": int(offsets[-1]),
              "shards": [{"name": name, "documents": int(len(lengths)), "tokens": int(offsets[-1])}],
              "unigram_counts": []}
  with open(os.path.join(out, prepare.MANIFEST), "w") as f:
    json.dump(manifest, f)


LOADER_CHILD = """
import sys, time
start = time.time()
from lmtrain.data import loader
corpus = loader.Corpus(sys.argv[1])
it = loader.make_iterator([corpus], seq_len=int(sys.argv[2]), batch_size=int(sys.argv[3]), seed=0)
next(it)
first = time.time() - start
t = time.time(); tokens = 0
for _ in range(100):
  tokens += int(next(it)["loss_mask"].sum())
rate = tokens / (time.time() - t)
# VmHWM, not getrusage's ru_maxrss: that one keeps the forking parent's peak across exec.
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
rss = int(status["VmHWM"].split()[0]) / 1024  # peak resident, mapped shard pages included
anon = int(status["RssAnon"].split()[0]) / 1024  # the process's own memory, without mapped files
print(f"{first:.3f} {rate:.0f} {rss:.0f} {anon:.0f}", flush=True)
it.close()  # stop the prefetch thread before the interpreter tears down
"""


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--sizes_mb", type=int, nargs="+", default=[10, 100, 1000])
  parser.add_argument("--prepare_max_mb", type=int, default=100)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    train, _ = demo.write_pretrain_corpus(os.path.join(tmp, "demo"))
    tok_path = tokenizer_lib.train_tokenizer([train], 8192, os.path.join(tmp, "tok.model"))
    tok = tokenizer_lib.Tokenizer.load(tok_path)
    print(f"{'size':>7} {'prepare tok/s':>14} {'encode tok/s':>13} {'ratio':>6} "
          f"{'first batch s':>14} {'loader tok/s':>13} {'peak RSS MB':>12} {'anon MB':>8}")
    for size in args.sizes_mb:
      corpus_dir = os.path.join(tmp, f"c{size}")
      prep_rate = enc_rate = ratio = float("nan")
      if size <= args.prepare_max_mb:
        raw = os.path.join(tmp, f"raw{size}.jsonl")
        write_corpus(raw, size)
        texts = list(formats.iter_text_records(raw))[:20000]
        t = time.time()
        n = sum(len(ids) + 2 for ids in tok._sp.encode(texts))  # pylint: disable=protected-access
        enc_rate = n / (time.time() - t)
        t = time.time()
        manifest = prepare.prepare([raw], tok_path, corpus_dir,
                                   pipeline_args=prepare.direct_runner_args(1))
        prep_rate = manifest["tokens"] / (time.time() - t)
        ratio = prep_rate / enc_rate
        os.remove(raw)
      else:
        synthetic_prepared(corpus_dir, (size << 20) // 4, tok_path, tok.vocab_size)
      out = subprocess.run([sys.executable, "-c", LOADER_CHILD, corpus_dir, str(SEQ_LEN),
                            str(BATCH)], capture_output=True, text=True)
      if out.returncode != 0:
        raise SystemExit(f"loader child failed at {size} MB:\n{out.stderr[-2000:]}")
      first, rate, rss, anon = out.stdout.split()
      print(f"{size:>5}MB {prep_rate:>14,.0f} {enc_rate:>13,.0f} {ratio:>6.2f} {float(first):>14.2f}"
            f" {float(rate):>13,.0f} {float(rss):>12,.0f} {float(anon):>8,.0f}", flush=True)


if __name__ == "__main__":
  main()
