"""Fixtures for the `lmtrain label` tests: a database URL per backend (a fresh SQLite file, or a fresh
database on a real PostgreSQL server this session starts), and `lmtrain label serve` in a
subprocess on a free 127.0.0.1 port.

PostgreSQL and chromium are Debian packages; when one is missing the tests fail (no silent skip)
and say that `.ci/run` installs them.
"""

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import httpx
import pytest

MISSING = "{what} not found ({where}): .ci/run installs it (apt-get install {package})"
READY_TIMEOUT_S = 60


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _as_postgres_user() -> list[str]:
  """initdb and postgres refuse to run as root: as root, run them as the `postgres` user."""
  return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@pytest.fixture(scope="session")
def postgres_server():
  """A PostgreSQL server on 127.0.0.1:PORT in a temp dir, for the whole session; yields the URL of
  its maintenance database."""
  pg_ctls = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
  if not pg_ctls:
    pytest.fail(MISSING.format(what="PostgreSQL server", where="/usr/lib/postgresql/*/bin/pg_ctl",
                               package="postgresql"))
  bin_dir = os.path.dirname(pg_ctls[-1])
  root = tempfile.mkdtemp(prefix="lmtrain-pg-")
  if os.geteuid() == 0:
    user = pwd.getpwnam("postgres")
    os.chown(root, user.pw_uid, user.pw_gid)
  data, port = os.path.join(root, "data"), free_port()
  run = lambda *cmd: subprocess.run(_as_postgres_user() + list(cmd), check=True,
                                    capture_output=True, text=True, timeout=120)
  try:
    run(os.path.join(bin_dir, "initdb"), "-D", data, "-U", "lmtrain", "-A", "trust", "-E", "UTF8",
        "--no-sync", "--no-instructions")
    run(os.path.join(bin_dir, "pg_ctl"), "-D", data, "-l", os.path.join(root, "server.log"),
        "-w", "-t", str(READY_TIMEOUT_S), "-o",
        # fsync off: the tests kill the app, never PostgreSQL, and each test's CREATE DATABASE
        # and the shutdown checkpoint would otherwise wait on the disk for seconds.
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200 "
        "-c fsync=off", "start")
  except subprocess.CalledProcessError as e:
    log = os.path.join(root, "server.log")
    detail = open(log).read()[-2000:] if os.path.exists(log) else ""
    shutil.rmtree(root, ignore_errors=True)
    pytest.fail(f"PostgreSQL did not start: {e.stderr or e.stdout}\n{detail}")
  yield f"postgresql://lmtrain@127.0.0.1:{port}/postgres"
  subprocess.run(_as_postgres_user() + [os.path.join(bin_dir, "pg_ctl"), "-D", data, "-m", "fast",
                                        "-w", "stop"], capture_output=True, timeout=120)
  shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
  """A fresh, empty database on each backend."""
  if request.param == "sqlite":
    return f"sqlite:///{tmp_path / 'labels.db'}"
  import psycopg
  server = request.getfixturevalue("postgres_server")
  name = "t_" + uuid.uuid4().hex[:12]
  with psycopg.connect(server, autocommit=True) as conn:
    conn.execute(f"CREATE DATABASE {name}")
  return server.rsplit("/", 1)[0] + "/" + name


class Server:
  """`lmtrain label serve` in a subprocess, ready when it answers HTTP."""

  def __init__(self, db_url: str, log_path: str):
    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._log = open(log_path, "w")
    self.process = subprocess.Popen(
        [sys.executable, "-m", "lmtrain.cli", "label", "serve", "--db", db_url, "--port",
         str(self.port)], stdout=self._log, stderr=subprocess.STDOUT)
    self._log_path = log_path
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
      if self.process.poll() is not None:
        raise AssertionError(f"the server exited ({self.process.returncode}): {self.log()}")
      try:
        httpx.get(self.url + "/", timeout=2)
        return
      except httpx.TransportError:
        if time.monotonic() > deadline:
          self.stop()
          raise AssertionError(f"the server did not answer in {READY_TIMEOUT_S}s: {self.log()}")
        time.sleep(0.1)

  def log(self) -> str:
    self._log.flush()
    with open(self._log_path) as f:
      return f.read()[-3000:]

  def kill9(self):
    self.process.send_signal(signal.SIGKILL)
    self.process.wait(timeout=30)

  def stop(self):
    if self.process.poll() is None:
      self.process.terminate()
      try:
        self.process.wait(timeout=30)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait(timeout=30)
    self._log.close()


@pytest.fixture
def start_server(tmp_path):
  """start_server(db_url) -> a running Server; every one is stopped at the end of the test."""
  servers = []

  def start(db_url):
    servers.append(Server(db_url, str(tmp_path / f"server{len(servers)}.log")))
    return servers[-1]

  yield start
  for server in servers:
    server.stop()
