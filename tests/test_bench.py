"""`lmtrain bench`'s figures for a run that trains a fraction of the weights: the trained count and
the optimizer's bytes follow what trains (the timing figures are printed, not tested)."""

import dataclasses

import pytest

from lmtrain import bench
from lmtrain.model import lora
import util


@pytest.mark.parametrize("lora_rank, trainable", [(0, "all"), (0, ["final_norm/scale", "lm_head"]),
                                                  (4, "all")])
def test_trained_params_and_optimizer_bytes_follow_what_trains(lora_rank, trainable):
  cfg = dataclasses.replace(util.TINY, lora_rank=lora_rank)
  result = bench.measure(cfg, util.mesh_of({"data": 1, "fsdp": 1, "tensor": 1}), batch_size=2,
                         seq_len=16, steps=1, trainable=trainable)
  params = util.init_params(cfg)
  if lora_rank:
    expected = lora.adapter_count(params)
  elif trainable == "all":
    expected = cfg.param_count()
  else:
    expected = params["final_norm"]["scale"].size + params["lm_head"].size
  assert result["params"] == cfg.param_count()
  assert result["trained_params"] == expected
  assert (expected < cfg.param_count()) == (lora_rank > 0 or trainable != "all")
  # AdamW's two fp32 moments per trained element, and its step count (int32) per transform.
  moments = 2 * 4 * expected
  assert moments <= result["optimizer_state_bytes"] <= moments + 64
