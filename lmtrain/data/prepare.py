"""`lmtrain prepare`: raw text -> token shards + a manifest, as an Apache Beam pipeline.

    files -> [read, validate, tokenize: one work item per file] -> (shard, block of documents)
          -> GroupByKey(shard) -> [write shard-S.tokens / shard-S.index] -> manifest.json

DirectRunner runs it on this machine (several worker processes); the same pipeline runs on Dataflow,
Flink or Spark with their pipeline options when a corpus outgrows one machine. Output is
deterministic: a document goes to the shard that a hash of (file number, record number) names, and
each shard holds its documents in input order, whatever the runner's parallelism.

The shard format is two flat arrays per shard: `.tokens` (every document's ids, [BOS] text [EOS],
concatenated; uint16 when the vocabulary fits, else uint32) and `.index` (int64 offsets, one more
than the documents). We chose it over ArrayRecord because a token corpus needs nothing a record
container adds: a document is two offset reads and one contiguous slice, read zero-copy through a
memory map locally or with one ranged request from a bucket (ArrayRecord reads local files only
and decodes whole chunks to return one record).

`manifest.json` is written last: a prepare that crashed leaves none (a loader refuses the directory),
and rerunning overwrites the same shard names with the same bytes.
"""

import datetime
import hashlib
import json
import logging
import math
import os
import socket
import tempfile
from typing import Iterator

import numpy as np

import lmtrain
from lmtrain import fileio
from lmtrain.data import formats, sources
from lmtrain.errors import UserError

MANIFEST = sources.MANIFEST
FORMAT = "lmtrain.prepared/1"
TOKENIZER_COPY = "tokenizer.model"  # a prepared corpus carries its tokenizer
_WORK = ".prepare"  # per-run scratch under OUT: stats the workers write for the launcher
_BLOCK_TOKENS = 1 << 22  # tokens a file worker buffers per shard before handing a block on
_ENCODE_BATCH = 512  # documents per sentencepiece call
_MAX_MESSAGES = 20  # bad-record messages kept per file (all are counted)
_BYTES_PER_SHARD = 256 << 20  # default shard count: about this much input text per shard
_COMPRESSION_RATIO = 4  # assumed text bytes per compressed byte, for the default shard count


def shard_name(shard: int, num_shards: int) -> str:
  return f"shard-{shard:05d}-of-{num_shards:05d}"


def token_dtype(vocab_size: int) -> str:
  return "uint16" if vocab_size <= 1 << 16 else "uint32"


def sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def tokenizer_sha256(path: str) -> str:
  return sha256_bytes(fileio.read_bytes(path))


