"""The math of preference learning and RLHF as small pure functions on [B, T] arrays.

Conventions: arrays are [B, T] over response tokens; `mask` is a float [B, T] array, 1 on real
tokens up to and including EOS, 0 on padding. Rows may be ragged and the mask need not be
contiguous: padding is skipped, never treated as a zero-reward time step. Every function is jit-able
(strings and Python bools are static options) and has no Python control flow on values. Outputs are
0 where the mask is 0, and padding may hold anything (even inf) without leaking into a result.
"""

import jax
import jax.numpy as jnp

from lmtrain import losses


def masked_sum(x, mask, axis=None, keepdims=False):
  """Sum of x over valid tokens; `where` (not x * mask) so inf/NaN on padding cannot leak."""
  return jnp.sum(jnp.where(mask > 0, x * mask, 0.0), axis=axis, keepdims=keepdims)


def masked_mean(x, mask, axis=None, keepdims=False):
  """Mean of x over valid tokens (0 when there are none)."""
  count = jnp.sum(mask, axis=axis, keepdims=keepdims)
  return masked_sum(x, mask, axis, keepdims) / jnp.maximum(count, 1e-8)


def weighted_sum(x, weights):
  """sum(x * weights) over positions with weight > 0 (padding, even inf/NaN, cannot leak)."""
  return jnp.sum(jnp.where(weights > 0, x * weights, 0.0))


AGGREGATIONS = ("token", "sequence", "dr_grpo")


def aggregation_weights(mask, mode: str = "token"):
  """[B, T] weights w such that weighted_sum(x, w) aggregates a per-token x over the batch:

  token: every valid token counts the same (the masked mean over all tokens);
  sequence: every sequence counts the same (each row's masked mean, averaged over rows);
  dr_grpo: a constant 1 / (B * T), T the generation budget: the token sum without any length
    normalisation (Liu et al. 2025, "Dr. GRPO").

  Computed once on a whole minibatch, the weights make the sum over any split of its rows
  (microbatches) equal to the minibatch's aggregate."""
  mask = (mask > 0).astype(jnp.float32)
  if mode == "token":
    return mask / jnp.maximum(jnp.sum(mask), 1e-8)
  if mode == "sequence":
    return mask / jnp.maximum(jnp.sum(mask, axis=1, keepdims=True), 1e-8) / mask.shape[0]
  if mode == "dr_grpo":
    return mask / (mask.shape[0] * mask.shape[1])
  raise ValueError(f"unknown loss aggregation {mode!r}: expected {', '.join(AGGREGATIONS)}")


def masked_var(x, mask, axis=None, keepdims=False):
  """Population variance (no Bessel correction) of x over valid tokens."""
  mean = masked_mean(x, mask, axis, keepdims=True)
  return masked_mean(jnp.square(x - mean), mask, axis, keepdims)


def masked_whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8):
  """x scaled to std 1 over valid tokens, and shifted to mean 0 unless `shift_mean` is False (then
  the mean is kept, as for rewards whose sign carries meaning); 0 on padding."""
  mean = masked_mean(x, mask)
  whitened = (x - mean) * jax.lax.rsqrt(masked_var(x, mask) + eps)
  if not shift_mean:
    whitened = whitened + mean
  return jnp.where(mask > 0, whitened, 0.0)


def last_token_index(mask):
  """[B] index of each row's last nonzero mask position (its EOS, or the last token if truncated);
  0 for a row with no real token."""
  positions = jnp.arange(mask.shape[-1], dtype=jnp.int32)
  return jnp.max(jnp.where(mask > 0, positions, 0), axis=-1)


def gather_last(values, mask):
  """values [B, T, ...] read at each row's last real token: [B, ...]. Tokens after it change
  nothing."""
  return values[jnp.arange(values.shape[0]), last_token_index(mask)]


