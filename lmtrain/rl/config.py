"""The RL hyper-parameters every algorithm reads, and what an algorithm supplies to the learner."""

import abc
import dataclasses
from typing import Any, NamedTuple

from lmtrain.errors import UserError


class Graphdefs(NamedTuple):
  """The model structures of the RL roles (lmtrain/train/roles.py); None for a role not used."""
  policy: Any  # also the reference's
  value: Any = None
  reward: Any = None


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """The RL settings: `make_stage` arguments (bound in gin_configs/stages/rl.gin)."""
  algorithm: str = "ppo"  # a name in lmtrain.rl.learner.ALGORITHMS
  prompt_len: int = 64
  max_new_tokens: int = 32
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  # The policy's weight matrices while it decodes, and the frozen reference's and reward model's
  # in the train state: auto (the compute dtype: bfloat16 on TPU/GPU, float32 on CPU) | float32 |
  # bfloat16. Matrices are cast to the compute dtype where they are used, so storing them in it
  # changes no output and halves their bytes on accelerators.
  rollout_dtype: str = "auto"
  frozen_dtype: str = "auto"
  kl_coef: float = 0.05
  kl_estimator: str = "k1"  # k1 | k2 | k3 | abs (PPO's reward penalty; GRPO's loss uses k3)
  kl_target: float | None = None  # adaptive KL controller target (None: fixed kl_coef)
  kl_horizon: float = 10000.0
  gamma: float = 1.0
  lam: float = 0.95
  epochs: int = 2
  num_minibatches: int = 2
  clip_eps: float = 0.2
  value_clip_eps: float = 0.2
  vf_coef: float = 0.1
  # The value model's own optimizer (algorithms with one): its peak learning rate (the policy's
  # schedule shape; None: LEARNING_RATE) and gradient-norm clip (None: make_optimizer's). With
  # either set, policy and value are clipped and stepped separately; with neither, one
  # optimizer clips their joint gradient.
  value_learning_rate: float | None = None
  value_clip_norm: float | None = None
  entropy_coef: float = 0.0
  whiten_advantages: bool = True
  # gae (PPO's, with its value model) | grpo | dr_grpo | rloo | reinforce_baseline (GRPO's
  # critic-free group baselines: lmtrain.rl.core.group_advantages); None: the algorithm's own.
  advantage_estimator: str | None = None
  # How the per-token policy loss (and GRPO's KL term) is averaged over a minibatch: token |
  # sequence | dr_grpo (lmtrain.rl.core.aggregation_weights). The value loss, entropy bonus and
  # metrics of a value model are token means.
  loss_aggregation: str = "token"
  kl_clip: float | None = None  # clamp each token's KL estimate to [-kl_clip, kl_clip]
  reward_clip: float | None = None  # clamp each sequence's (normalised) score to [-c, c]
  missing_eos_penalty: float = -1.0
  group_size: int = 1  # GRPO: samples per prompt
  ptx_coef: float = 0.0
  reward_offset: float = 0.0  # the reward model's normalisation: (score - offset) / scale
  reward_scale: float = 1.0

  def validate(self):
    """The settings every algorithm shares; the algorithm checks its own (Algorithm.validate)."""
    if self.kl_estimator not in ("k1", "k2", "k3", "abs"):
      raise UserError(f"KL_ESTIMATOR={self.kl_estimator!r}: choose k1, k2, k3 or abs")
    if self.epochs < 1 or self.num_minibatches < 1:
      raise UserError(f"PPO_EPOCHS={self.epochs} and NUM_MINIBATCHES={self.num_minibatches} "
                      "must be positive")
    for name, value in (("ROLLOUT_DTYPE", self.rollout_dtype), ("FROZEN_DTYPE", self.frozen_dtype)):
      if value not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"{name}={value!r}: choose auto, float32, bfloat16 or float16")
    if self.loss_aggregation not in ("token", "sequence", "dr_grpo"):
      raise UserError(f"LOSS_AGGREGATION={self.loss_aggregation!r}: choose token, sequence or "
                      "dr_grpo")
    for name, value in (("KL_CLIP", self.kl_clip), ("REWARD_CLIP", self.reward_clip),
                        ("VALUE_LEARNING_RATE", self.value_learning_rate),
                        ("VALUE_CLIP_NORM", self.value_clip_norm)):
      if value is not None and not value > 0:
        raise UserError(f"{name}={value}: must be positive (or None)")
    if self.temperature <= 0:
      raise UserError(f"TEMPERATURE={self.temperature} must be positive")
    if self.kl_target is not None and self.kl_target <= 0:
      raise UserError(f"KL_TARGET={self.kl_target} must be positive (or None: fixed KL_COEF)")
    return self


class Algorithm(abc.ABC):
  """What an RL algorithm gives the learner (lmtrain/rl/learner.py); the rollout, the old
  log-probs, the minibatch schedule and the clipped policy loss are shared.

  uses_value: whether it trains a value model (the learner computes the old values then).
  validate(cfg): UserError on settings it cannot run with.
  samples_per_prompt(cfg): responses sampled per prompt (contiguous rows of the batch).
  score_features(cfg, batch): per-row arrays computed from the scores before the rows are
    shuffled (e.g. GRPO's group advantages), merged into the batch.
  advantages(cfg, batch, kl_coef): (advantages [B, N], returns [B, N] or None, per-token KL
    [B, N]) of the rollout batch, which holds its old log-probs (and values); without a value
    model the batch may lack the log-probs (learner.on_policy), and the KL is then None.
  loss(cfg, params, graphdefs, mb, logp, kl_coef): (its terms added to the policy loss, their
    metrics) on a minibatch; `logp` are the policy's current log-probs.
  """
  name = ""
  uses_value = False

  def validate(self, cfg: RLConfig):
    del cfg

  def samples_per_prompt(self, cfg: RLConfig) -> int:
    del cfg
    return 1

  def score_features(self, cfg: RLConfig, batch) -> dict:
    del cfg, batch
    return {}

  @abc.abstractmethod
  def advantages(self, cfg: RLConfig, batch, kl_coef):
    ...

  @abc.abstractmethod
  def loss(self, cfg: RLConfig, params, graphdefs: Graphdefs, mb, logp, kl_coef):
    ...
