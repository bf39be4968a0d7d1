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

# Written by the reward stage beside its checkpoint: the offset and scale that give its held-out
# responses' rewards mean 0 and std 1; read by PPO/GRPO and copied by the converters.
NORMALIZATION_FILE = "reward_normalization.json"


def one_model(saved: dict, wanted: dict):
  """(params of one model, the role they are under or None) in a checkpoint's `saved` params: its
  policy when it holds several models and `wanted` (the params asked for) is one model."""
  if POLICY in saved and POLICY not in wanted:
    return saved[POLICY], POLICY
  return saved, None
