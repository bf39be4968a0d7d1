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

WORKER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "multihost_worker.py")


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
  assert "the data order continues where they were" in outs[0]
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


def stage_on_one_and_two_processes(stage, two_process_run, tokenizer_path, tmp_path):
  """(two-process rows, one-process rows) of metrics.jsonl: `stage` from the pretrain checkpoint
  on the same global batches."""
  metrics = {}
  for name, nproc, mode in (("two", 2, stage), ("one", 1, f"{stage}-merged")):
    workdir = tmp_path / name
    shutil.copytree(os.path.join(two_process_run, "pretrain"), workdir / "pretrain")
    codes, outs = launch(str(workdir), tokenizer_path, nproc, mode=mode, steps=2)
    assert codes == [0] * nproc, outs[0][-3000:] + outs[-1][-3000:]
    with open(workdir / stage / "metrics.jsonl") as f:
      metrics[name] = list(map(json.loads, f))
  return metrics["two"], metrics["one"]


@pytest.mark.slow
def test_sft_with_its_answer_eval_on_two_processes_matches_one(two_process_run, tokenizer_path,
                                                                tmp_path):
  two, one = stage_on_one_and_two_processes("sft", two_process_run, tokenizer_path, tmp_path)
  assert [r["step"] for r in two] == [r["step"] for r in one]
  for a, b in zip(two, one):
    assert sorted(a) == sorted(b)
    for key in ("loss", "eval_loss", "eval_exact_match"):
      if key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
  assert any("eval_exact_match" in r for r in two)


@pytest.mark.slow
def test_ppo_on_two_processes_matches_one_process(two_process_run, tokenizer_path, tmp_path):
  # Rollouts, host-side scoring (responses gathered from both hosts), the greedy eval and the
  # updates: the same global batches give the same iterations on one process or two.
  two, one = stage_on_one_and_two_processes("ppo", two_process_run, tokenizer_path, tmp_path)
  assert any("eval_task_score" in r for r in two)
  for a, b in zip([r for r in two if "eval_task_score" in r],
                  [r for r in one if "eval_task_score" in r]):
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
  two, one = [r for r in two if "loss" in r], [r for r in one if "loss" in r]
  assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2]
  for key in ("loss", "task_score", "kl", "policy_loss", "value_loss", "response_length"):
    np.testing.assert_allclose([r[key] for r in two], [r[key] for r in one], rtol=1e-5,
                               atol=1e-6, err_msg=key)
  assert two[0]["kl"] == 0.0  # policy == reference in the first rollout



THROUGHPUT = ("tokens_per_sec", "mfu", "step_time")


@pytest.mark.slow
def test_grpo_on_two_processes_matches_one_process(two_process_run, tokenizer_path, tmp_path):
  # Groups of samples stay contiguous in the global batch when every host holds whole groups:
  # the group advantages, the updates and the greedy eval are those of one process.
  two, one = stage_on_one_and_two_processes("grpo", two_process_run, tokenizer_path, tmp_path)
  assert [r["step"] for r in two] == [r["step"] for r in one]
  assert [r["step"] for r in two if "loss" in r] == [1, 2]
  for a, b in zip(two, one):
    assert sorted(a) == sorted(b)
    for key in sorted(set(a) - {"step", *THROUGHPUT}):
      assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
  assert any("eval_task_score" in r for r in two)


@pytest.mark.slow
def test_reward_stage_and_its_normalisation_on_two_processes_match_one(two_process_run,
                                                                        tokenizer_path, tmp_path):
  two, one = stage_on_one_and_two_processes("reward", two_process_run, tokenizer_path, tmp_path)
  two, one = [r for r in two if "loss" in r], [r for r in one if "loss" in r]
  assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2]
  for key in ("loss", "accuracy", "grad_norm"):
    np.testing.assert_allclose([r[key] for r in two], [r[key] for r in one], rtol=1e-5,
                               atol=1e-6, err_msg=key)
  norms = [json.load(open(tmp_path / name / "reward" / "reward_normalization.json"))
           for name in ("two", "one")]
  assert norms[0]["source"] == "policy" and norms[0]["num_responses"] == 6
  # Sampled at temperature 1 from the same policy and scored by reward models whose params
  # differ by the rounding of two steps' cross-host reductions (loss equal to 1e-5 above).
  assert norms[0]["offset"] == pytest.approx(norms[1]["offset"], rel=1e-3)
  assert norms[0]["scale"] == pytest.approx(norms[1]["scale"], rel=1e-3)
  assert norms[0]["scale"] > 1e-3
