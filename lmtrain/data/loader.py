"""Training batches from prepared corpora (data/prepare.py), read by document index.

The global document stream is a pure function of the position g = 0, 1, 2, ...: per corpus a seeded
index shuffle per epoch (grain's, which never materialises the order), several corpora interleaved
by grain's `mix` at exact proportions of their weights. Host p of P reads the positions
base + p, base + p + P, ...: only its share of each global batch, from any corpus size, with host
memory and start-up time independent of it. Each document is cut into chunks of at most seq_len
targets (as `batching.chunk_ids`) and packed first-fit into the rows of the host's batch; a chunk
that fits no row waits for the next batch.

The iterator's state is {base, next, carry, skip}: the host's next local position, the chunks it has
read but not yet emitted, and positions ahead of it that an earlier run already read. Restored on
the same host count it continues bit-exactly. On another host count
(`set_state({"resume_from_hosts": [old states]})`, which train/checkpoint.py sends) the new hosts
start together at the lowest position that some old host had not read, share out the chunks the
old hosts held, and skip the positions beyond it that the hosts ahead had read: the run continues
where the data order was, with no document skipped or read twice (only the order of a global
batch's worth of documents differs from an uninterrupted run).
"""

import bisect
import concurrent.futures
import os
import threading

import grain
import numpy as np

from lmtrain import fileio
from lmtrain.data import batching, prepare
from lmtrain.errors import UserError

_READ_AHEAD = 64  # documents fetched in parallel ahead of the packer from a bucket
STATE_KIND = "lmtrain.loader/1"


class Corpus:
  """A prepared corpus opened for random access: `len()` documents, `corpus[i]` -> int32 ids.

  Local shards are memory-mapped (nothing is read until a document is); bucket shards are read
  with ranged requests. Picklable: the maps are reopened on first use in a new process.
  """

  def __init__(self, path: str):
    self.path = fileio.absolute(path)
    self.manifest = prepare.read_manifest(self.path)
    self.dtype = np.dtype(self.manifest["dtype"])
    self.shards = [s["name"] for s in self.manifest["shards"]]
    counts = [s["documents"] for s in self.manifest["shards"]]
    self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64).tolist()
    self.remote = fileio.is_remote(self.path)
    self._maps = {}
    self._local = threading.local()

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_maps"], state["_local"] = {}, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._local = threading.local()

  def __len__(self) -> int:
    return self.starts[-1]

  @property
  def tokens(self) -> int:
    return int(self.manifest["tokens"])

  @property
  def unigram_counts(self) -> np.ndarray:
    return np.asarray(self.manifest["unigram_counts"], np.int64)

  def _locate(self, i: int) -> tuple[int, int]:
    if not 0 <= i < len(self):
      raise IndexError(f"document {i} of {len(self)}")
    shard = bisect.bisect_right(self.starts, i) - 1
    return shard, i - self.starts[shard]

  def _map(self, shard: int):
    maps = self._maps.get(shard)
    if maps is None:
      base = os.path.join(self.path, self.shards[shard])
      try:
        maps = (np.memmap(f"{base}.index", np.int64, mode="r"),
                np.memmap(f"{base}.tokens", self.dtype, mode="r"))
      except (OSError, ValueError) as e:
        raise UserError(f"{base}: cannot read shard ({e})") from None
      self._maps[shard] = maps
    return maps

  def _read_range(self, name: str, start: int, stop: int) -> bytes:
    files = getattr(self._local, "files", None)
    if files is None:
      files = self._local.files = {}
    f = files.get(name)
    if f is None:
      from etils import epath  # pylint: disable=g-import-not-at-top
      f = files[name] = epath.Path(os.path.join(self.path, name)).open("rb")
    f.seek(start)
    return f.read(stop - start)

  def __getitem__(self, i: int) -> np.ndarray:
    shard, local = self._locate(int(i))
    if not self.remote:
      index, tokens = self._map(shard)
      return np.asarray(tokens[index[local]:index[local + 1]], np.int32)
    name = self.shards[shard]
    start, stop = np.frombuffer(self._read_range(f"{name}.index", 8 * local, 8 * local + 16),
                                np.int64)
    size = self.dtype.itemsize
    data = self._read_range(f"{name}.tokens", int(start) * size, int(stop) * size)
    return np.frombuffer(data, self.dtype).astype(np.int32)


def check_tokenizer(corpus: Corpus, tokenizer, what: str):
  """One-line errors for a corpus prepared with another tokenizer than the run's."""
  expected = corpus.manifest["tokenizer"]["sha256"]
  actual = prepare.tokenizer_sha256(tokenizer.path)
  if expected != actual:
    raise UserError(
        f"{what}={corpus.path}: prepared with tokenizer sha256 {expected[:12]}... "
        f"({corpus.manifest['tokenizer']['path']}), but the run's tokenizer {tokenizer.path} has "
        f"sha256 {actual[:12]}...; set TOKENIZER to {os.path.join(corpus.path, 'tokenizer.model')} "
        f"or prepare the corpus again with --tokenizer {tokenizer.path}")


