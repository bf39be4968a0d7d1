"""The pretrain -> SFT chain through `lmtrain sft`, its resume, and `lmtrain sample`."""

import dataclasses
import json
import os
import re

import jax
import numpy as np
import pytest

from lmtrain import parallel
from lmtrain.model import transformer
from lmtrain.train import checkpoint as ckpt_lib
import util
from util import lmtrain, saved_state

TINY_ARGS = ["--gin.MODEL=tiny", "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=64", "--gin.LOG_EVERY=1",
             "--gin.WARMUP_STEPS=2", "--gin.EVAL_STEPS=2",
             "--gin.MESH_SHAPE={'data': 2, 'fsdp': 2, 'tensor': 2}"]
SFT_STEPS = 8


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  """A tiny pretrain (demo corpus) followed by SFT on the demo instruction tasks."""
  workdir = str(tmp_path_factory.mktemp("chain"))
  pretrain = lmtrain("pretrain", "--workdir", workdir, *TINY_ARGS, "--gin.TRAIN_STEPS=6",
                     "--gin.LEARNING_RATE=0.01", "--gin.EVAL_EVERY=0")
  proc = lmtrain("sft", "--workdir", workdir, *TINY_ARGS, f"--gin.TRAIN_STEPS={SFT_STEPS}",
                 "--gin.CHECKPOINT_EVERY=4", "--gin.EVAL_EVERY=4",
                 "--gin_param", "sft.build.eval_examples = 8")
  proc.pretrain_stdout = pretrain.stdout
  return workdir, proc


@pytest.mark.slow
def test_sft_starts_from_the_pretrain_checkpoint_and_records_lineage(chain):
  workdir, proc = chain
  lineage = json.load(open(os.path.join(workdir, "sft", "lineage.json")))
  assert lineage["stage"] == "sft"
  pretrain = os.path.join(workdir, "pretrain")
  assert lineage["parent"] == {
      "stage": "pretrain", "path": pretrain, "step": 6,
      "committed": ckpt_lib.committed_at(os.path.join(pretrain, "checkpoints"), 6)}
  assert lineage["parent"]["committed"] > 0
  assert lineage["tokenizer"] == os.path.join(workdir, "tokenizer.model")
  # The pretraining run trained that tokenizer (TOKENIZER='auto', none in the work dir) and said so.
  assert (f"  tokenizer   {lineage['tokenizer']} (trained by this run on 1 file(s))\n"
          in proc.pretrain_stdout)
  # The parent initializer (what the loop calls) returns exactly the pretrain checkpoint's params,
  # resharded onto another mesh.
  mesh = util.mesh_of({"data": 1, "fsdp": 2, "tensor": 4})
  _, abstract_params, names = transformer.abstract_model(util.TINY.__class__(
      **json.load(open(os.path.join(workdir, "sft", "model.json")))))
  shardings = parallel.tree_shardings(mesh, abstract_params, names, parallel.axis_rules())
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_params, shardings)
  params, parent = ckpt_lib.parent_initializer(workdir, None, "pretrain")(abstract)
  assert parent["step"] == 6
  pretrained = saved_state(workdir, 6)["params"]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), pretrained)
  assert params["layers"]["mlp"]["gate"].sharding.spec == jax.sharding.PartitionSpec(
      None, "fsdp", "tensor")


@pytest.mark.slow
def test_sft_trains_on_responses_and_evaluates_answers(chain):
  workdir, proc = chain
  rows = [json.loads(line) for line in open(os.path.join(workdir, "sft", "metrics.jsonl"))]
  train = [r for r in rows if "loss" in r]
  evals = [r for r in rows if "eval_loss" in r]
  assert [r["step"] for r in train] == list(range(1, SFT_STEPS + 1))
  assert train[-1]["loss"] < train[0]["loss"]
  assert [r["step"] for r in evals] == [0, 4, SFT_STEPS]
  for r in evals:
    assert 0.0 <= r["eval_exact_match"] <= 1.0
    assert r["eval_perplexity"] == pytest.approx(np.exp(r["eval_loss"]), rel=1e-6)
  assert "initial_eval_exact_match" in proc.stdout
  # The start-up block counts the training examples (the demo's train split, read independently).
  lineage = json.load(open(os.path.join(workdir, "sft", "lineage.json")))
  train_file = lineage["resume_keys"]["TRAIN_DATA"][0].replace("DIR/", workdir + "/")
  examples = sum(1 for line in open(train_file) if line.strip())
  assert f"  data        {examples:,} examples, packed several to a row\n" in proc.stdout


@pytest.mark.slow
def test_sft_resume_is_bit_exact(chain, tmp_path):
  workdir, _ = chain
  other = str(tmp_path)
  for name in ("pretrain", "tokenizer.model", "data"):
    src = os.path.join(workdir, name)
    os.symlink(src, os.path.join(other, name))
  args = ["sft", "--workdir", other, *TINY_ARGS, f"--gin.TRAIN_STEPS={SFT_STEPS}",
          "--gin.CHECKPOINT_EVERY=4", "--gin.EVAL_EVERY=4", "--gin_param",
          "sft.build.eval_examples = 8"]
  lmtrain(*args, "--gin_param", "LoopConfig.stop_after = 5")
  lmtrain(*args)
  a = [r["loss"] for r in train_rows_of(other)]
  b = [r["loss"] for r in train_rows_of(workdir)]
  assert a == b
  sa = saved_state_of(other, SFT_STEPS)
  sb = saved_state_of(workdir, SFT_STEPS)
  jax.tree.map(np.testing.assert_array_equal, sa, sb)