def reward_scores(model, tokens, positions, segment_ids, response_mask, dropout_rng=None,
                  hidden=None):
  """[B] a reward model's score of each sequence: its scalar head at the last real token (the
  EOS), plus, for a model with `lm_score`, its learned weight times the mean log-prob of the
  response tokens (response_mask [B, T], EOS included) under the trunk's own LM head.
  `dropout_rng`: a training step's key for the adapters' dropout (Transformer.hidden).
  `hidden`: the model's final hidden states of the rows [B, T, D] when the caller has them."""
  if hidden is None:
    hidden = model.hidden(tokens, positions, segment_ids, dropout_rng)
  score = gather_last(model.scores(hidden), (segment_ids > 0).astype(jnp.float32))
  if model.cfg.lm_score:
    mask = response_mask[:, 1:].astype(jnp.float32)
    logprobs, _ = token_logprobs(model, hidden[:, :-1], tokens[:, 1:], mask)
    mean = logprobs.sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
    score = score + model.lm_score_weight[...] * mean
  return score


def sequence_logprobs(logits, tokens, mask, temperature: float = 1.0):
  """[B, T] log-probs of `tokens` under log_softmax(logits / temperature), 0 where mask is 0.

  logits [B, T, V] are aligned so logits[:, t] predicts tokens[:, t]. Dividing by the sampling
  temperature makes these the log-probs of the distribution the rollout actually sampled from.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  picked = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
  return jnp.where(mask > 0, picked, 0.0)


def entropy(logits, mask, temperature: float = 1.0):
  """[B, T] entropy of softmax(logits / temperature) at each valid token, 0 on padding."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.where(mask > 0, -jnp.sum(jnp.exp(logp) * logp, axis=-1), 0.0)


def token_logprobs(model, hidden, tokens, mask, temperature: float = 1.0,
                   with_entropy: bool = False):
  """([B, T] log-probs of `tokens`, [B, T] entropies or None) under softmax(model.logits(hidden)
  / temperature), 0 where mask is 0; hidden[:, t] predicts tokens[:, t].

  With the model's logits_chunk, the vocabulary projection runs that many positions at a time in
  a scan whose body is rematerialised (jax.checkpoint), so forward and backward hold one
  [B, chunk, vocab] block of logits, never [B, T, vocab]."""
  def block(h, y, m):
    logits = model.logits(h)
    ent = entropy(logits, m, temperature) if with_entropy else jnp.zeros(y.shape, jnp.float32)
    return sequence_logprobs(logits, y, m, temperature), ent

  chunk = model.cfg.logits_chunk
  if not chunk:
    logp, ent = block(hidden, tokens, mask)
  else:
    body = jax.checkpoint(lambda carry, xs: (carry, block(*xs)))
    _, (logp, ent) = jax.lax.scan(body, None, (losses.position_blocks(hidden, chunk),
                                               losses.position_blocks(tokens, chunk),
                                               losses.position_blocks(mask, chunk)))
    length = tokens.shape[1]
    logp, ent = losses.unblock_positions(logp, length), losses.unblock_positions(ent, length)
  return logp, (ent if with_entropy else None)


def kl_penalty(logp, ref_logp, mask, kind: str = "k1"):
  """Per-token estimate of KL(policy || reference) from log-probs of tokens sampled by the policy.

  k1 = logp - ref (unbiased, can be negative); k2 = (logp - ref)^2 / 2; k3 = exp(ref - logp) - 1 -
  (ref - logp) (Schulman's unbiased, low-variance, non-negative estimator); abs = |logp - ref|.
  All are exactly 0 where logp == ref_logp; 0 on padding.
  """
  log_ratio = logp - ref_logp
  if kind == "k1":
    kl = log_ratio
  elif kind == "k2":
    kl = 0.5 * jnp.square(log_ratio)
  elif kind == "k3":
    kl = jnp.expm1(-log_ratio) + log_ratio  # expm1 keeps precision (and >= 0) for small ratios
  elif kind == "abs":
    kl = jnp.abs(log_ratio)
  else:
    raise ValueError(f"unknown KL estimator {kind!r}: expected k1, k2, k3 or abs")
  return jnp.where(mask > 0, kl, 0.0)