class DocumentStream:
  """Position g -> (corpus number, document number), or None past the end of a finite stream.

  One corpus, or several one after the other (weights None), or several mixed by `weights`
  (grain's `mix`: exact proportions over every stretch of positions, each corpus repeating on its
  own). Each epoch of a corpus has its own shuffled order.
  """

  def __init__(self, corpora: list[Corpus], weights: list[float] | None, *, seed: int,
               shuffle: bool, num_epochs: int | None):
    if weights is not None and (len(weights) != len(corpora) or
                                any(not float(w) > 0 for w in weights)):
      raise UserError(f"mixture weights must be positive, one per corpus; got {list(weights)}")
    tagged = []
    for c, corpus in enumerate(corpora):
      ds = grain.MapDataset.range(len(corpus))
      if shuffle:
        ds = ds.shuffle(seed=_corpus_seed(seed, c))
      tagged.append(ds.repeat(None if weights is not None else num_epochs).map(_Tag(c)))
    if weights is None:
      self._parts = tagged
      self._starts = np.concatenate([[0], np.cumsum([len(d) for d in tagged])]).tolist()
      self.length = self._starts[-1]
    else:
      self._mixed = grain.MapDataset.mix(tagged, [float(w) for w in weights])
      self.length = len(self._mixed)

  def __call__(self, g: int):
    if g >= self.length:
      return None
    if hasattr(self, "_mixed"):
      return self._mixed[g]
    c = bisect.bisect_right(self._starts, g) - 1
    return self._parts[c][g - self._starts[c]]


def _corpus_seed(seed: int, corpus: int) -> int:
  return (int(seed) * 1_000_003 + corpus * 7919) % (1 << 31)


class _Tag(grain.transforms.Map):
  """doc -> (corpus number, doc)."""

  def __init__(self, corpus: int):
    self._corpus = corpus

  def map(self, element):
    return self._corpus, int(element)


def _chunk_bounds(length: int, seq_len: int) -> list[tuple[int, int]]:
  """(start, stop) of each chunk of a document of `length` ids: <= seq_len + 1 ids, overlapping by
  one, as batching.chunk_ids cuts them."""
  return [(s, min(s + seq_len + 1, length)) for s in range(0, length - 1, seq_len)]


class _PackedIterator(grain.DatasetIterator):
  """One host's batches of packed rows; see the module docstring for the state."""

  def __init__(self, corpora, stream: DocumentStream, *, seq_len: int, rows: int,
               process_index: int, process_count: int):
    super().__init__()
    self._corpora, self._stream = corpora, stream
    self._seq_len, self._rows = seq_len, rows
    self._p, self._n = process_index, process_count
    self._max_carry = max(rows, 8)
    self._base, self._next = 0, 0
    self._carry = []  # [(g, start, stop, ids)] read, not yet emitted
    self._skip = set()  # positions an earlier run (on another host count) already read
    remote = any(c.remote for c in corpora)
    self._pool = (concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="lmtrain-read")
                  if remote else None)
    self._ahead = {}  # local position -> future of (g, ids) (bucket corpora)

  def _position(self, k: int) -> int:
    return self._base + self._p + k * self._n

  def _read(self, g: int):
    item = self._stream(g)
    if item is None:
      return None
    c, d = item
    return self._corpora[c][d]

  def _pull(self):
    """(g, ids) of the host's next document, or None at the end of a finite stream."""
    while self._skip and self._position(self._next) in self._skip:
      self._skip.discard(self._position(self._next))
      self._next += 1
    k = self._next
    if self._pool is None:
      g = self._position(k)
      ids = self._read(g)
    else:
      for j in range(k, k + _READ_AHEAD):
        if j not in self._ahead:
          self._ahead[j] = self._pool.submit(self._read, self._position(j))
      g, ids = self._position(k), self._ahead.pop(k).result()
    if ids is None:
      return None
    self._next += 1
    return g, ids

  def __next__(self):
    L, rows = self._seq_len, self._rows
    inputs = np.zeros((rows, L), np.int32)
    targets = np.zeros((rows, L), np.int32)
    segments = np.zeros((rows, L), np.int32)
    positions = np.zeros((rows, L), np.int32)
    used = [0] * rows
    n_segments = [0] * rows
    placed = 0
    waiting, carry = list(self._carry), []

    def place(chunk) -> bool:
      _, start, stop, ids = chunk
      n = stop - start - 1
      for r in range(rows):
        if used[r] + n <= L:
          u = used[r]
          inputs[r, u:u + n] = ids[start:stop - 1]
          targets[r, u:u + n] = ids[start + 1:stop]
          n_segments[r] += 1
          segments[r, u:u + n] = n_segments[r]
          positions[r, u:u + n] = np.arange(n, dtype=np.int32)
          used[r] += n
          return True
      return False

    for chunk in waiting:
      if place(chunk):
        placed += 1
      else:
        carry.append(chunk)
    exhausted = False
    while len(carry) < self._max_carry and min(used) < L:
      doc = self._pull()
      if doc is None:
        exhausted = True
        break
      g, ids = doc
      for start, stop in _chunk_bounds(len(ids), L):
        chunk = (g, start, stop, ids)
        if place(chunk):
          placed += 1
        else:
          carry.append(chunk)
    self._carry = carry
    if not placed:
      if exhausted and not carry:
        raise StopIteration
    return {"inputs": inputs, "targets": targets, "segment_ids": segments,
            "positions": positions, "loss_mask": (segments > 0).astype(np.float32)}

  def get_state(self) -> dict:
    here = self._position(self._next)
    return {"kind": STATE_KIND, "base": self._base, "next": self._next,
            "process_index": self._p, "process_count": self._n,
            "carry": [[g, start, stop] for g, start, stop, _ in self._carry],
            "skip": sorted(g for g in self._skip if g >= here)}

  def set_state(self, state: dict):
    self._ahead.clear()
    if "resume_from_hosts" in state:
      base, carry, skip = resume_position(state["resume_from_hosts"])
      self._base, self._next = base, 0
      state = {"carry": carry[self._p::self._n], "skip": skip}
    elif state.get("kind") != STATE_KIND:
      raise UserError(f"data-iterator state is not a prepared-corpus loader's: {sorted(state)}")
    else:
      self._base, self._next = int(state["base"]), int(state["next"])
    self._skip = set(int(g) for g in state.get("skip", []))
    # Chunks carried over by a run with a longer SEQ_LEN (--allow_config_change) are cut again.
    L = self._seq_len
    self._carry = [(g, s, min(s + L + 1, stop), ids)
                   for g, start, stop in state["carry"] for ids in [self._read(g)]
                   for s in range(start, stop - 1, L)]

  def close(self):
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)