def closing_figure(stdout, key):
  """An integer of the closing table (`key   value`)."""
  return int(re.search(rf"^{key}\s+(\d+)$", stdout, re.M).group(1))


def train_rows_of(workdir):
  with open(os.path.join(workdir, "sft", "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if "loss" in r]


def saved_state_of(workdir, step):
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "sft", "checkpoints", str(step), "state"))


@pytest.mark.slow
def test_sample_prints_completions_for_pretrain_and_sft(chain):
  workdir, _ = chain
  for stage in ("pretrain", "sft"):
    proc = lmtrain("sample", "--checkpoint", os.path.join(workdir, stage), "--prompt",
                   "What is 2 + 3?", "--prompt", "Sort: pear apple", "--max_new_tokens", "8",
                   "--greedy")
    assert f"# {stage} checkpoint step" in proc.stdout
    assert proc.stdout.count(">>> ") == 2
  # Temperature 0 is greedy decoding, as in the OpenAI API and vLLM.
  zero = lmtrain("sample", "--checkpoint", os.path.join(workdir, "sft"), "--prompt",
                 "What is 2 + 3?", "--prompt", "Sort: pear apple", "--max_new_tokens", "8",
                 "--temperature", "0")
  assert zero.stdout == proc.stdout
  proc = lmtrain("sample", "--checkpoint", os.path.join(workdir, "nope"), "--prompt", "x",
                 check=False)
  assert proc.returncode == 1 and "model.json is missing" in proc.stderr


@pytest.mark.slow
def test_sft_with_only_the_head_trainable_leaves_the_rest_as_the_parent(chain, tmp_path):
  workdir, _ = chain
  other = str(tmp_path)
  for name in ("pretrain", "tokenizer.model", "data"):
    os.symlink(os.path.join(workdir, name), os.path.join(other, name))
  args = ["sft", "--workdir", other, *TINY_ARGS, "--gin.EVAL_EVERY=0",
          "--gin.TRAINABLE=['final_norm/scale', 'lm_head']", "--gin_param",
          "sft.build.eval_examples = 8"]
  proc = lmtrain(*args, "--gin.TRAIN_STEPS=2")
  cfg = util.TINY.__class__(**json.load(open(os.path.join(other, "sft", "model.json"))))
  head = cfg.d_model + cfg.d_model * cfg.vocab_size
  total = cfg.param_count()
  assert (total, head) == (139_584, 32_832)  # counts of 100k and more said in millions
  assert "  parameters  0.14M (32,832 trained, 0.11M frozen)\n" in proc.stdout
  parent, child = saved_state(workdir, 6)["params"], saved_state_of(other, 2)
  for path, before in jax.tree_util.tree_leaves_with_path(parent):
    after = child["params"]
    for k in path:
      after = after[k.key]
    name = "/".join(k.key for k in path)
    if name in ("final_norm/scale", "lm_head"):
      assert not np.array_equal(after, before), name
    else:
      np.testing.assert_array_equal(after, before, err_msg=name)
  # The optimizer state holds the head's two moments only, as the closing table says.
  moments = sum(x.size for x in jax.tree.leaves(child["opt_state"]) if np.ndim(x))
  assert moments == 2 * head
  assert closing_figure(proc.stdout, "trained_params") == head
  assert 4 * moments <= closing_figure(proc.stdout, "optimizer_state_bytes") <= 4 * moments + 64
  # Its checkpoints hold that optimizer state: a resume that trains other parameters is refused.
  again = lmtrain(*args, "--gin.TRAIN_STEPS=4", "--gin.TRAINABLE='all'", "--allow_config_change",
                  check=False)
  assert again.returncode == 1
  assert again.stderr.strip().splitlines()[-1] == (
      f"lmtrain: error: {other}/sft: resuming with another TRAINABLE "
      f"[\"final_norm/scale\", \"lm_head\"] -> all; the checkpoints hold the optimizer state of "
      f"the parameters trained before; use a new --workdir (INIT_FROM this one to start from its "
      f"weights)")


