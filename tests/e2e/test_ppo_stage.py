"""`lmtrain ppo` and `lmtrain grpo` through the command line: roles loaded from their parents, every
PPO metric logged, the KL controller and frozen roles in the checkpoint, bit-exact resume (with
LoRA too), errors."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from lmtrain.model import lora, transformer
from lmtrain.train import checkpoint as ckpt_lib
from lmtrain.train.state import TrainState
import util
from util import lmtrain

# The tiny preset (gin_configs/models/tiny.gin), built directly for the parents' checkpoints.
TINY = transformer.ModelConfig(vocab_size=512, d_model=64, num_layers=2, num_heads=4,
                               num_kv_heads=2, mlp_dim=128, tie_embeddings=False)
PPO_METRICS = ("reward_mean", "kl", "kl_coef", "entropy", "policy_loss", "value_loss", "clipfrac",
               "approx_kl", "explained_variance", "response_length", "task_score", "loss",
               "grad_norm", "learning_rate", "tokens_per_sec", "mfu")


@pytest.fixture(scope="module")
def parents(tmp_path_factory, tokenizer_path):
  """DIR/sft (an LM) and DIR/reward (a scalar head, with its normalisation) as a chain leaves
  them, with random tiny params, and the run's tokenizer."""
  root = str(tmp_path_factory.mktemp("parents"))
  shutil.copy(tokenizer_path, os.path.join(root, "tokenizer.model"))
  for stage, head, seed in (("sft", "lm", 0), ("reward", "scalar", 1)):
    params = util.init_params(dataclasses.replace(TINY, head=head), seed)
    state = TrainState.create(params, optax.sgd(0.1), jax.random.PRNGKey(0))
    checkpointer = ckpt_lib.Checkpointer(os.path.join(root, stage, "checkpoints"))
    checkpointer.save(3, state)
    checkpointer.close()
    with open(os.path.join(root, stage, "lineage.json"), "w") as f:
      json.dump({"stage": stage}, f)
  with open(os.path.join(root, "reward", "reward_normalization.json"), "w") as f:
    json.dump({"offset": 0.5, "scale": 2.0, "num_responses": 8}, f)
  return root


def ppo_args(parents, *extra):
  return ["--gin.MODEL=tiny", "--gin.BATCH_SIZE=8", "--gin.LOG_EVERY=1", "--gin.PROMPT_LEN=48",
          "--gin.MAX_NEW_TOKENS=6", "--gin.EVAL_EVERY=0", "--gin.PPO_EPOCHS=2",
          "--gin.NUM_MINIBATCHES=2", "--gin.LEARNING_RATE=0.003",
          "--gin.MESH_SHAPE={'data': 2, 'fsdp': 2, 'tensor': 2}",  # 4 rollouts per minibatch
          f"--gin.TOKENIZER={parents}/tokenizer.model", f"--gin.INIT_FROM={parents}/sft",
          "--gin_param=ppo.build.eval_examples=8", *extra]


def rows(workdir, stage):
  with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def restore(path):
  return ocp.StandardCheckpointer().restore(os.path.join(path, "state"))