def clip_kl(kl, bound=None):
  """Per-token KL estimates clamped to [-bound, bound] (None: unchanged)."""
  return kl if bound is None else jnp.clip(kl, -bound, bound)


def per_token_rewards(score, kl, mask, kl_coef):
  """[B, T] PPO rewards: -kl_coef * kl_t at each valid token, plus the sequence `score` [B] at the
  last valid token; 0 on padding. Summed over t it is score - kl_coef * sum_t kl_t."""
  last = jax.nn.one_hot(last_token_index(mask), mask.shape[-1], dtype=jnp.float32)
  rewards = -kl_coef * kl + last * score[:, None]
  return jnp.where(mask > 0, rewards, 0.0)


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
  """Generalised advantage estimation over valid tokens: (advantages, returns), both [B, T].

  delta_t = r_t + gamma * V_next - V_t and A_t = delta_t + gamma * lam * A_next, where "next" is
  the next valid token of the row; after the last valid token V and A are 0. Padding is skipped
  (it carries the next token's V and A through unchanged) and gets 0. returns = A + V.
  """
  def step(carry, xs):
    next_value, next_adv = carry
    r, v, m = xs
    valid = m > 0
    adv = jnp.where(valid, r + gamma * next_value - v + gamma * lam * next_adv, 0.0)
    carry = (jnp.where(valid, v, next_value), jnp.where(valid, adv, next_adv))
    return carry, adv

  zeros = jnp.zeros(rewards.shape[:1], jnp.float32)
  xs = tuple(jnp.swapaxes(a.astype(jnp.float32), 0, 1) for a in (rewards, values, mask))
  _, adv = jax.lax.scan(step, (zeros, zeros), xs, reverse=True)
  advantages = jnp.swapaxes(adv, 0, 1)
  returns = jnp.where(mask > 0, advantages + values, 0.0)
  return advantages, returns


def ppo_policy_loss(logp, old_logp, advantages, mask, clip_eps: float = 0.2, weights=None):
  """Clipped surrogate max(-A * ratio, -A * clip(ratio, 1 +- eps)) aggregated over the tokens by
  `weights` (aggregation_weights; None: the masked mean over tokens).

  Metrics, aggregated the same way: `clipfrac`, the share where the clipped term is strictly
  larger (there the token gives no gradient); `approx_kl`, (logp - old_logp)^2 / 2 (the k2
  estimator of KL(old || new)); `ratio_mean`. With logp == old_logp (the first minibatch) the
  ratio is exactly 1, clipfrac and approx_kl 0.
  """
  weights = aggregation_weights(mask) if weights is None else weights
  log_ratio = jnp.where(mask > 0, logp - old_logp, 0.0)
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  loss = weighted_sum(jnp.maximum(unclipped, clipped), weights)
  metrics = {"clipfrac": weighted_sum((clipped > unclipped).astype(jnp.float32), weights),
             "approx_kl": weighted_sum(0.5 * jnp.square(log_ratio), weights),
             "ratio_mean": weighted_sum(ratio, weights)}
  return loss, metrics


def ppo_value_loss(values, old_values, returns, mask, clip_eps: float = 0.2, weights=None):
  """0.5 * max((v - R)^2, (clip(v, old +- eps) - R)^2) aggregated by `weights` (None: the masked
  mean over tokens); metric `value_clipfrac`, the share where the clipped term is strictly
  larger (no gradient there)."""
  weights = aggregation_weights(mask) if weights is None else weights
  clipped_values = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
  unclipped = jnp.square(values - returns)
  clipped = jnp.square(clipped_values - returns)
  loss = 0.5 * weighted_sum(jnp.maximum(unclipped, clipped), weights)
  return loss, {"value_clipfrac": weighted_sum((clipped > unclipped).astype(jnp.float32), weights)}


