"""`lmtrain reward` and `lmtrain dpo` runs, and `lmtrain pipeline` end to end on the tiny preset."""

import json
import math
import os
import random

import jax
import numpy as np
import pytest

from util import lmtrain

TINY_ARGS = ["--gin.MODEL=tiny", "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=32", "--gin.LOG_EVERY=1",
             "--gin.WARMUP_STEPS=2", "--gin.EVAL_STEPS=4"]


def rows(workdir, stage):
  with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("rlhf"))
  lmtrain("pretrain", "--workdir", workdir, *TINY_ARGS, "--gin.TRAIN_STEPS=4",
          "--gin.EVAL_EVERY=0")
  return workdir


def write_separable_pairs(path, n, seed):
  """Chosen answers say 'yes', rejected ones 'no': a reward model must learn that rule."""
  r = random.Random(seed)
  words = ["apple", "river", "stone", "cloud", "table", "green", "light", "paper"]
  with open(path, "w") as f:
    for _ in range(n):
      prompt = " ".join(r.sample(words, 3))
      f.write(json.dumps({"prompt": prompt, "chosen": "yes " + r.choice(words),
                          "rejected": "no " + r.choice(words)}) + "\n")


@pytest.mark.slow
def test_reward_model_ranks_held_out_pairs(pretrained, tmp_path):
  train, held_out = str(tmp_path / "train.jsonl"), str(tmp_path / "eval.jsonl")
  write_separable_pairs(train, 400, 0)
  write_separable_pairs(held_out, 64, 1)
  proc = lmtrain("reward", "--workdir", pretrained, *TINY_ARGS, "--gin.TRAIN_STEPS=40",
                 "--gin.LEARNING_RATE=0.003", "--gin.EVAL_EVERY=0", f"--gin.TRAIN_DATA={train}",
                 f"--gin.EVAL_DATA={held_out}", f"--gin.INIT_FROM={pretrained}/pretrain",
                 "--gin.EVAL_STEPS=8")
  evals = [r for r in rows(pretrained, "reward") if "eval_accuracy" in r]
  assert evals[-1]["eval_accuracy"] > 0.9, proc.stdout[-2000:]
  norm = json.load(open(os.path.join(pretrained, "reward", "reward_normalization.json")))
  assert norm["scale"] > 0 and norm["num_responses"] > 0
  assert "  data        400 pairs; the run reads 320 (0.80 epochs)\n" in proc.stdout
  lineage = json.load(open(os.path.join(pretrained, "reward", "lineage.json")))
  assert lineage["parent"]["stage"] == "pretrain"
  assert json.load(open(os.path.join(pretrained, "reward", "model.json")))["head"] == "scalar"


@pytest.mark.slow
def test_dpo_starts_at_ln2_with_a_frozen_reference(pretrained, tmp_path):
  train = str(tmp_path / "pairs.jsonl")
  write_separable_pairs(train, 64, 2)
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  os.symlink(os.path.join(pretrained, "tokenizer.model"), os.path.join(workdir, "tokenizer.model"))
  lmtrain("dpo", "--workdir", workdir, *TINY_ARGS, "--gin.TRAIN_STEPS=6",
          "--gin.LEARNING_RATE=0.003", "--gin.EVAL_EVERY=0", f"--gin.TRAIN_DATA={train}",
          f"--gin.INIT_FROM={pretrained}/pretrain")
  train_rows = [r for r in rows(workdir, "dpo") if "loss" in r]
  assert train_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
  assert train_rows[0]["margin"] == pytest.approx(0.0, abs=1e-6)
  assert train_rows[-1]["loss"] < math.log(2)
  # The reference in the checkpoint is still the parent's params, bit for bit.
  import orbax.checkpoint as ocp
  state = ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "dpo", "checkpoints", "6", "state"))
  parent = ocp.StandardCheckpointer().restore(
      os.path.join(pretrained, "pretrain", "checkpoints", "4", "state"))
  jax.tree.map(np.testing.assert_array_equal, state["extras"]["reference"], parent["params"])


@pytest.mark.slow
def test_pipeline_runs_every_stage_and_resumes(tmp_path):
  workdir = str(tmp_path)
  args = ["pipeline", "--workdir", workdir, "--gin_file", "experiments/tiny_pipeline.gin",
          "--stages", "pretrain,sft,reward,ppo,dpo"]
  proc = lmtrain(*args)
  for stage in ("pretrain", "sft", "reward", "ppo", "dpo"):
    assert os.path.exists(os.path.join(workdir, stage, "lineage.json")), stage
  assert "pipeline summary" in proc.stdout
  for stage in ("pretrain", "sft", "reward", "ppo", "dpo"):
    assert f"  {stage} " in proc.stdout
  assert "eval_task_score=" in proc.stdout and "kl_bound=4" in proc.stdout
  parents = {s: json.load(open(os.path.join(workdir, s, "lineage.json")))["parent"]
             for s in ("sft", "reward", "ppo", "dpo")}
  assert parents["sft"]["stage"] == "pretrain" and parents["sft"]["step"] == 30
  assert parents["reward"]["stage"] == "sft" and parents["dpo"]["stage"] == "sft"
  assert parents["ppo"]["stage"] == "sft" and parents["ppo"]["reward_model"]["stage"] == "reward"
  steps = {s: max(r["step"] for r in rows(workdir, s))
           for s in ("pretrain", "sft", "reward", "ppo")}
  assert steps == {"pretrain": 30, "sft": 20, "reward": 20, "ppo": 6}
  # sft.gin's demo_careless_count (0.65) reached the demo writer: the count demonstrations it
  # trained on are mostly one too low, while the preference rankings put the right count first.
  sft_train = [json.loads(line) for line in open(os.path.join(workdir, "data", "sft_train.jsonl"))]
  count = [r for r in sft_train if r["task"] == "count"]
  low = sum(int(r["response"]) == int(r["answer"]) - 1 for r in count) / len(count)
  assert 0.6 <= low <= 0.7, low
  assert all(r["response"] == r["answer"] for r in sft_train if r["task"] != "count")
  rankings = [json.loads(line) for line in open(os.path.join(workdir, "data",
                                                             "preference_train.jsonl"))]
  assert all(r["responses"][r["ranking"].index(1)] == r["answer"] for r in rankings)
  again = lmtrain(*args)
  assert again.stdout.count("already complete") == 5
  report = lmtrain("report", workdir)
  assert "| pretrain |" in report.stdout and "| dpo |" in report.stdout
  assert "| ppo |" in report.stdout
  for png in ("loss.png", "sft.png", "reward.png", "ppo.png", "dpo.png"):
    with open(os.path.join(workdir, "report", png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", png