@pytest.mark.slow
def test_ppo_logs_every_metric_keeps_roles_frozen_and_resumes_bit_exactly(parents, tmp_path):
  # With PPO-ptx: the resumed run must draw the same prompt and PTX rows (both iterators are in
  # the checkpoint).
  text = tmp_path / "ptx.jsonl"
  text.write_text("".join(json.dumps({"text": f"Line {i}: the quick brown fox jumps over the lazy "
                                              f"dog and returns to sample {i * 7}."}) + "\n"
                          for i in range(200)))
  args = ppo_args(parents, f"--gin.REWARD_FROM={parents}/reward", "--gin.TRAIN_STEPS=4",
                  "--gin.KL_TARGET=0.5", "--gin.PTX_COEF=0.5", f"--gin.PTX_DATA={text}",
                  "--gin.SEQ_LEN=32")
  straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
  proc = lmtrain("ppo", "--workdir", straight, *args)
  lmtrain("ppo", "--workdir", split, *args, "--gin_param=LoopConfig.stop_after=2")
  assert sorted(os.listdir(os.path.join(split, "ppo", "checkpoints"))) == ["2"]
  lmtrain("ppo", "--workdir", split, *args)

  train = [r for r in rows(straight, "ppo") if "loss" in r]
  assert [r["step"] for r in train] == [1, 2, 3, 4]
  for key in PPO_METRICS:
    assert all(key in r for r in train), key
  # policy == reference at the start: exactly no KL in the first rollout's measurement
  assert train[0]["kl"] == 0.0
  # the adaptive controller (target 0.5, horizon 10000, 8 rollouts a step) follows the measured KL
  for before, after in zip(train, train[1:]):
    error = np.clip(before["kl"] / 0.5 - 1, -0.2, 0.2)
    assert after["kl_coef"] == pytest.approx(before["kl_coef"] * (1 + error * 8 / 10000),
                                             rel=1e-6)
  assert train[-1]["kl_coef"] != train[0]["kl_coef"]
  # PTX_COEF x the LM loss trains the policy on the (repetitive) text: from near a random tiny
  # model's ln(vocab 512) = 6.24 it falls step by step
  ptx = [r["ptx_loss"] for r in train]
  assert 4.5 < ptx[0] < 7.5 and ptx[0] > ptx[1] > ptx[2] and ptx[2] < ptx[0] - 1.0, ptx
  evals = [r for r in rows(straight, "ppo") if "eval_task_score" in r]
  assert evals[0]["step"] == 0 and evals[-1]["step"] == 4  # the SFT policy's score, then PPO's
  for r in evals:  # per demo task: 8 held-out prompts, the four tasks in turn, 2 each
    per_task = [r[f"eval_task_score_{t}"] for t in ("count", "last", "reverse", "sort")]
    assert all(s in (0.0, 0.5, 1.0) for s in per_task)
    assert np.mean(per_task) == pytest.approx(r["eval_task_score"])
  assert "initial_eval_task_score" in proc.stdout and "kl_bound" in proc.stdout
  # The start-up block counts the demo's training prompts: 8 a step for 4 steps.
  lineage = json.load(open(os.path.join(straight, "ppo", "lineage.json")))
  prompts_file = lineage["resume_keys"]["TRAIN_DATA"][0].replace("DIR/", straight + "/")
  n = sum(1 for line in open(prompts_file) if line.strip())
  assert f"  data        {n:,} prompts; the run reads 32 ({32 / n:.2f} epochs)\n" in proc.stdout

  resumed = [r for r in rows(split, "ppo") if "loss" in r]
  for a, b in zip(train[2:], [r for r in resumed if r["step"] > 2]):
    for key in ("loss", "ptx_loss", "kl", "kl_coef", "reward_mean", "task_score", "grad_norm"):
      assert a[key] == b[key], (key, a, b)
  end_a = restore(os.path.join(straight, "ppo", "checkpoints", "4"))
  end_b = restore(os.path.join(split, "ppo", "checkpoints", "4"))
  jax.tree.map(np.testing.assert_array_equal, end_a, end_b)

  # reference == the SFT params, reward == the reward model, bit for bit, after training
  sft = restore(os.path.join(parents, "sft", "checkpoints", "3"))
  rm = restore(os.path.join(parents, "reward", "checkpoints", "3"))
  jax.tree.map(np.testing.assert_array_equal, end_a["extras"]["reference"], sft["params"])
  jax.tree.map(np.testing.assert_array_equal, end_a["extras"]["reward"], rm["params"])
  assert set(end_a["params"]) == {"policy", "value"}
  assert set(end_a["extras"]["kl_ctl"]) == {"kl_coef", "target", "horizon", "adaptive"}
  lineage = json.load(open(os.path.join(straight, "ppo", "lineage.json")))
  assert lineage["parent"]["stage"] == "sft"
  assert lineage["parent"]["reward_model"]["stage"] == "reward"
  assert lineage["parent"]["value_model"]["path"] == os.path.join(parents, "reward")
  # the PPO checkpoint serves as one model: its policy (sample, convert, INIT_FROM)
  policy, step = ckpt_lib.restore_params(os.path.join(straight, "ppo"),
                                         transformer.abstract_model(TINY)[1])
  assert step == 4
  jax.tree.map(np.testing.assert_array_equal, policy, end_a["params"]["policy"])
  out = lmtrain("sample", "--checkpoint", os.path.join(straight, "ppo"), "--prompt",
                "What is 1 + 2?", "--greedy", "--max_new_tokens", "4")
  assert "What is 1 + 2?" in out.stdout


