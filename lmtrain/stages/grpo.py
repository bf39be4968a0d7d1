"""GRPO: PPO's rollouts and clipped policy loss with group-normalised advantages and no value model
(the algorithm: lmtrain/rl/grpo.py; the stage: lmtrain/rl/stage.py)."""

import gin

from lmtrain.rl import stage as rl_stage
from lmtrain.train.loop import LoopConfig


@gin.configurable
def build(workdir: str, model_cfg, loop_cfg: LoopConfig, **kwargs):
  """`lmtrain grpo`; keyword arguments as `rl.stage.make_stage` takes them."""
  return rl_stage.make_stage(workdir, model_cfg, loop_cfg, algorithm="grpo", **kwargs)