def shard_of(file_index: int, record: int, num_shards: int) -> int:
  """A document's shard: a 64-bit mix of (file number, record number), stable across runs."""
  x = (file_index * 0x9E3779B97F4A7C15 + record + 1) & 0xFFFFFFFFFFFFFFFF
  x ^= x >> 30
  x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
  x ^= x >> 27
  x = (x * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
  x ^= x >> 31
  return x % num_shards


def _documents(path: str, counter: formats.SkipCounter) -> Iterator[str]:
  """A source file's (or seqio Task's) documents; bad records go to `counter`, never raise."""
  if sources.is_seqio(path):
    from lmtrain.data import seqio_tasks  # pylint: disable=g-import-not-at-top
    name, _, split = path[len(sources.SEQIO_PREFIX):].partition("@")
    yield from seqio_tasks.seqio_documents(name, split=split or "train")
    return
  # Counted and reported by the launcher, which knows whether to stop on them.
  yield from formats.iter_text_records(path, on_error="skip", counter=counter, log_skips=False)


class _TokenizeFile:
  """(file number, path) -> (shard, (file number, block number, tokens, lengths)) blocks; a
  ("file", stats) record per file goes to the "files" output."""

  def __init__(self, tokenizer_bytes: bytes, num_shards: int, dtype: str):
    self._tokenizer_bytes = tokenizer_bytes
    self._num_shards = num_shards
    self._dtype = np.dtype(dtype)
    self._sp = None

  def setup(self):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self._sp = spm.SentencePieceProcessor()
    self._sp.LoadFromSerializedProto(self._tokenizer_bytes)

  def process(self, element):
    import apache_beam as beam  # pylint: disable=g-import-not-at-top
    if self._sp is None:
      self.setup()
    file_index, path = element
    counter = formats.SkipCounter(max_messages=_MAX_MESSAGES)
    bos, eos = self._sp.bos_id(), self._sp.eos_id()
    buffers = [[] for _ in range(self._num_shards)]  # per shard: arrays of documents
    buffered = [0] * self._num_shards
    blocks = 0
    documents = tokens = 0
    error = None

    def flush(shard):
      nonlocal blocks
      docs = buffers[shard]
      lengths = np.asarray([len(d) for d in docs], np.int64)
      block = (file_index, blocks, np.concatenate(docs).astype(self._dtype), lengths)
      buffers[shard], buffered[shard] = [], 0
      blocks += 1
      return shard, block

    def encode(texts, first_record):
      nonlocal documents, tokens
      for offset, ids in enumerate(self._sp.encode(texts)):
        doc = np.asarray([bos, *ids, eos], np.int64)
        shard = shard_of(file_index, first_record + offset, self._num_shards)
        buffers[shard].append(doc)
        buffered[shard] += len(doc)
        documents += 1
        tokens += len(doc)
        if buffered[shard] >= _BLOCK_TOKENS:
          yield flush(shard)

    texts, record = [], 0
    try:
      for text in _documents(path, counter):
        texts.append(text)
        if len(texts) == _ENCODE_BATCH:
          yield from encode(texts, record)
          record += len(texts)
          texts = []
      if texts:
        yield from encode(texts, record)
    except UserError as e:  # an empty file, a missing seqio Task, a storage failure
      error = str(e)
    for shard in range(self._num_shards):
      if buffers[shard]:
        yield flush(shard)
    stats = {"file_index": file_index, "path": path, "documents": documents, "tokens": tokens,
             "bad_records": counter.count, "messages": counter.messages, "error": error}
    yield beam.pvalue.TaggedOutput("files", stats)


class _WriteShard:
  """(shard, blocks) -> writes the shard's .tokens and .index; emits its stats and unigram counts."""

  def __init__(self, output: str, num_shards: int, vocab_size: int, dtype: str):
    self._output = output
    self._num_shards = num_shards
    self._vocab_size = vocab_size
    self._dtype = np.dtype(dtype)

  def process(self, element):
    shard, blocks = element
    blocks = sorted(blocks, key=lambda b: (b[0], b[1]))  # input order, whatever the runner did
    tokens = np.concatenate([b[2] for b in blocks]).astype(self._dtype)
    lengths = np.concatenate([b[3] for b in blocks])
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    name = shard_name(shard, self._num_shards)
    _write_file(os.path.join(self._output, f"{name}.tokens"), tokens.tobytes())
    _write_file(os.path.join(self._output, f"{name}.index"), offsets.tobytes())
    # Unigram counts of the targets: every token but each document's leading BOS.
    counts = np.bincount(tokens, minlength=self._vocab_size).astype(np.int64)
    counts -= np.bincount(tokens[offsets[:-1]], minlength=self._vocab_size)
    yield {"shard": shard, "name": name, "documents": int(len(lengths)),
           "tokens": int(len(tokens)), "sha256": sha256_bytes(tokens.tobytes())}, counts


def _write_file(path: str, data: bytes):
  """An atomic local write (temp file + rename), or one object write to a bucket."""
  if fileio.is_remote(path):
    fileio.write_bytes(path, data)
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def _sum_counts(arrays):
  total = None
  for a in arrays:
    total = a.copy() if total is None else total + a
  return total


def _write_stats(output: str, what: str):
  def write(items):
    if what == "unigram":
      _write_file(os.path.join(output, _WORK, "unigram.npy"), _npy_bytes(items))
    else:
      _write_file(os.path.join(output, _WORK, f"{what}.json"), json.dumps(items).encode())
  return write


def _npy_bytes(array) -> bytes:
  import io  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  np.save(buf, np.asarray(array, np.int64))
  return buf.getvalue()


def _import_beam():
  """apache_beam, imported without its import-time warnings on the root logger (which would also
  give the root logger a stderr handler) and with its own loggers at ERROR: a run's output and a
  one-line error stay what lmtrain prints."""
  root = logging.getLogger()
  placeholder = logging.NullHandler() if not root.handlers else None
  if placeholder:
    root.addHandler(placeholder)
  logging.disable(logging.WARNING)
  try:
    import apache_beam  # pylint: disable=g-import-not-at-top
  finally:
    logging.disable(logging.NOTSET)
    if placeholder:
      root.removeHandler(placeholder)
  logging.getLogger("apache_beam").setLevel(logging.ERROR)
  return apache_beam


def _run_beam(files, tokenizer_bytes, output, num_shards, vocab_size, dtype, pipeline_args):
  beam = _import_beam()
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top

  tokenize = _TokenizeFile(tokenizer_bytes, num_shards, dtype)
  write = _WriteShard(output, num_shards, vocab_size, dtype)
  with beam.Pipeline(options=PipelineOptions(list(pipeline_args))) as p:
    tokenized = (p
                 | "Files" >> beam.Create(list(enumerate(files)))
                 | "Spread" >> beam.Reshuffle()
                 | "Tokenize" >> beam.FlatMap(_process_with(tokenize)).with_outputs(
                     "files", main="blocks"))
    written = (tokenized.blocks
               | "ByShard" >> beam.GroupByKey()
               | "WriteShard" >> beam.FlatMap(write.process))
    _ = (tokenized.files | "FileStats" >> beam.combiners.ToList()
         | "WriteFileStats" >> beam.Map(_write_stats(output, "files")))
    _ = (written | "ShardStats" >> beam.Map(lambda s: s[0]) | "AllShards" >> beam.combiners.ToList()
         | "WriteShardStats" >> beam.Map(_write_stats(output, "shards")))
    _ = (written | "Counts" >> beam.Map(lambda s: s[1])
         | "SumCounts" >> beam.CombineGlobally(_sum_counts).without_defaults()
         | "WriteCounts" >> beam.Map(_write_stats(output, "unigram")))


def _process_with(dofn):
  """A FlatMap function over `dofn.process` that loads the tokenizer once per worker."""
  def fn(element):
    return dofn.process(element)
  return fn


def default_num_shards(files: list[str]) -> int:
  total = 0
  for path in files:
    size = sources.size_bytes(path)
    total += size * (_COMPRESSION_RATIO if path.endswith(sources.COMPRESSED_EXTENSIONS) else 1)
  return max(1, min(4096, math.ceil(total / _BYTES_PER_SHARD)))


def direct_runner_args(workers: int | None = None) -> list[str]:
  """DirectRunner options: several worker processes, or one in-process worker for workers=1."""
  workers = workers or max(1, os.cpu_count() or 1)
  if workers == 1:
    return ["--runner=DirectRunner", "--direct_num_workers=1", "--direct_running_mode=in_memory"]
  return ["--runner=DirectRunner", f"--direct_num_workers={workers}",
          "--direct_running_mode=multi_processing"]


def prepare(inputs, tokenizer_path: str, output: str, *, name: str | None = None,
            num_shards: int | None = None, on_error: str = "raise",
            pipeline_args=None, skip_hint: str | None = "--skip_bad_records") -> dict:
  """Prepares `inputs` (files, globs, gs:// URLs, seqio names) into `output`; returns the manifest.

  on_error="raise" fails (and writes no manifest) when any record is bad, naming the first as
  `FILE:LINE: what is wrong`; "skip" leaves bad records out and counts them in the manifest.
  pipeline_args: Beam pipeline options (default: DirectRunner with one worker per core).
  skip_hint: how the caller skips bad records, named in the error.
  """
  if on_error not in ("raise", "skip"):
    raise UserError(f'on_error must be "raise" or "skip", got {on_error!r}')
  files = sources.expand_sources(inputs)
  output = fileio.absolute(output)
  if any(os.path.normpath(f).startswith(os.path.normpath(output) + os.sep) for f in files
         if not fileio.is_remote(f)):
    raise UserError(f"--output {output}: is a directory of the inputs; write elsewhere")
  from lmtrain.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tok = tokenizer_lib.Tokenizer.load(tokenizer_path)
  tokenizer_bytes = fileio.read_bytes(tokenizer_path)
  dtype = token_dtype(tok.vocab_size)
  num_shards = num_shards or default_num_shards(files)
  if num_shards < 1:
    raise UserError(f"--num_shards must be positive, got {num_shards}")
  pipeline_args = list(pipeline_args) if pipeline_args else direct_runner_args()

  fileio.makedirs(output)
  manifest_path = os.path.join(output, MANIFEST)
  if fileio.exists(manifest_path):  # from here on the directory is not a usable corpus
    fileio.remove(manifest_path)
  work = os.path.join(output, _WORK)
  _remove_tree(work)
  try:
    _run_beam(files, tokenizer_bytes, output, num_shards, tok.vocab_size, dtype, pipeline_args)
  except UserError:
    raise
  except Exception as e:  # a runner wraps a worker's exception in its own
    lines = [line for line in str(e).splitlines() if line.strip()]
    raise UserError(f"prepare failed: {lines[-1] if lines else type(e).__name__}") from e

  file_stats = sorted(json.loads(fileio.read_text(os.path.join(work, "files.json"))),
                      key=lambda s: s["file_index"])
  shard_path = os.path.join(work, "shards.json")
  shard_stats = (sorted(json.loads(fileio.read_text(shard_path)), key=lambda s: s["shard"])
                 if fileio.exists(shard_path) else [])
  errors = [s["error"] for s in file_stats if s["error"]]
  bad = sum(s["bad_records"] for s in file_stats)
  if errors:
    raise UserError(errors[0])
  if bad and on_error == "raise":
    first = next(s["messages"][0] for s in file_stats if s["messages"])
    if skip_hint:
      first += (f" ({bad} bad record{'s' if bad > 1 else ''} in all; skip and count them with "
                f"{skip_hint})")
    raise UserError(first)
  if not shard_stats:
    raise UserError(f"{', '.join(inputs) if not isinstance(inputs, str) else inputs}: no documents")
  unigram = np.load(_open_npy(os.path.join(work, "unigram.npy")))

  # Shards of an earlier prepare into the same directory that this one did not write.
  keep = {f"{s['name']}{ext}" for s in shard_stats for ext in (".tokens", ".index")}
  for entry in fileio.listdir(output):
    if entry.startswith("shard-") and entry not in keep:
      fileio.remove(os.path.join(output, entry))
  _write_file(os.path.join(output, TOKENIZER_COPY), tokenizer_bytes)
  manifest = {
      "format": FORMAT,
      "name": name or os.path.basename(output.rstrip("/")),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "lmtrain_version": lmtrain.__version__,
      "tokenizer": {"path": fileio.absolute(tokenizer_path), "sha256": sha256_bytes(tokenizer_bytes),
                    "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id},
      "dtype": dtype,
      "documents": sum(s["documents"] for s in shard_stats),
      "tokens": sum(s["tokens"] for s in shard_stats),
      "bad_records": bad,
      "bad_record_examples": [m for s in file_stats for m in s["messages"]][:_MAX_MESSAGES],
      "sources": [{"path": s["path"], "documents": s["documents"], "tokens": s["tokens"],
                   "bad_records": s["bad_records"]} for s in file_stats],
      "shards": [{"name": s["name"], "documents": s["documents"], "tokens": s["tokens"],
                  "sha256": s["sha256"]} for s in shard_stats],
      "unigram_counts": [int(c) for c in unigram],
  }
  _remove_tree(work)
  _write_file(manifest_path, json.dumps(manifest, indent=1).encode())
  logging.info("prepared %s: %d documents, %d tokens in %d shards", output,
               manifest["documents"], manifest["tokens"], len(shard_stats))
  return manifest


def _open_npy(path: str):
  import io  # pylint: disable=g-import-not-at-top
  return io.BytesIO(fileio.read_bytes(path))


def _remove_tree(path: str):
  if fileio.is_remote(path):
    if fileio.exists(path):
      from etils import epath  # pylint: disable=g-import-not-at-top
      epath.Path(path).rmtree()
    return
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(path, ignore_errors=True)


def read_manifest(path: str) -> dict:
  """The manifest of the prepared corpus in directory `path`, checked for its format."""
  manifest_path = os.path.join(path, MANIFEST)
  if not fileio.exists(manifest_path):
    raise UserError(f"{path}: no {MANIFEST} (not a prepared corpus, or its prepare did not "
                    f"finish: run `lmtrain prepare` again)")
  try:
    manifest = json.loads(fileio.read_text(manifest_path))
  except json.JSONDecodeError as e:
    raise UserError(f"{manifest_path}: invalid JSON ({e.msg})") from None
  if manifest.get("format") != FORMAT:
    raise UserError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
  return manifest


def cached_prepare(raw_sources: list[str], tokenizer_path: str, cache_root: str,
                   on_error: str = "raise") -> str:
  """Raw files prepared once into `cache_root/<key>` (key: the files' paths, sizes and times and
  the tokenizer's sha256), in this process with one Beam worker; returns the corpus directory.

  Processes that share the directory each prepare into a temporary sibling and rename it into
  place; the first rename wins and the others discard theirs (the contents are identical).
  """
  files = sources.expand_sources(raw_sources)
  key_parts = [tokenizer_sha256(tokenizer_path), on_error]
  total = 0
  for path in files:
    if sources.is_seqio(path):
      key_parts.append(path)
      continue
    size = sources.size_bytes(path)
    total += size
    mtime = os.path.getmtime(path) if not fileio.is_remote(path) else 0
    key_parts.append(f"{fileio.absolute(path)}:{size}:{mtime}")
  key = hashlib.sha256("\n".join(key_parts).encode()).hexdigest()[:16]
  final = os.path.join(cache_root, key)
  if fileio.exists(os.path.join(final, MANIFEST)):
    return final
  if total > RAW_HINT_BYTES:
    print(f"lmtrain: preparing {total / 1e9:.1f} GB of raw text in this process; for a corpus "
          f"this size run `lmtrain prepare --input ... --output DIR` once (several workers, or "
          f"Dataflow) and set TRAIN_DATA=DIR", flush=True)
  try:
    os.makedirs(cache_root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{key}.", dir=cache_root)
  except OSError as e:
    raise UserError(f"--workdir {workdir_of(cache_root)}: cannot write there "
                    f"({e.strerror})") from None
  try:
    prepare(files, tokenizer_path, tmp, name=key, on_error=on_error,
            pipeline_args=direct_runner_args(1), skip_hint=None)
    try:
      os.rename(tmp, final)
    except OSError:  # another process renamed its copy first
      if not fileio.exists(os.path.join(final, MANIFEST)):
        raise
  finally:
    _remove_tree(tmp)
  return final


def workdir_of(cache_root: str) -> str:
  """The work dir of a DIR/data/prepared cache directory."""
  return os.path.dirname(os.path.dirname(cache_root.rstrip(os.sep)))


RAW_HINT_BYTES = 1 << 30  # raw sources above this size print a hint to use `lmtrain prepare`
