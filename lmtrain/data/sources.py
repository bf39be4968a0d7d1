"""Where data comes from: paths, globs and gs:// URLs, seqio names, compressed files, prepared corpora.

Every dataset (pretraining text, SFT, preference pairs, prompts) resolves its sources here, so a
glob, a bucket URL or a `.gz` file means the same thing to each of them.
"""

import glob
import gzip
import io
import os

from etils import epath

from lmtrain import fileio
from lmtrain.errors import UserError

SEQIO_PREFIX = "seqio:"
MANIFEST = "manifest.json"  # the file that makes a directory a prepared corpus (data/prepare.py)
COMPRESSED_EXTENSIONS = (".gz", ".zst")


def is_seqio(source: str) -> bool:
  return source.startswith(SEQIO_PREFIX)


def is_prepared(source: str) -> bool:
  """True for a directory (local or gs://) that holds a prepared corpus's manifest."""
  return not is_seqio(source) and fileio.exists(os.path.join(source, MANIFEST))


def _has_magic(source: str) -> bool:
  return glob.has_magic(source)


def expand_source(source: str) -> list[str]:
  """Files of one source entry: a path, a glob pattern (local or gs://), or a seqio name (kept as
  is). Matches are sorted, so the order of a corpus does not depend on the file system."""
  if is_seqio(source):
    return [source]
  if fileio.is_remote(source):
    if not _has_magic(source):
      if not fileio.isfile(source):
        raise UserError(f"{source}: file not found")
      return [source]
    scheme, _, rest = source.partition("://")
    bucket, _, pattern = rest.partition("/")
    matches = sorted(f"{scheme}://{bucket}/{p.relative_to(epath.Path(f'{scheme}://{bucket}'))}"
                     for p in epath.Path(f"{scheme}://{bucket}").glob(pattern))
    if not matches:
      raise UserError(f"{source}: no files match")
    return matches
  if os.path.exists(source):
    return [source]
  if _has_magic(source):
    matches = sorted(glob.glob(source))
    if not matches:
      raise UserError(f"{source}: no files match")
    return matches
  raise UserError(f"{source}: file not found")


def expand_sources(sources) -> list[str]:
  """expand_source over a list (or one string), in order; an empty list is an error."""
  if isinstance(sources, str):
    sources = [sources]
  if not sources:
    raise UserError("no data sources given")
  return [path for source in sources for path in expand_source(source)]


def strip_compression(path: str) -> str:
  """The name without a .gz/.zst suffix: what decides how its records are parsed."""
  for ext in COMPRESSED_EXTENSIONS:
    if path.endswith(ext):
      return path[:-len(ext)]
  return path


def open_binary(path: str):
  """A binary file object of a local or gs:// file, decompressed when it ends in .gz or .zst."""
  if fileio.is_remote(path):
    try:
      raw = epath.Path(path).open("rb")
    except Exception as e:  # the storage clients raise many kinds
      raise fileio.StorageError(path, "read", str(e).splitlines()[0] if str(e) else
                                type(e).__name__) from e
  else:
    if not os.path.isfile(path):
      raise UserError(f"{path}: file not found")
    raw = open(path, "rb")
  if path.endswith(".gz"):
    return gzip.GzipFile(fileobj=raw)
  if path.endswith(".zst"):
    import zstandard  # pylint: disable=g-import-not-at-top
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
  return raw


def size_bytes(path: str) -> int:
  """A file's size on disk (compressed size for .gz/.zst); 0 for a seqio name."""
  if is_seqio(path):
    return 0
  if fileio.is_remote(path):
    return int(epath.Path(path).stat().length)
  return os.path.getsize(path)