def explained_variance(values, returns, mask):
  """1 - Var(returns - values) / Var(returns) over valid tokens; 0 when the returns are constant
  (nothing to explain)."""
  var_returns = masked_var(returns, mask)
  ratio = masked_var(returns - values, mask) / jnp.maximum(var_returns, 1e-12)
  return jnp.where(var_returns > 0, 1.0 - ratio, 0.0)


def kl_controller_init(init_coef: float, target=None, horizon: float = 10000.0):
  """State of the KL coefficient controller (a dict of scalars, saved with the checkpoint).

  target None gives a fixed coefficient; otherwise Ziegler et al. (2019)'s adaptive controller
  steers the measured KL toward `target` over about `horizon` samples.
  """
  if target is not None and (target <= 0 or horizon <= 0):
    raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target}, {horizon}")
  return {"kl_coef": jnp.float32(init_coef), "target": jnp.float32(target or 0.0),
          "horizon": jnp.float32(horizon), "adaptive": jnp.bool_(target is not None)}


def kl_controller_update(state, current_kl, n_steps):
  """coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon (unchanged when fixed).

  n_steps counts the samples (sequences) the KL was measured on, as in Ziegler et al.
  """
  error = jnp.clip(current_kl / jnp.where(state["adaptive"], state["target"], 1.0) - 1.0, -0.2, 0.2)
  factor = 1.0 + jnp.where(state["adaptive"], error, 0.0) * n_steps / state["horizon"]
  return {**state, "kl_coef": (state["kl_coef"] * factor).astype(jnp.float32)}


def pairwise_reward_loss(r_chosen, r_rejected, margin=None):
  """Bradley-Terry loss mean(-log sigmoid(rc - rr - margin)) and its metrics (means over pairs):
  `accuracy` (rc > rr; ties count 0), `margin` (rc - rr), `chosen_mean`, `rejected_mean`."""
  diff = r_chosen - r_rejected
  target = diff if margin is None else diff - margin
  loss = -jnp.mean(jax.nn.log_sigmoid(target))
  metrics = {"accuracy": jnp.mean((diff > 0).astype(jnp.float32)), "margin": jnp.mean(diff),
             "chosen_mean": jnp.mean(r_chosen), "rejected_mean": jnp.mean(r_rejected)}
  return loss, metrics


def ranking_reward_loss(scores, ranks, valid, margin=None):
  """InstructGPT's reward loss on rankings: (loss, metrics) for scores, ranks and valid [B, K]
  (one ranking of up to K responses a row; rank 1 is the best, equal ranks a tie; valid 0 marks
  a padding response) and margin [B] or None.

  Every ordered pair (i better than j: rank_i < rank_j, both valid) of a row costs
  -log sigmoid(s_i - s_j - margin); a row's loss is the mean over its pairs and `loss` the mean
  over the rows that have one, so a ranking is one example however many pairs it holds (they
  share its responses, and counting each pair as an example overfits). Tied and padding pairs
  contribute nothing. Metrics are means over all the batch's pairs: `accuracy` (s_i > s_j),
  `margin` (s_i - s_j), `chosen_mean` and `rejected_mean` (s_i and s_j); and the counts `pairs`
  and `rankings` (rows with a pair) that those means and `loss` divide by. A pair of responses
  is a K = 2 ranking: then loss and metrics are pairwise_reward_loss's."""
  valid = valid > 0
  scores = jnp.where(valid, scores, 0.0)  # a padding response's score, even inf, cannot leak
  better = (valid[:, :, None] & valid[:, None, :]
            & (ranks[:, :, None] < ranks[:, None, :])).astype(jnp.float32)  # [B, K, K]: i beats j
  diff = scores[:, :, None] - scores[:, None, :]
  target = diff if margin is None else diff - margin[:, None, None]
  row_pairs = jnp.sum(better, axis=(1, 2))
  row_loss = masked_sum(-jax.nn.log_sigmoid(target), better, axis=(1, 2)) / jnp.maximum(
      row_pairs, 1.0)
  rankings = jnp.sum((row_pairs > 0).astype(jnp.float32))
  pairs = jnp.sum(row_pairs)

  def pair_mean(x):
    return masked_sum(x, better) / jnp.maximum(pairs, 1.0)

  metrics = {"accuracy": pair_mean((diff > 0).astype(jnp.float32)), "margin": pair_mean(diff),
             "chosen_mean": pair_mean(jnp.broadcast_to(scores[:, :, None], diff.shape)),
             "rejected_mean": pair_mean(jnp.broadcast_to(scores[:, None, :], diff.shape)),
             "pairs": pairs, "rankings": rankings}
  return jnp.sum(row_loss) / jnp.maximum(rankings, 1.0), metrics


