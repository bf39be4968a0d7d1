"""Several processes on one machine behave like the hosts of a pod (gloo collectives on CPU)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(workdir, tokenizer, nproc, mode="train", steps=4):
  port = free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, WORKER, workdir, tokenizer, str(nproc), str(i),
                             str(port), mode, str(steps)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(nproc)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  return [p.returncode for p in procs], outs


def losses(workdir):
  with open(os.path.join(workdir, "pretrain", "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tokenizer_path):
  workdir = str(tmp_path_factory.mktemp("two"))
  codes, outs = launch(workdir, tokenizer_path, 2)
  assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  return workdir


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_same_global_batches(two_process_run,
                                                                     tokenizer_path, tmp_path):
  codes, outs = launch(str(tmp_path), tokenizer_path, 1, mode="merged")
  assert codes == [0], outs[0][-3000:]
  two, one = losses(two_process_run), losses(str(tmp_path))
  assert sorted(two) == [1, 2, 3, 4]
  np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)],
                             rtol=1e-5)
  info = [json.load(open(os.path.join(two_process_run, f"seen_{i}_of_2.json"))) for i in (0, 1)]
  assert all(i["devices"] == 8 and i["processes"] == 2 for i in info)
  rows = [{tuple(r) for r in i["rows"]} for i in info]
  assert rows[0] and rows[1] and not rows[0] & rows[1]  # each host read its own shard


@pytest.mark.slow
def test_checkpoints_move_between_process_counts(two_process_run, tokenizer_path, tmp_path):
  # 2-process checkpoint (step 4) -> 1-process run continues to step 6.
  one = str(tmp_path / "one")
  shutil.copytree(two_process_run, one)
  codes, outs = launch(one, tokenizer_path, 1, steps=6)
  assert codes == [0], outs[0][-3000:]
  assert "holds no data-iterator state" in outs[0]
  assert sorted(losses(one)) == [1, 2, 3, 4, 5, 6]
  # ... and that 1-process checkpoint (step 6) -> 2-process run continues to step 8.
  codes, outs = launch(one, tokenizer_path, 2, steps=8)
  assert codes == [0, 0], outs[0][-3000:]
  assert sorted(losses(one)) == list(range(1, 9))
  assert all(np.isfinite(v) for v in losses(one).values())


@pytest.mark.slow
def test_a_failed_process_stops_the_others(tokenizer_path, tmp_path):
  start = time.time()
  codes, outs = launch(str(tmp_path), tokenizer_path, 2, mode="fail", steps=50)
  assert codes[1] == 7
  assert codes[0] != 0, outs[0][-3000:]
  assert time.time() - start < 150
