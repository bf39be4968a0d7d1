"""GRPO: PPO's rollouts and clipped policy loss with group-normalised advantages and no critic.

GROUP_SIZE responses are sampled per prompt; each response's score minus its group's mean, over the
group's std, is the advantage of every one of its tokens (a group of equal scores gives exactly 0, so
no gradient); the KL to the reference (k3) joins the loss with KL_COEF. Everything else is the PPO
stage's (lmtrain/stages/ppo.py): roles, checkpointed state, host scoring, metrics.
"""

import gin

from lmtrain.stages import ppo
from lmtrain.train.loop import LoopConfig


@gin.configurable
def build(workdir: str, model_cfg, loop_cfg: LoopConfig, train_data=gin.REQUIRED, **kwargs):
  """`lmtrain grpo`; keyword arguments as `ppo.make_stage` takes them."""
  return ppo.make_stage(workdir, model_cfg, loop_cfg, algorithm="grpo", train_data=train_data,
                        **kwargs)
