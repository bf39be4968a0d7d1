"""PPO: the SFT policy optimised against the reward model, with a value model and a per-token KL
penalty to the frozen SFT policy (the algorithm: lmtrain/rl/ppo.py; the stage: lmtrain/rl/stage.py).
"""

import gin

from lmtrain.rl import stage as rl_stage
from lmtrain.train.loop import LoopConfig


@gin.configurable
def build(workdir: str, model_cfg, loop_cfg: LoopConfig, **kwargs):
  """`lmtrain ppo`; keyword arguments as `rl.stage.make_stage` takes them (RLConfig fields
  included)."""
  return rl_stage.make_stage(workdir, model_cfg, loop_cfg, algorithm="ppo", **kwargs)