@pytest.mark.slow
def test_lora_ppo_trains_adapters_over_frozen_parents_and_resumes_bit_exactly(parents, tmp_path):
  args = ppo_args(parents, f"--gin.REWARD_FROM={parents}/reward", "--gin.TRAIN_STEPS=2",
                  "--gin.LORA_RANK=4", "--gin.LORA_ALPHA=8",
                  "--gin.LORA_TARGETS=['q', 'v', 'down']")
  straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
  proc = lmtrain("ppo", "--workdir", straight, *args)
  # The resumed run without the held-out evaluation (it trains the same), to keep the test short.
  unevaluated = [*args, "--gin_param=ppo.build.eval_examples=0"]
  lmtrain("ppo", "--workdir", split, *unevaluated, "--gin_param=LoopConfig.stop_after=1")
  lmtrain("ppo", "--workdir", split, *unevaluated)

  train = [r for r in rows(straight, "ppo") if "loss" in r]
  assert train[0]["kl"] == 0.0  # the reference, the base without adapters, is the policy at first
  resumed = [r for r in rows(split, "ppo") if "loss" in r and r["step"] == 2]
  for key in ("loss", "kl", "reward_mean", "grad_norm", "value_loss"):
    assert resumed[0][key] == train[1][key], key
  end = restore(os.path.join(straight, "ppo", "checkpoints", "2"))
  jax.tree.map(np.testing.assert_array_equal, end,
               restore(os.path.join(split, "ppo", "checkpoints", "2")))

  # The checkpoint holds what trains: the adapters, the value head and the KL controller; no
  # reference copy, no reward model, no base (lineage.json names the parents, step and commit).
  assert set(end["extras"]) == {"kl_ctl"}
  policy, value = end["params"]["policy"], end["params"]["value"]
  assert sorted(policy) == [lora.KEY] and sorted(value) == [lora.KEY, "score", "score_bias"]
  for model in (policy, value):
    assert sorted(model[lora.KEY]) == ["down", "q", "v"]
    assert all(np.abs(ad["b"]).max() > 0 for ad in model[lora.KEY].values())
  parent = json.load(open(os.path.join(straight, "ppo", "lineage.json")))["parent"]
  assert (parent["path"], parent["step"]) == (f"{parents}/sft", 3)
  assert (parent["reward_model"]["path"], parent["reward_model"]["step"]) == (
      f"{parents}/reward", 3)
  # Read back as a model (`lmtrain sample`, a child stage): the SFT weights bit for bit under the
  # policy's adapters.
  sft = restore(os.path.join(parents, "sft", "checkpoints", "3"))["params"]
  cfg = dataclasses.replace(TINY, lora_rank=4, lora_alpha=8.0, lora_targets=("q", "v", "down"))
  host = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=host),
                          transformer.abstract_model(cfg)[1])
  loaded, _ = ckpt_lib.restore_params(os.path.join(straight, "ppo"), abstract)
  loaded = jax.device_get(loaded)
  jax.tree.map(np.testing.assert_array_equal, lora.without_adapters(loaded), sft)
  jax.tree.map(np.testing.assert_array_equal, loaded[lora.KEY], policy[lora.KEY])

  # The start-up block counts the adapters and the value head as trained, the rest as frozen
  # (the reward model's scalar bias aside, as for every frozen role).
  rm = restore(os.path.join(parents, "reward", "checkpoints", "3"))["params"]
  size = lambda tree: sum(int(np.size(x)) for x in jax.tree.leaves(tree))
  adapters = 2 * lora.adapter_count(transformer.abstract_model(cfg)[1])
  trained = adapters + TINY.d_model + 1
  total = (size(transformer.abstract_model(cfg)[1])
           + size(transformer.abstract_model(dataclasses.replace(cfg, head="scalar"))[1])
           + size(rm) - 1)
  assert (f"  parameters  {total / 1e6:,.2f}M ({trained:,} trained, "
          f"{(total - trained) / 1e6:,.2f}M frozen)\n") in proc.stdout
  # `lmtrain sample` loads the policy's base and adapters
  model_json = json.load(open(os.path.join(straight, "ppo", "model.json")))
  assert model_json["lora_rank"] == 4
  out = lmtrain("sample", "--checkpoint", os.path.join(straight, "ppo"), "--prompt",
                "What is 1 + 2?", "--greedy", "--max_new_tokens", "4")
  assert "What is 1 + 2?" in out.stdout


