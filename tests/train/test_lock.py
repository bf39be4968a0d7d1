"""The stage directory's run lock: one run at a time; a dead run's lock is taken over."""

import json
import os
import socket
import subprocess
import sys

import pytest

from lmtrain import fileio
from lmtrain.errors import UserError
from lmtrain.train import lock


def dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_a_held_lock_refuses_a_second_holder_and_is_free_after(tmp_path, capsys):
  with lock.StageLock(str(tmp_path)):
    held = json.loads((tmp_path / lock.LOCK_FILE).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    with pytest.raises(UserError, match=f"another run is using this stage directory "
                                        f"\\(host {socket.gethostname()}, pid {os.getpid()}"):
      with lock.StageLock(str(tmp_path)):
        pass
  assert (tmp_path / lock.LOCK_FILE).read_text() == ""  # a clean end empties it
  with lock.StageLock(str(tmp_path)):
    pass
  assert "warning" not in capsys.readouterr().err


def test_the_lock_of_a_dead_run_is_taken_over_with_a_warning(tmp_path, capsys):
  gone = {"host": socket.gethostname(), "pid": dead_pid(), "started": "2026-01-01T00:00:00Z"}
  (tmp_path / lock.LOCK_FILE).write_text(json.dumps(gone))  # left by a run that was killed
  with lock.StageLock(str(tmp_path)):
    assert json.loads((tmp_path / lock.LOCK_FILE).read_text())["pid"] == os.getpid()
  err = capsys.readouterr().err
  assert "taking over the lock of a run that is gone" in err and f"pid {gone['pid']}" in err


def test_a_bucket_lock_object(tmp_path, monkeypatch, capsys):
  # The object path of a bucket (no kernel lock), exercised on a local directory.
  monkeypatch.setattr(fileio, "is_remote", lambda path: True)
  path = tmp_path / lock.LOCK_FILE
  with lock.StageLock(str(tmp_path)):
    assert json.loads(path.read_text())["pid"] == os.getpid()
    with pytest.raises(UserError, match=f"if that run is gone, delete {path} and rerun"):
      lock.StageLock(str(tmp_path)).__enter__()
  assert not path.exists()  # removed at the end
  path.write_text(json.dumps({"host": "another-host", "pid": 1, "started": "x"}))
  with pytest.raises(UserError, match="host another-host, pid 1"):
    lock.StageLock(str(tmp_path)).__enter__()
  path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(), "started": "x"}))
  with lock.StageLock(str(tmp_path)):
    pass
  assert "taking over the lock of a run that is gone" in capsys.readouterr().err
  assert lock.StageLock(str(tmp_path), held=False).__enter__().held is False
