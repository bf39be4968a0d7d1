"""A LoRA stage's checkpoint holds its adapters (and trained heads), and its base comes from the
parent checkpoint its lineage.json names: read back through a chain of LoRA stages, after the work
dir moved, and refused when the parent's checkpoint is gone or was written anew."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import optax
import pytest

from lmtrain.errors import UserError
from lmtrain.model import lora, transformer
from lmtrain.train import checkpoint as ckpt_lib
from lmtrain.train.state import TrainState
import util

LORA = dataclasses.replace(util.TINY, lora_rank=2, lora_alpha=4.0, lora_targets=("q", "down"))


def write_stage(workdir, name, params, step, parent=None, cfg=None):
  """DIR/<name> as a run leaves it: a checkpoint of `params`, model.json and lineage.json."""
  stage_dir = os.path.join(workdir, name)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(stage_dir, "checkpoints"))
  checkpointer.save(step, TrainState.create(params, optax.sgd(0.1), jax.random.PRNGKey(0)))
  checkpointer.close()
  with open(os.path.join(stage_dir, "model.json"), "w") as f:
    json.dump(dataclasses.asdict(cfg or util.TINY), f)
  entry = None
  if parent:
    entry = {"stage": parent[0], "path": os.path.join(workdir, parent[0]), "step": parent[1],
             "committed": ckpt_lib.committed_at(
                 os.path.join(workdir, parent[0], "checkpoints"), parent[1])}
  with open(os.path.join(stage_dir, "lineage.json"), "w") as f:
    json.dump({"stage": name, "parent": entry}, f)
  return stage_dir


def trained_adapters(seed):
  """Adapters as after training: B off zero."""
  abstract = transformer.abstract_model(LORA)[1][lora.KEY]
  adapters = lora.fresh_adapters(abstract, jax.random.PRNGKey(seed))
  return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(seed + 7),
                                                             x.shape), adapters)


@pytest.fixture
def chain(tmp_path):
  """pretrain (full) -> sft (adapters only) -> dpo (adapters only, over sft's merged weights)."""
  workdir = str(tmp_path / "run")
  base = util.init_params(util.TINY)
  sft, dpo = trained_adapters(1), trained_adapters(2)
  write_stage(workdir, "pretrain", base, 6)
  write_stage(workdir, "sft", {lora.KEY: sft}, 4, parent=("pretrain", 6), cfg=LORA)
  write_stage(workdir, "dpo", {lora.KEY: dpo}, 2, parent=("sft", 4), cfg=LORA)
  merged_sft = lora.merged({**base, lora.KEY: sft}, LORA.lora_scale)
  return workdir, merged_sft, dpo


def read(stage_dir):
  host = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=host),
                          transformer.abstract_model(LORA)[1])
  params, _ = ckpt_lib.restore_params(stage_dir, abstract)
  return jax.device_get(params)


def test_a_chain_of_lora_stages_reads_back_its_bases(chain):
  workdir, merged_sft, dpo = chain
  params = read(os.path.join(workdir, "dpo"))
  jax.tree.map(np.testing.assert_array_equal, params[lora.KEY], dpo)
  # The base of the DPO adapters is pretrain's weights with SFT's adapters folded in.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               lora.without_adapters(params), jax.device_get(merged_sft))


def test_a_moved_work_dir_finds_the_parent_beside_the_stage(chain, tmp_path):
  workdir, _, dpo = chain
  moved = str(tmp_path / "moved")
  shutil.move(workdir, moved)
  params = read(os.path.join(moved, "dpo"))
  jax.tree.map(np.testing.assert_array_equal, params[lora.KEY], dpo)


def test_a_parent_written_anew_is_refused(chain):
  workdir, _, _ = chain
  metadata = os.path.join(workdir, "pretrain", "checkpoints", "6", "_CHECKPOINT_METADATA")
  record = json.load(open(metadata))
  record["commit_timestamp_nsecs"] += 1
  json.dump(record, open(metadata, "w"))
  with pytest.raises(UserError) as e:
    read(os.path.join(workdir, "dpo"))
  assert str(e.value) == (
      f"{workdir}/dpo (LoRA adapters over the weights of {workdir}/sft at step 4): {workdir}/sft "
      f"(LoRA adapters over the weights of {workdir}/pretrain at step 6): {workdir}/pretrain: "
      f"checkpoint 6 was written anew since this stage started from it; its adapters and state "
      f"belong to the earlier one")


@pytest.mark.parametrize("removed, stage, parent, step, problem", [
    (("sft", "checkpoints", "4"), "dpo", "sft", 4,  # a step the parent's retention dropped
     "checkpoint 4, the one this stage started from, is gone (the steps there: none)"),
    (("pretrain",), "sft", "pretrain", 6, "no checkpoints there"),  # the parent stage deleted
])
def test_a_parent_checkpoint_gone_is_one_line(chain, removed, stage, parent, step, problem):
  workdir, _, _ = chain
  shutil.rmtree(os.path.join(workdir, *removed))
  with pytest.raises(UserError) as e:
    read(os.path.join(workdir, stage))
  assert str(e.value) == (
      f"{workdir}/{stage} (LoRA adapters over the weights of {workdir}/{parent} at step {step}): "
      f"{workdir}/{parent}: {problem}; a LoRA stage's checkpoints hold its adapters, not the base "
      f"weights they adapt")


def test_a_child_with_a_new_head_refuses_a_lora_parent_whose_base_is_gone(chain):
  """A reward model (a new scalar head) from LoRA SFT: with the base gone, its trunk is an error,
  not a fresh random one."""
  workdir, _, _ = chain
  shutil.rmtree(os.path.join(workdir, "pretrain"))
  cfg = dataclasses.replace(LORA, head="scalar")
  host = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=host),
                          transformer.abstract_model(cfg)[1])
  with pytest.raises(UserError) as e:
    ckpt_lib.parent_initializer(workdir, None, "sft", cfg)(abstract)
  assert str(e.value) == (
      f"{workdir}/sft (LoRA adapters over the weights of {workdir}/pretrain at step 6): "
      f"{workdir}/pretrain: no checkpoints there; a LoRA stage's checkpoints hold its adapters, "
      f"not the base weights they adapt")
