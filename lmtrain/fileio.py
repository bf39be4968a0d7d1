"""Work-dir files through etils.epath, so DIR may be a local path or a bucket URL (gs://BUCKET/...).

Local paths behave as with os and open(). A bucket differs in three ways that callers see here:
it has no directories (`makedirs` does nothing there; objects imply their prefixes, and a missing
bucket is reported rather than created), no appends (`AppendFile` rewrites the object), and readers
that only take local files (grain, sentencepiece training) get a local directory keyed by the work
dir instead (`local_dir`). A failed bucket read or write is a `StorageError` naming the path.

gs:// goes through TensorFlow's gfile when TensorFlow is installed, else through gcsfs (the [tpu]
extra installs it); EPATH_USE_TF=false forces gcsfs.
"""

import hashlib
import json
import os
import tempfile
import time

from etils import epath

from lmtrain.errors import UserError


class StorageError(UserError):
  """A bucket read or write failed; `reason` is the storage client's account of it, in one line."""

  def __init__(self, path: str, action: str, reason: str):
    super().__init__(f"{path}: cannot {action} ({reason})")
    self.reason = reason


def is_remote(path) -> bool:
  """True for a URL such as gs://BUCKET/DIR, False for a local path."""
  return "://" in os.fspath(path)


def absolute(path) -> str:
  """os.path.abspath of a local path; a URL as it is, less any trailing slash."""
  path = os.fspath(path)
  return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def _describe(error: Exception) -> str:
  """The storage client's error in one line (gcsfs puts only the request URL in a 404)."""
  if isinstance(error, FileNotFoundError):
    return "no such bucket or object"
  text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
  return text[:300] or type(error).__name__


def _call(path, action: str, fn):
  """fn(epath.Path(path)); on a bucket, any failure becomes a StorageError naming `path`."""
  p = epath.Path(path)
  if not is_remote(path):
    return fn(p)
  try:
    return fn(p)
  except UserError:
    raise
  except Exception as e:  # the clients raise OSError, HTTP, auth and import errors alike
    raise StorageError(os.fspath(path), action, _describe(e)) from e


def exists(path) -> bool:
  return _call(path, "read", lambda p: p.exists())


def isdir(path) -> bool:
  return _call(path, "read", lambda p: p.is_dir())


def isfile(path) -> bool:
  return _call(path, "read", lambda p: p.is_file())


def listdir(path) -> list[str]:
  """Names of the entries of a directory (or of the prefixes and objects under a bucket prefix)."""
  return _call(path, "list", lambda p: [child.name for child in p.iterdir()])


def makedirs(path):
  """os.makedirs(path, exist_ok=True); nothing on a bucket, whose prefixes need no creating (and
  whose client would otherwise create a missing bucket)."""
  if not is_remote(path):
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def read_text(path) -> str:
  return _call(path, "read", lambda p: p.read_text())


def read_bytes(path) -> bytes:
  return _call(path, "read", lambda p: p.read_bytes())


def write_text(path, text: str):
  _call(path, "write", lambda p: p.write_text(text))


def write_bytes(path, data: bytes):
  _call(path, "write", lambda p: p.write_bytes(data))


def remove(path):
  _call(path, "delete", lambda p: p.unlink())


def read_json(path):
  return json.loads(read_text(path))


def write_json(path, obj, indent: int = 2):
  write_text(path, json.dumps(obj, indent=indent))


def rmtree(path):
  """Removes a directory and everything under it (a bucket prefix and its objects)."""
  _call(path, "delete", lambda p: p.rmtree() if p.exists() else None)


def move(source, target):
  """Moves a directory (or file) to `target`, whose parent is created. On a bucket, which cannot
  rename, each object is copied and then the source removed."""
  if not is_remote(source):
    os.makedirs(os.path.dirname(os.fspath(target)), exist_ok=True)
    os.replace(source, target)
    return

  def copy_all(src):
    dst = epath.Path(target)
    for item in src.rglob("*"):
      if item.is_file():
        (dst / os.path.relpath(os.fspath(item), os.fspath(src))).write_bytes(item.read_bytes())
    src.rmtree()
  _call(source, "move", copy_all)


def local_dir(workdir: str, name: str) -> str:
  """DIR/name for a local work dir. For a bucket, a directory under the system temp dir keyed by
  the work dir's URL: for files that only local readers take, e.g. the demo data, which each host
  writes there for itself."""
  if not is_remote(workdir):
    return os.path.join(workdir, name)
  key = hashlib.sha256(absolute(workdir).encode()).hexdigest()[:16]
  return os.path.join(tempfile.gettempdir(), "lmtrain", key, name)


class AppendFile:
  """A text file that grows line by line (metrics.jsonl). A local file is appended to and flushed at
  every write. A bucket object cannot be appended to, so it is rewritten whole (what it held at
  open plus everything written since) at most every `sync_secs` seconds, and at close."""

  def __init__(self, path, sync_secs: float = 30.0):
    self.path = os.fspath(path)
    self._remote = is_remote(path)
    self._sync_secs = sync_secs
    if self._remote:
      self._text = read_text(path) if exists(path) else ""
      if self._text and not self._text.endswith("\n"):
        self._text += "\n"
      self._dirty, self._synced_at = False, time.monotonic()
    else:
      self._file = epath.Path(path).open("a")

  def write(self, text: str):
    if not self._remote:
      self._file.write(text)
      self._file.flush()
      return
    self._text += text
    self._dirty = True
    if time.monotonic() - self._synced_at >= self._sync_secs:
      self.sync()

  def sync(self):
    """Uploads the whole text now (bucket only; a local file is already flushed)."""
    if self._remote and self._dirty:
      write_text(self.path, self._text)
      self._dirty, self._synced_at = False, time.monotonic()

  def close(self):
    if self._remote:
      self.sync()
    else:
      self._file.close()

