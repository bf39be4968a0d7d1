"""PPO (Ouyang et al. 2022's RLHF recipe): a value model, per-token rewards -kl_coef * KL_t plus the
sequence's score at its last token, GAE, (whitened) advantages, and a clipped value loss beside the
clipped policy loss."""

from lmtrain.errors import UserError
from lmtrain.model import transformer
from lmtrain.rl import core
from lmtrain.rl.config import Algorithm, RLConfig
from lmtrain.rl.rollout import response_values
from lmtrain.train import roles


class PPO(Algorithm):
  name = "ppo"
  uses_value = True

  def validate(self, cfg: RLConfig):
    if cfg.advantage_estimator not in (None, "gae"):
      raise UserError(f"ADVANTAGE_ESTIMATOR={cfg.advantage_estimator!r}: PPO uses gae (its value "
                      "model); the critic-free estimators are GRPO's (`lmtrain grpo`)")

  def advantages(self, cfg: RLConfig, batch, kl_coef):
    mask = batch["mask"]
    kl = core.clip_kl(core.kl_penalty(batch["logp"], batch["ref_logp"], mask, cfg.kl_estimator),
                      cfg.kl_clip)
    rewards = core.per_token_rewards(batch["score"], kl, mask, kl_coef)
    adv, returns = core.gae(rewards, batch["values"], mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
      adv = core.masked_whiten(adv, mask)
    return adv, returns, kl

  def loss(self, cfg: RLConfig, params, graphdefs, mb, logp, kl_coef):
    del logp, kl_coef  # the KL is in the rewards
    value = transformer.merge(graphdefs.value, params[roles.VALUE])
    values = response_values(value, mb["prompt"], mb["prompt_length"], mb["response"], mb["mask"])
    value_loss, metrics = core.ppo_value_loss(values, mb["values"], mb["returns"], mb["mask"],
                                              cfg.value_clip_eps, mb["token_weight"])
    return cfg.vf_coef * value_loss, {**metrics, "value_loss": value_loss}
