"""The named models of a stage, spelled once.

A one-model stage trains its params directly. The RL stages train `{POLICY, VALUE}` and hold the
frozen models as TrainState extras: REFERENCE (the starting policy, also DPO's), REWARD (the reward
model) and the KL controller's state. A checkpoint of several models serves a one-model child by its
policy (e.g. SFT again from a PPO run).
"""

POLICY = "policy"
VALUE = "value"
REFERENCE = "reference"
REWARD = "reward"
KL_CONTROLLER = "kl_ctl"
# The extras that are frozen copies of a parent's model.
FROZEN_COPIES = (REFERENCE, REWARD)

# Written by the reward stage beside its checkpoint: the offset and scale that give its held-out
# responses' rewards mean 0 and std 1; read by PPO/GRPO and copied by the converters.
NORMALIZATION_FILE = "reward_normalization.json"

# A reward model below this held-out pairwise accuracy ranks responses at about chance (0.5).
CHANCE_ACCURACY = 0.55
# Below this std of its scores, it gives every response (nearly) the same score.
MIN_REWARD_SCALE = 1e-3


def degenerate_reward(norm: dict) -> str | None:
  """Why a reward model (its normalisation record) cannot rank rollouts, or None."""
  accuracy = norm.get("eval_accuracy")
  if accuracy is not None and accuracy < CHANCE_ACCURACY:
    return (f"held-out accuracy {accuracy:.3f} is at chance (under {CHANCE_ACCURACY}): it cannot "
            f"tell the chosen responses from the rejected ones")
  if not norm["scale"] >= MIN_REWARD_SCALE:
    return (f"its scores' std {norm['scale']:.3g} is under {MIN_REWARD_SCALE:g}: it scores every "
            f"response alike")
  return None


def one_model(saved: dict, wanted: dict):
  """(params of one model, the role they are under or None) in a checkpoint's `saved` params: its
  policy when it holds several models and `wanted` (the params asked for) is one model."""
  if POLICY in saved and POLICY not in wanted:
    return saved[POLICY], POLICY
  return saved, None