@pytest.mark.slow
def test_grpo_with_a_scorer_as_reward_has_no_critic(parents, tmp_path):
  workdir = str(tmp_path / "grpo")
  lmtrain("grpo", "--workdir", workdir, *ppo_args(parents, "--gin.TRAIN_STEPS=2",
                                                  "--gin.GROUP_SIZE=4", "--gin.REWARD=scorer"),
          "--gin_param=grpo.build.eval_examples=8")
  train = [r for r in rows(workdir, "grpo") if "loss" in r]
  assert len(train) == 2
  assert all("task_score" in r and "kl_loss" in r and "value_loss" not in r for r in train)
  # with the scorer as reward, the reward is the task score (no response ends without EOS here
  # or gets the penalty: both are logged)
  r = train[0]
  assert r["reward_mean"] == pytest.approx(r["task_score"] + (1 - r["eos_fraction"]) * -1.0,
                                           abs=1e-6)
  state = restore(os.path.join(workdir, "grpo", "checkpoints", "2"))
  assert set(state["params"]) == {"policy"} and "reward" not in state["extras"]


def test_ppo_errors_are_one_line(parents, tmp_path):
  bad_prompts = tmp_path / "prompts.jsonl"
  bad_prompts.write_text(json.dumps({"prompt": "no answer here"}) + "\n")
  cases = [
      (["--gin.REWARD=oracle"], "REWARD='oracle'"),
      (["--gin.LORA_RANK=4", "--gin.TRAINABLE=['lm_head']"],
       "TRAINABLE=['lm_head'] with LORA_RANK=4: ppo's reference is the base without the adapters"),
      ([f"--gin.REWARD_FROM={tmp_path}/nowhere"], "nowhere: no checkpoints there"),
      ([f"--gin.TRAIN_DATA={bad_prompts}", f"--gin.REWARD_FROM={parents}/reward"],
       'record has no "task" field'),
      (["--gin.NUM_MINIBATCHES=3", f"--gin.REWARD_FROM={parents}/reward"],
       "does not divide into NUM_MINIBATCHES=3"),
      (["--gin.NUM_MINIBATCHES=4", f"--gin.REWARD_FROM={parents}/reward"],
       "2 rollouts per minibatch (BATCH_SIZE=8 / NUM_MINIBATCHES=4) do not divide over the "
       "mesh's 4 batch shards"),
  ]
  for extra, message in cases:
    proc = lmtrain("ppo", "--workdir", str(tmp_path / "run"), *ppo_args(parents, *extra),
                   check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lmtrain: error: ") and message in last, last


@pytest.mark.slow
def test_ppo_with_a_scorer_as_reward_starts_its_critic_from_the_sft_trunk(parents, tmp_path):
  workdir = str(tmp_path / "ppo-scorer")
  lmtrain("ppo", "--workdir", workdir, *ppo_args(parents, "--gin.TRAIN_STEPS=1",
                                                 "--gin.REWARD=scorer", "--gin.LEARNING_RATE=0"))
  r = [r for r in rows(workdir, "ppo") if "loss" in r][0]
  assert r["reward_mean"] == pytest.approx(r["task_score"] + (1 - r["eos_fraction"]) * -1.0,
                                           abs=1e-6)
  lineage = json.load(open(os.path.join(workdir, "ppo", "lineage.json")))
  assert lineage["parent"]["value_model"]["stage"] == "sft"
  assert "reward_model" not in lineage["parent"]
  state = restore(os.path.join(workdir, "ppo", "checkpoints", "1"))
  sft = restore(os.path.join(parents, "sft", "checkpoints", "3"))
  assert "reward" not in state["extras"] and "lm_head" not in state["params"]["value"]
  assert state["params"]["value"]["score"].shape == (TINY.d_model,)
  # learning rate 0: the critic's trunk is still exactly the SFT trunk
  jax.tree.map(np.testing.assert_array_equal, state["params"]["value"]["layers"],
               sft["params"]["layers"])
