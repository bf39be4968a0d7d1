"""The math of preference learning and RLHF as small pure functions on [B, T] arrays.

Masks are float arrays, 1 on real (response) tokens. Every function is jit-able and has no Python
control flow on values.
"""

import jax
import jax.numpy as jnp


def last_token_index(mask):
  """[B] index of each row's last nonzero mask position (rows are right-padded)."""
  return jnp.maximum(jnp.sum(mask > 0, axis=-1).astype(jnp.int32) - 1, 0)


def gather_last(values, mask):
  """values [B, T, ...] read at each row's last real token: [B, ...]."""
  index = last_token_index(mask)
  return jnp.take_along_axis(values, index.reshape((-1,) + (1,) * (values.ndim - 1)), axis=1)[:, 0]


def sequence_logprobs(logits, tokens, mask, temperature: float = 1.0):
  """[B, T] log-probs of `tokens` under log_softmax(logits / temperature), 0 where mask is 0.
  logits[:, t] predicts tokens[:, t]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  picked = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
  return picked * mask


def pairwise_reward_loss(r_chosen, r_rejected, margin=None):
  """Bradley-Terry loss mean(-log sigmoid(rc - rr - margin)) and its metrics (means over pairs)."""
  diff = r_chosen - r_rejected
  target = diff if margin is None else diff - margin
  loss = -jnp.mean(jax.nn.log_sigmoid(target))
  metrics = {"accuracy": jnp.mean((diff > 0).astype(jnp.float32)), "margin": jnp.mean(diff),
             "chosen_mean": jnp.mean(r_chosen), "rejected_mean": jnp.mean(r_rejected)}
  return loss, metrics


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1,
             label_smoothing: float = 0.0):
  """DPO on summed completion log-probs per pair [B]. Implicit rewards are beta * (policy - ref);
  with label smoothing ls the labels are flipped with probability ls (conservative DPO). Accuracy
  counts chosen_reward > rejected_reward, so a tie (e.g. at initialisation) counts 0."""
  chosen_reward = beta * (policy_chosen - ref_chosen)
  rejected_reward = beta * (policy_rejected - ref_rejected)
  logits = chosen_reward - rejected_reward
  losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits)
            - label_smoothing * jax.nn.log_sigmoid(-logits))
  metrics = {"reward_accuracy": jnp.mean((logits > 0).astype(jnp.float32)),
             "chosen_reward": jnp.mean(chosen_reward), "rejected_reward": jnp.mean(rejected_reward),
             "margin": jnp.mean(logits)}
  return jnp.mean(losses), metrics
