"""GRPO (Shao et al. 2024) and its critic-free relatives: GROUP_SIZE responses per prompt, the group's
scores turned into one advantage per response (ADVANTAGE_ESTIMATOR: grpo's (s - mean) / std,
dr_grpo, rloo or reinforce_baseline; lmtrain.rl.core.group_advantages) given to every one of its
tokens (a group of equal scores gives exactly 0, so no gradient); no value model; KL_COEF x KL(k3)
to the reference joins the loss instead of the reward, aggregated like the policy loss."""

from lmtrain.errors import UserError
from lmtrain.rl import core
from lmtrain.rl.config import Algorithm, RLConfig


class GRPO(Algorithm):
  name = "grpo"
  uses_value = False

  def validate(self, cfg: RLConfig):
    if cfg.group_size < 2:
      raise UserError(f"GROUP_SIZE={cfg.group_size}: GRPO needs at least 2 samples per prompt")
    if cfg.advantage_estimator not in (None, *core.GROUP_ESTIMATORS):
      raise UserError(f"ADVANTAGE_ESTIMATOR={cfg.advantage_estimator!r}: GRPO takes "
                      f"{', '.join(core.GROUP_ESTIMATORS)} (gae needs PPO's value model)")

  def samples_per_prompt(self, cfg: RLConfig) -> int:
    return cfg.group_size

  def score_features(self, cfg: RLConfig, batch) -> dict:
    # Groups are contiguous rows of the rollout: normalised before the learner shuffles them.
    return {"group_advantage": core.group_advantages(batch["score"], cfg.group_size,
                                                     cfg.advantage_estimator or "grpo")}

  def advantages(self, cfg: RLConfig, batch, kl_coef):
    del kl_coef  # the KL is in the loss
    mask = batch["mask"]
    adv = batch["group_advantage"][:, None] * mask
    if "logp" not in batch:  # learner.on_policy: the update's own pass measures the KL
      return adv, None, None
    kl = core.kl_penalty(batch["logp"], batch["ref_logp"], mask, cfg.kl_estimator)
    return adv, None, core.clip_kl(kl, cfg.kl_clip)

  def loss(self, cfg: RLConfig, params, graphdefs, mb, logp, kl_coef):
    del params, graphdefs
    kl = core.clip_kl(core.kl_penalty(logp, mb["ref_logp"], mb["mask"], "k3"), cfg.kl_clip)
    kl = core.weighted_sum(kl, mb["agg_weight"])
    return kl_coef * kl, {"kl_loss": kl}