@pytest.mark.slow
def test_lora_sft_trains_only_adapters_resumes_exactly_and_its_children_start_merged(chain,
                                                                                   tmp_path):
  from lmtrain.model import lora
  workdir, _ = chain
  dirs = [str(tmp_path / name) for name in ("straight", "resumed")]
  for d in dirs:
    os.makedirs(d)
    for name in ("pretrain", "tokenizer.model", "data"):
      os.symlink(os.path.join(workdir, name), os.path.join(d, name))
  args = [*TINY_ARGS, "--gin.EVAL_EVERY=0", "--gin.TRAIN_STEPS=4", "--gin.CHECKPOINT_EVERY=2",
          "--gin.LORA_RANK=4", "--gin.LORA_ALPHA=8", "--gin.LORA_TARGETS=['q', 'v', 'down']",
          "--gin_param", "sft.build.eval_examples = 8"]
  straight = lmtrain("sft", "--workdir", dirs[0], *args)
  lmtrain("sft", "--workdir", dirs[1], *args, "--gin_param", "LoopConfig.stop_after = 2")
  lmtrain("sft", "--workdir", dirs[1], *args)
  assert [r["loss"] for r in train_rows_of(dirs[0])] == [r["loss"] for r in train_rows_of(dirs[1])]
  state = saved_state_of(dirs[0], 4)
  jax.tree.map(np.testing.assert_array_equal, saved_state_of(dirs[1], 4), state)

  cfg = util.TINY.__class__(**json.load(open(os.path.join(dirs[0], "sft", "model.json"))))
  assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets) == (4, 8.0, ("q", "v", "down"))
  # q: 64 x 4 + 4 x 4 x 16, v: 64 x 4 + 4 x 2 x 16, down: 128 x 4 + 4 x 64, in 2 layers.
  adapters = 2 * ((256 + 256) + (256 + 128) + (512 + 256))
  assert adapters == lora.adapter_count(state["params"]) == 3_328
  assert "  parameters  0.14M (3,328 trained, 0.14M frozen)\n" in straight.stdout
  moments = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x))
  assert moments == 2 * adapters
  assert closing_figure(straight.stdout, "trained_params") == adapters
  assert 4 * moments <= closing_figure(straight.stdout, "optimizer_state_bytes") <= 4 * moments + 64
  # The checkpoint holds the adapters, not another copy of the base: lineage.json names it.
  assert sorted(state["params"]) == [lora.KEY]
  assert all(np.abs(ad["b"]).max() > 0 for ad in state["params"][lora.KEY].values())
  lineage = json.load(open(os.path.join(dirs[0], "sft", "lineage.json")))
  assert (lineage["parent"]["stage"], lineage["parent"]["step"]) == ("pretrain", 6)
  assert lineage["parent"]["committed"] > 0
  # Read back (`lmtrain sample`, the converters, children): the parent's weights bit for bit and
  # the adapters trained.
  pretrained = saved_state(workdir, 6)["params"]
  # On disk: less than one fp32 copy of the base's weights (a checkpoint holding the base would
  # exceed it; most of the adapters' ~300 KB is the checkpoint's per-array metadata), and a
  # fraction of the full SFT's (weights and two moments).
  size = lambda d: sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)
  adapter_bytes = size(os.path.join(dirs[0], "sft", "checkpoints", "4", "state"))
  full_bytes = size(os.path.join(workdir, "sft", "checkpoints", str(SFT_STEPS), "state"))
  base_bytes = 4 * sum(x.size for x in jax.tree.leaves(pretrained))
  assert adapter_bytes < base_bytes and adapter_bytes < full_bytes / 4, (
      adapter_bytes, base_bytes, full_bytes)
  _, abstract, _ = transformer.abstract_model(cfg)
  host = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  loaded, step = ckpt_lib.restore_params(
      os.path.join(dirs[0], "sft"),
      jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=host), abstract))
  assert step == 4
  loaded = jax.device_get(loaded)
  jax.tree.map(np.testing.assert_array_equal, lora.without_adapters(loaded), pretrained)
  jax.tree.map(np.testing.assert_array_equal, loaded[lora.KEY], state["params"][lora.KEY])

  # A child stage starts from the merged weights (W + alpha / r x A B), with adapters of its own
  # when it uses LoRA too (a reward model: fresh B = 0, its new scalar head).
  expected = jax.tree.map(np.asarray, lora.merged(loaded, 2.0))
  for child in (dataclasses.replace(cfg, lora_rank=0), dataclasses.replace(cfg, head="scalar")):
    mesh = util.mesh_of({"data": 2, "fsdp": 2, "tensor": 2})
    _, abstract, names = transformer.abstract_model(child)
    shardings = parallel.tree_shardings(mesh, abstract, names, parallel.axis_rules())
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    params, parent = ckpt_lib.parent_initializer(dirs[0], None, "sft", child)(abstract)
    assert parent["stage"] == "sft" and parent["step"] == 4
    params = jax.device_get(params)
    base = {k: v for k, v in lora.without_adapters(params).items() if k in expected}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                 base, {k: expected[k] for k in base})
    if child.lora_rank:
      assert sorted(params[lora.KEY]) == ["down", "q", "v"]
      assert all(not np.any(ad["b"]) for ad in params[lora.KEY].values())
      assert "score" in params
  # `lmtrain sample` loads base + adapters.
  out = lmtrain("sample", "--checkpoint", os.path.join(dirs[0], "sft"), "--prompt",
                "What is 2 + 3?", "--max_new_tokens", "4", "--greedy")
  assert out.stdout.startswith(f"# sft checkpoint step 4 ({dirs[0]}/sft)\n\n>>> What is 2 + 3?\n")
