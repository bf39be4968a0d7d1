"""One run per stage directory: `DIR/STAGE/run.lock`, held by process 0 for the whole run.

On a local or network file system the lock is the kernel's (fcntl.flock on the open file): it is
released when the process ends however it ends, so a lock left by a dead run is simply taken over
(with a warning naming it). The file holds the holder's host, pid and start time, for the message a
second run gets; a run that ends empties it (so a non-empty file found unlocked is a dead run's).

On a bucket there is no kernel lock: the object is written when absent (a check, then a write, so
two runs started within the same second can both pass; the metrics and checkpoints of one then
show it) and deleted when the run ends. A lock object left by a dead run on this host (same host
name, pid gone) is taken over with a warning; one from another host cannot be checked from here, so
the run refuses and says which object to delete once that run is known to be gone.
"""

import json
import os
import socket
import sys
import time

from lmtrain import fileio
from lmtrain.errors import UserError

LOCK_FILE = "run.lock"


def _holder() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _describe(info: dict) -> str:
  return (f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, "
          f"started {info.get('started', '?')}")


def _alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, TypeError, ValueError):
    return True  # someone else's process, or unreadable: assume it runs
  return True


def _warn_stale(path: str, info: dict):
  sys.stderr.write(f"lmtrain: warning: {path}: taking over the lock of a run that is gone "
                   f"({_describe(info)})\n")
  sys.stderr.flush()


class StageLock:
  """Context manager: holds DIR/STAGE/run.lock, or raises UserError naming the run that holds it.
  Only process 0 of a multi-process run locks (pass held=False on the others)."""

  def __init__(self, stage_dir: str, held: bool = True):
    self.path = os.path.join(stage_dir, LOCK_FILE)
    self.held = held
    self._file = None

  def __enter__(self):
    if not self.held:
      return self
    if fileio.is_remote(self.path):
      self._acquire_object()
    else:
      self._acquire_file()
    return self

  def _acquire_file(self):
    import fcntl
    f = open(self.path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      info = _read(f.read())
      f.close()
      raise UserError(f"{os.path.dirname(self.path)}: another run is using this stage directory "
                      f"({_describe(info)}); wait for it to end or use another --workdir"
                      ) from None
    f.seek(0)
    previous = _read(f.read())
    if previous:  # a clean end empties the file; what is left here is from a run that died
      _warn_stale(self.path, previous)
    f.seek(0)
    f.truncate()
    f.write(json.dumps(_holder()))
    f.flush()
    self._file = f

  def _acquire_object(self):
    if fileio.exists(self.path):
      info = _read(fileio.read_text(self.path))
      here = info.get("host") == socket.gethostname()
      if not (here and not _alive(info.get("pid"))):
        raise UserError(f"{os.path.dirname(self.path)}: another run is using this stage "
                        f"directory ({_describe(info)}); if that run is gone, delete "
                        f"{self.path} and rerun")
      _warn_stale(self.path, info)
    fileio.write_text(self.path, json.dumps(_holder()))

  def __exit__(self, *_):
    if not self.held:
      return
    if self._file is not None:
      # Emptied (an empty lock file means a clean end) but kept: removing it would let a run
      # that opened it just before lock an orphaned file while a third run locks a new one.
      self._file.seek(0)
      self._file.truncate()
      self._file.flush()
      self._file.close()  # releases the lock
      self._file = None
    elif fileio.is_remote(self.path):
      try:
        fileio.remove(self.path)
      except fileio.StorageError:
        pass


def _read(text: str) -> dict:
  try:
    info = json.loads(text) if text.strip() else {}
  except ValueError:
    return {"host": "?", "pid": "?", "started": "?"}
  return info if isinstance(info, dict) else {}
