"""`lmtrain pretrain` runs: what a run writes, resume exactness, resharding, NaN and SIGTERM.

They train with chunked attention (blocks of 16 over 64 tokens), so its custom gradient is what the
resume and resharding checks hold to; the other end-to-end tests run the default xla path."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from util import ENV, lmtrain, saved_state

COMMON = ["--gin.MODEL=tiny", "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=64", "--gin.LOG_EVERY=1",
          "--gin.LEARNING_RATE=0.01", "--gin.WARMUP_STEPS=2", "--gin.EVAL_EVERY=0",
          "--gin.EVAL_STEPS=2",
          "--gin_param",
          "model_config.overrides = {'attention_impl': 'chunked', 'attention_block': 16}"]
MESH_222 = "--gin.MESH_SHAPE={'data': 2, 'fsdp': 2, 'tensor': 2}"
MESH_181 = "--gin.MESH_SHAPE={'data': 1, 'fsdp': 8, 'tensor': 1}"
STEPS = 12


def train_rows(workdir):
  with open(os.path.join(workdir, "pretrain", "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if "loss" in r]


def steps_saved(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "pretrain", "checkpoints"))
                if d.isdigit())


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tokenizer_path):
  """STEPS steps in one go on the (2,2,2) mesh: the reference for the resume tests."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  proc = lmtrain("pretrain", "--workdir", workdir, *COMMON, MESH_222,
                 f"--gin.TRAIN_STEPS={STEPS}", f"--gin.TOKENIZER={tokenizer_path}",
                 "--gin.CHECKPOINT_EVERY=4")
  return workdir, proc


@pytest.mark.slow
def test_cli_pretrain_writes_everything_and_learns(straight_run):
  workdir, proc = straight_run
  stage = os.path.join(workdir, "pretrain")
  rows = train_rows(workdir)
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  for key in ("loss", "learning_rate", "grad_norm", "tokens_per_sec", "mfu", "step_time"):
    assert all(np.isfinite(r[key]) for r in rows), key
  assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(stage, "tb")))
  assert steps_saved(workdir) == [4, 8, 12]
  assert json.load(open(os.path.join(stage, "model.json")))["attention_impl"] == "chunked"
  lineage = json.load(open(os.path.join(stage, "lineage.json")))
  assert lineage["stage"] == "pretrain" and lineage["parent"] is None
  assert len(lineage["config_sha256"]) == 64
  assert "MESH_SHAPE = {'data': 2, 'fsdp': 2, 'tensor': 2}" in open(
      os.path.join(stage, "config.gin")).read()
  assert "eval_perplexity" in proc.stdout and "unigram_perplexity" in proc.stdout
  evals = [r for r in map(json.loads, open(os.path.join(stage, "metrics.jsonl")))
           if "eval_loss" in r]
  assert evals and evals[-1]["step"] == STEPS
  assert evals[-1]["eval_perplexity"] == pytest.approx(np.exp(evals[-1]["eval_loss"]), rel=1e-6)


@pytest.mark.slow
def test_resume_in_a_fresh_process_is_bit_identical(straight_run, tokenizer_path, tmp_path):
  reference, _ = straight_run
  workdir = str(tmp_path)
  args = ["pretrain", "--workdir", workdir, *COMMON, MESH_222, f"--gin.TRAIN_STEPS={STEPS}",
          f"--gin.TOKENIZER={tokenizer_path}", "--gin.CHECKPOINT_EVERY=4"]
  lmtrain(*args, "--gin_param", f"LoopConfig.stop_after = {STEPS // 2}")
  assert steps_saved(workdir) == [4, 6]
  lmtrain(*args)
  resumed, straight = train_rows(workdir), train_rows(reference)
  assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
  a, b = saved_state(workdir, STEPS), saved_state(reference, STEPS)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
def test_restore_onto_another_mesh_gives_the_same_losses(straight_run, tokenizer_path, tmp_path):
  reference, _ = straight_run
  workdir = str(tmp_path)
  args = ["pretrain", "--workdir", workdir, *COMMON, f"--gin.TRAIN_STEPS={STEPS}",
          f"--gin.TOKENIZER={tokenizer_path}", "--gin.CHECKPOINT_EVERY=100"]
  lmtrain(*args, MESH_222, "--gin_param", f"LoopConfig.stop_after = {STEPS // 2}")
  lmtrain(*args, MESH_181)
  resumed = [r["loss"] for r in train_rows(workdir)]
  straight = [r["loss"] for r in train_rows(reference)]
  np.testing.assert_allclose(resumed, straight, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_then_resume_matches_uninterrupted(straight_run, tokenizer_path, tmp_path,
                                                          signum, code):
  reference, _ = straight_run
  workdir = str(tmp_path)
  args = [sys.executable, "-m", "lmtrain.cli", "pretrain", "--workdir", workdir, *COMMON, MESH_222,
          f"--gin.TOKENIZER={tokenizer_path}", "--gin.CHECKPOINT_EVERY=100"]
  proc = subprocess.Popen(args + [f"--gin.TRAIN_STEPS={STEPS}"], env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  # The handler is in place once the stage directory is set up; the signal then lands during
  # compilation or the first steps, and the run must save at the next step boundary.
  config_written = os.path.join(workdir, "pretrain", "config.gin")
  deadline = time.time() + 120
  while time.time() < deadline and not os.path.exists(config_written):
    time.sleep(0.05)
  proc.send_signal(signum)  # SIGINT: as Ctrl-C in a terminal
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == code, stderr[-2000:]
  assert f"{signal.Signals(signum).name}: saved checkpoint at step" in stderr
  saved = steps_saved(workdir)
  assert len(saved) == 1 and 1 <= saved[0] < STEPS
  lmtrain(*args[3:], f"--gin.TRAIN_STEPS={STEPS}")
  a, b = saved_state(workdir, STEPS), saved_state(reference, STEPS)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
def test_nan_loss_exits_3_and_keeps_the_last_good_checkpoint(tokenizer_path, tmp_path):
  workdir = str(tmp_path)
  proc = lmtrain("pretrain", "--workdir", workdir, *COMMON, f"--gin.TOKENIZER={tokenizer_path}",
                 "--gin.TRAIN_STEPS=6", "--gin.CHECKPOINT_EVERY=1", "--gin.WARMUP_STEPS=0",
                 "--gin.LEARNING_RATE=1e30", "--gin_param", "make_optimizer.clip_norm = 0",
                 check=False)
  assert proc.returncode == 3, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("lmtrain: error: pretrain: loss became nan") or "loss became inf" in last \
      or ("became" in last and "beyond LoopConfig.diverge_at=1e+08" in last), last
  assert "Traceback" not in proc.stderr
  saved = steps_saved(workdir)
  assert saved and f"last good checkpoint: step {saved[-1]}" in last
  state = saved_state(workdir, saved[-1])
  assert int(state["step"]) == saved[-1]