def dpo_loss(policy_chosen_logp, policy_rejected_logp, ref_chosen_logp, ref_rejected_logp,
             beta: float = 0.1, label_smoothing: float = 0.0):
  """DPO on summed completion log-probs per pair [B] -> (mean loss, metrics).

  Implicit rewards are beta * (policy - ref) and h = chosen_reward - rejected_reward; the loss is
  (1 - ls) * -log sigmoid(h) + ls * -log sigmoid(-h) (conservative DPO: labels flipped with
  probability ls). `reward_accuracy` counts chosen_reward > rejected_reward, so a tie (as at
  initialisation, where policy == reference and the loss is ln 2) counts 0.
  """
  chosen_reward = beta * (policy_chosen_logp - ref_chosen_logp)
  rejected_reward = beta * (policy_rejected_logp - ref_rejected_logp)
  logits = chosen_reward - rejected_reward
  losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits)
            - label_smoothing * jax.nn.log_sigmoid(-logits))
  metrics = {"reward_accuracy": jnp.mean((logits > 0).astype(jnp.float32)),
             "chosen_reward": jnp.mean(chosen_reward), "rejected_reward": jnp.mean(rejected_reward),
             "margin": jnp.mean(logits)}
  return jnp.mean(losses), metrics


GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_baseline")


def group_advantages(scores, group_size: int, estimator: str = "grpo", eps: float = 1e-6):
  """Critic-free advantages [B] for scores [B] in contiguous groups of `group_size` (the samples
  of one prompt), by `estimator`:

  grpo: (s - group mean) / (group std + eps), population std (Shao et al. 2024);
  dr_grpo: s - group mean, no std normalisation (Liu et al. 2025);
  rloo: s minus the mean of the group's other samples, i.e. K / (K - 1) x (s - group mean)
    (Ahmadian et al. 2024's leave-one-out baseline);
  reinforce_baseline: s - group mean, then divided by the std of those over the whole batch
    (REINFORCE++ with a group baseline: batch-level, not per-group, normalisation).

  A group of equal scores gets exactly 0 (s - mean can be a rounding error away from 0, which eps
  would not cancel), so it gives no gradient."""
  groups = scores.astype(jnp.float32).reshape(-1, group_size)
  centered = groups - jnp.mean(groups, axis=-1, keepdims=True)
  if estimator == "grpo":
    out = centered / (jnp.std(groups, axis=-1, keepdims=True) + eps)
  elif estimator == "dr_grpo":
    out = centered
  elif estimator == "rloo":
    out = centered * (group_size / (group_size - 1))
  elif estimator == "reinforce_baseline":
    out = centered / (jnp.std(centered) + eps)
  else:
    raise ValueError(f"unknown estimator {estimator!r}: expected {', '.join(GROUP_ESTIMATORS)}")
  spread = jnp.max(groups, axis=-1, keepdims=True) - jnp.min(groups, axis=-1, keepdims=True)
  return jnp.where(spread > 0, out, 0.0).reshape(scores.shape)