def resume_position(states: list[dict]) -> tuple[int, list, list]:
  """Where the hosts of a run with another host count continue from the old hosts' states:
  (the lowest position no old host had read yet, the chunks they held in order, the positions above
  that position which some old host had already read)."""
  for s in states:
    if s.get("kind") != STATE_KIND:
      raise UserError("the checkpoint's data state is not a prepared-corpus loader's; it cannot "
                      "move to another host count")
  nexts = [s["base"] + s["process_index"] + s["next"] * s["process_count"] for s in states]
  base = min(nexts)
  skip = set()
  for s, stop in zip(states, nexts):
    first, step = s["base"] + s["process_index"], s["process_count"]
    first += max(0, -(-(base - first) // step)) * step  # its first position >= base
    skip.update(range(first, stop, step))
    skip.update(g for g in s.get("skip", []) if g >= base)
  carry = sorted(tuple(c) for s in states for c in s["carry"])
  return int(base), [list(c) for c in carry], sorted(skip)


class _PackedDataset(grain.IterDataset):

  def __init__(self, make):
    super().__init__()
    self._make = make

  def __iter__(self):
    return self._make()


def open_corpora(paths: list[str]) -> list[Corpus]:
  return [Corpus(p) for p in paths]


def make_dataset(corpora: list[Corpus], *, seq_len: int, batch_size: int, seed: int,
                 weights: list[float] | None = None, process_index: int = 0,
                 process_count: int = 1, shuffle: bool = True,
                 num_epochs: int | None = None) -> grain.IterDataset:
  """The per-host dataset of packed rows (features of `batching`) over prepared corpora.

  weights: mixture weights, one per corpus (None: the corpora as one). num_epochs=None repeats
  forever, each epoch in its own order; a finite stream ends with a last, partly filled batch
  (its empty rows have loss_mask 0).
  """
  rows = batching.host_rows(seq_len=seq_len, batch_size=batch_size, process_index=process_index,
                            process_count=process_count)
  if not corpora:
    raise UserError("no prepared corpora given")
  stream = DocumentStream(corpora, weights, seed=seed, shuffle=shuffle, num_epochs=num_epochs)
  make = lambda: _PackedIterator(corpora, stream, seq_len=seq_len, rows=rows,
                                 process_index=process_index, process_count=process_count)
  return grain.experimental.ThreadPrefetchIterDataset(_PackedDataset(make),
                                                      prefetch_buffer_size=2)


def make_iterator(corpora: list[Corpus], **kwargs) -> grain.DatasetIterator:
  return iter(make_dataset(corpora, **kwargs))


def unigram_perplexity(train: list[Corpus], evals: list[Corpus], vocab_size: int) -> float:
  """Perplexity of the eval targets under add-one-smoothed unigram counts of the train targets,
  from the counts the manifests carry (no pass over the corpus). Targets are every token after
  BOS (text tokens and EOS), as the model predicts them. A trained model that does not beat this
  has learned nothing beyond token frequencies."""
  def counts(corpora):
    total = np.zeros(vocab_size, np.int64)
    for c in corpora:
      got = c.unigram_counts
      total[:len(got)] += got
    return total
  train_counts, eval_counts = counts(train), counts(evals)
  log_p = np.log((train_counts + 1) / (train_counts.sum() + vocab_size))
  return float(np.exp(-float((eval_counts * log_p).sum()) / eval_counts.sum()))
