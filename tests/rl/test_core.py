"""RLHF maths of lmtrain.rl.core against hand computations and plain NumPy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmtrain.rl import core as rl


def ragged_mask(rng, batch, length):
  """Right-padded rows of random lengths 1..length (one full row)."""
  lengths = rng.integers(1, length + 1, batch)
  lengths[0] = length
  return (np.arange(length)[None] < lengths[:, None]).astype(np.float32)


def gae_reference(rewards, values, mask, gamma, lam):
  """Plain GAE on each row's valid tokens only, scattered back; 0 on padding."""
  advantages = np.zeros_like(rewards)
  for b in range(rewards.shape[0]):
    idx = np.flatnonzero(mask[b])
    next_value = next_adv = 0.0
    for t in reversed(idx):
      delta = rewards[b, t] + gamma * next_value - values[b, t]
      next_adv = delta + gamma * lam * next_adv
      next_value = values[b, t]
      advantages[b, t] = next_adv
  return advantages, (advantages + values) * mask


def test_masked_statistics_and_whitening():
  rng = np.random.default_rng(0)
  x = rng.normal(3.0, 5.0, (4, 9)).astype(np.float32)
  mask = ragged_mask(rng, 4, 9)
  x_padded = np.where(mask > 0, x, np.inf).astype(np.float32)  # padding must not leak
  valid = x[mask > 0]
  np.testing.assert_allclose(rl.masked_mean(x_padded, mask), valid.mean(), rtol=1e-5)
  np.testing.assert_allclose(rl.masked_var(x_padded, mask), valid.var(), rtol=1e-4)
  row_means = [x[b, mask[b] > 0].mean() for b in range(4)]
  np.testing.assert_allclose(rl.masked_mean(x_padded, mask, axis=1), row_means, rtol=1e-5)
  white = np.asarray(rl.masked_whiten(x_padded, mask))
  np.testing.assert_allclose(white[mask > 0].mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(white[mask > 0].std(), 1.0, rtol=1e-4)
  np.testing.assert_array_equal(white[mask == 0], 0.0)
  kept = np.asarray(rl.masked_whiten(x, mask, shift_mean=False))
  np.testing.assert_allclose(kept[mask > 0].mean(), valid.mean(), rtol=1e-4)
  np.testing.assert_allclose(kept[mask > 0].std(), 1.0, rtol=1e-4)


def test_sequence_logprobs_and_entropy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  tokens = rng.integers(0, 7, (2, 5))
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)
  for temperature in (1.0, 0.7):
    z = logits / temperature
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    expected = np.take_along_axis(logp, tokens[..., None], -1)[..., 0] * mask
    got = rl.sequence_logprobs(logits, tokens, mask, temperature)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    ent = rl.entropy(logits, mask, temperature)
    np.testing.assert_allclose(ent, -(np.exp(logp) * logp).sum(-1) * mask, rtol=1e-5, atol=1e-6)


def test_kl_estimators():
  rng = np.random.default_rng(2)
  logp = rng.normal(-2.0, 1.0, (3, 6)).astype(np.float32)
  ref = rng.normal(-2.0, 1.0, (3, 6)).astype(np.float32)
  mask = ragged_mask(rng, 3, 6)
  for kind in ("k1", "k2", "k3", "abs"):
    np.testing.assert_array_equal(rl.kl_penalty(logp, logp, mask, kind), 0.0)
    assert not np.any(np.asarray(rl.kl_penalty(logp, ref, mask, kind))[mask == 0])
  d = ref - logp
  np.testing.assert_allclose(rl.kl_penalty(logp, ref, mask, "k1"), -d * mask, rtol=1e-6)
  k3 = np.asarray(rl.kl_penalty(logp, ref, mask, "k3"))
  np.testing.assert_allclose(k3, (np.exp(d) - 1 - d) * mask, rtol=1e-5, atol=1e-6)
  assert np.all(k3 >= 0)
  with pytest.raises(ValueError, match="k4"):
    rl.kl_penalty(logp, ref, mask, "k4")


def test_per_token_rewards_hand_case():
  kl = np.array([[0.1, 0.2, 0.3, 9.0], [0.5, -0.5, 0.0, 0.0]], np.float32)
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.float32)
  rewards = rl.per_token_rewards(np.array([2.0, -1.0], np.float32), kl, mask, 0.1)
  np.testing.assert_allclose(rewards, [[-0.01, -0.02, 2.0 - 0.03, 0.0],
                                       [-0.05, 0.05, 0.0, -1.0]], rtol=1e-6)


def test_per_token_rewards_sum_and_padding():
  rng = np.random.default_rng(3)
  kl = rng.normal(size=(6, 10)).astype(np.float32)
  mask = ragged_mask(rng, 6, 10)
  mask[1] = 0.0
  mask[1, 2:5] = 1.0  # holes: the score still lands on the last valid token
  score = rng.normal(size=6).astype(np.float32)
  rewards = np.asarray(rl.per_token_rewards(score, kl, mask, 0.05))
  np.testing.assert_allclose(rewards.sum(1), score - 0.05 * (kl * mask).sum(1), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(rewards[mask == 0], 0.0)
  assert rewards[1, 4] == pytest.approx(score[1] - 0.05 * kl[1, 4], rel=1e-6)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.9, 1.0), (1.0, 0.0)])
def test_gae_matches_reference(gamma, lam):
  rng = np.random.default_rng(4)
  rewards = rng.normal(size=(8, 12)).astype(np.float32)
  values = rng.normal(size=(8, 12)).astype(np.float32)
  masks = [ragged_mask(rng, 8, 12), (rng.random((8, 12)) < 0.6).astype(np.float32)]
  gae = jax.jit(rl.gae, static_argnames=("gamma", "lam"))
  for mask in masks:
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = gae_reference(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(advantages, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(returns, ref_ret, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(advantages)[mask == 0], 0.0)


def test_gae_undiscounted_is_reward_to_go():
  rng = np.random.default_rng(5)
  rewards = rng.normal(size=(5, 7)).astype(np.float32)
  values = rng.normal(size=(5, 7)).astype(np.float32)
  mask = ragged_mask(rng, 5, 7)
  to_go = np.flip(np.cumsum(np.flip(rewards * mask, 1), 1), 1) * mask
  advantages, returns = rl.gae(rewards, values, mask, gamma=1.0, lam=1.0)
  np.testing.assert_allclose(returns, to_go, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(advantages, (to_go - values) * mask, rtol=1e-5, atol=1e-5)


def test_policy_loss_gradient_vanishes_only_where_clipped():
  adv = np.array([[1.0, 1.0, -1.0, -1.0, 1.0, -1.0]], np.float32)
  ratio = np.array([[1.5, 0.9, 0.5, 1.1, 0.5, 1.5]], np.float32)
  old = np.full_like(adv, -1.0)
  logp = old + np.log(ratio)
  mask = np.ones_like(adv)
  grad = np.asarray(jax.grad(lambda lp: rl.ppo_policy_loss(lp, old, adv, mask)[0])(logp))
  # A > 0 with ratio > 1 + eps and A < 0 with ratio < 1 - eps: clipped, no gradient.
  assert grad[0, 0] == 0.0 and grad[0, 2] == 0.0
  # Inside the trust region, or clipped against the advantage's direction: -A * ratio / n.
  np.testing.assert_allclose(grad[0, [1, 3, 4, 5]], -(adv * ratio)[0, [1, 3, 4, 5]] / 6, rtol=1e-6)
  _, metrics = rl.ppo_policy_loss(logp, old, adv, mask)
  assert float(metrics["clipfrac"]) == pytest.approx(2 / 6)


def test_policy_loss_on_the_first_minibatch():
  rng = np.random.default_rng(6)
  logp = rng.normal(-2.0, 1.0, (4, 8)).astype(np.float32)
  adv = rng.normal(size=(4, 8)).astype(np.float32)
  mask = ragged_mask(rng, 4, 8)
  loss, metrics = rl.ppo_policy_loss(logp, logp, adv, mask)
  assert float(metrics["ratio_mean"]) == 1.0
  assert float(metrics["clipfrac"]) == 0.0
  assert float(metrics["approx_kl"]) == 0.0
  np.testing.assert_allclose(loss, -rl.masked_mean(adv, mask), rtol=1e-6)


def test_value_loss_clipping():
  old = np.zeros((1, 4), np.float32)
  values = np.array([[0.5, 0.5, 0.1, -0.5]], np.float32)
  returns = np.array([[1.0, 0.0, 0.3, 0.0]], np.float32)
  mask = np.ones_like(old)
  loss_fn = lambda v: rl.ppo_value_loss(v, old, returns, mask, clip_eps=0.2)
  # Token 0: clipped value 0.2 is further from R=1, so the clipped branch is the max: no gradient.
  # Token 1: value moved past R, the unclipped error is larger. Token 2: inside the clip range.
  # Token 3: clipped (-0.2) is closer to R=0 than -0.5, the unclipped branch is the max.
  grad = np.asarray(jax.grad(lambda v: loss_fn(v)[0])(values))
  assert grad[0, 0] == 0.0
  np.testing.assert_allclose(grad[0, 1:], (values - returns)[0, 1:] / 4, rtol=1e-6)
  loss, metrics = loss_fn(values)
  hand = 0.5 * np.mean([0.8 ** 2, 0.5 ** 2, 0.2 ** 2, 0.5 ** 2])
  assert float(loss) == pytest.approx(hand, rel=1e-6)
  assert float(metrics["value_clipfrac"]) == pytest.approx(0.25)


def test_explained_variance():
  rng = np.random.default_rng(7)
  returns = rng.normal(size=(3, 6)).astype(np.float32)
  mask = ragged_mask(rng, 3, 6)
  assert float(rl.explained_variance(returns, returns, mask)) == pytest.approx(1.0)
  mean = float(rl.masked_mean(returns, mask))
  assert float(rl.explained_variance(np.full_like(returns, mean), returns, mask)) == (
      pytest.approx(0.0, abs=1e-5))
  noisy = returns + rng.normal(size=returns.shape).astype(np.float32)
  valid = mask > 0
  expected = 1 - (returns - noisy)[valid].var() / returns[valid].var()
  assert float(rl.explained_variance(noisy, returns, mask)) == pytest.approx(expected, rel=1e-4)


def test_adaptive_kl_controller():
  state = rl.kl_controller_init(0.1, target=6.0, horizon=10000)
  up = rl.kl_controller_update(state, 7.0, 256)
  down = rl.kl_controller_update(state, 5.0, 256)
  assert float(up["kl_coef"]) > 0.1 > float(down["kl_coef"])  # errors +-1/6, inside the clip
  assert float(up["kl_coef"]) == pytest.approx(0.1 * (1 + (7 / 6 - 1) * 256 / 10000), rel=1e-6)
  huge = jax.jit(rl.kl_controller_update)(state, 1e6, 256)
  assert float(huge["kl_coef"]) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000), rel=1e-6)
  tiny = rl.kl_controller_update(state, 0.0, 256)
  assert float(tiny["kl_coef"]) == pytest.approx(0.1 * (1 - 0.2 * 256 / 10000), rel=1e-6)
  fixed = rl.kl_controller_init(0.1)
  assert float(rl.kl_controller_update(fixed, 1e6, 256)["kl_coef"]) == pytest.approx(0.1)
  with pytest.raises(ValueError):
    rl.kl_controller_init(0.1, target=0.0)


def test_dpo_loss():
  rng = np.random.default_rng(8)
  pc, pr = (rng.normal(-30.0, 5.0, 6).astype(np.float32) for _ in range(2))
  loss, metrics = rl.dpo_loss(pc, pr, pc, pr, beta=0.1)
  assert float(loss) == pytest.approx(math.log(2), rel=1e-6)
  # Ties count 0: at initialisation no pair is ranked correctly yet.
  assert float(metrics["reward_accuracy"]) == 0.0
  assert float(metrics["margin"]) == 0.0
  rc, rr = pc - rng.normal(size=6).astype(np.float32), pr - rng.normal(size=6).astype(np.float32)
  beta, ls = 0.5, 0.1
  loss, metrics = rl.dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=ls)
  h = beta * ((pc - rc) - (pr - rr)).astype(np.float64)
  log_sig = lambda z: -np.log1p(np.exp(-z))
  hand = np.mean((1 - ls) * -log_sig(h) + ls * -log_sig(-h))
  assert float(loss) == pytest.approx(hand, rel=1e-5)
  assert float(metrics["chosen_reward"]) == pytest.approx(np.mean(beta * (pc - rc)), rel=1e-5)
  assert float(metrics["rejected_reward"]) == pytest.approx(np.mean(beta * (pr - rr)), rel=1e-5)
  assert float(metrics["reward_accuracy"]) == pytest.approx(np.mean(h > 0))


def test_group_advantages():
  scores = np.array([1.0, 0.0, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1, 3.0, -1.0, 2.0, 0.0], np.float32)
  adv = np.asarray(rl.group_advantages(scores, 4)).reshape(3, 4)
  np.testing.assert_allclose(adv.mean(1), 0.0, atol=1e-6)
  np.testing.assert_array_equal(adv[1], 0.0)  # equal scores, exactly
  groups = scores.reshape(3, 4)
  np.testing.assert_allclose(adv[2], (groups[2] - groups[2].mean()) / (groups[2].std() + 1e-6),
                             rtol=1e-5)
  mask = np.ones((12, 5), np.float32)
  logp = np.full((12, 5), -1.0, np.float32)
  flat = rl.group_advantages(scores, 4)
  grad = jax.grad(lambda lp: jnp.sum(-flat[:, None] * lp * mask))(logp)
  np.testing.assert_array_equal(np.asarray(grad)[4:8], 0.0)
  assert np.all(np.asarray(grad)[[0, 1, 8, 9]] != 0.0)


def test_pairwise_reward_loss():
  rc = np.array([1.0, -0.5, 2.0, 0.3], np.float32)
  rr = np.array([0.0, 0.5, 2.0, -1.0], np.float32)
  margin = np.array([0.0, 0.2, 0.5, 1.0], np.float32)
  loss, metrics = rl.pairwise_reward_loss(rc, rr, margin)
  hand = np.mean(np.log1p(np.exp(-(rc - rr - margin))))
  assert float(loss) == pytest.approx(hand, rel=1e-6)
  assert float(rl.pairwise_reward_loss(rc, rr)[0]) == pytest.approx(
      np.mean(np.log1p(np.exp(-(rc - rr)))), rel=1e-6)
  assert float(metrics["accuracy"]) == 0.5  # the tie in pair 2 counts 0
  assert float(metrics["margin"]) == pytest.approx(np.mean(rc - rr))
  assert float(metrics["chosen_mean"]) == pytest.approx(rc.mean())
  assert float(metrics["rejected_mean"]) == pytest.approx(rr.mean())


def ranking_reference(scores, ranks, valid, margin):
  """InstructGPT's loss one pair at a time in plain Python: each row's ordered pairs (both valid,
  i ranked better than j), the mean -log sigmoid(s_i - s_j - margin) over them, then the mean over
  the rows that have a pair. Also the accuracy over all pairs of the batch, the counts, and the
  mean over all pairs (as if each pair were an example)."""
  row_losses, pair_losses, right = [], [], []
  for b in range(scores.shape[0]):
    losses = []
    for i in range(scores.shape[1]):
      for j in range(scores.shape[1]):
        if valid[b, i] and valid[b, j] and ranks[b, i] < ranks[b, j]:
          losses.append(math.log1p(math.exp(-(scores[b, i] - scores[b, j] - margin[b]))))
          right.append(scores[b, i] > scores[b, j])
    if losses:
      row_losses.append(sum(losses) / len(losses))
    pair_losses += losses
  return {"loss": sum(row_losses) / len(row_losses), "accuracy": sum(right) / len(right),
          "pairs": len(right), "rankings": len(row_losses),
          "pooled": sum(pair_losses) / len(pair_losses)}


def ranking_batch():
  """Rankings of 4 (dense ranks), of 3 with a tie and a padding response, a pair with its margin,
  a ranking with sparse ranks and a tie (ranks 1, 4, 4, 7), and a row of padding only."""
  scores = np.array([[0.5, -1.0, 2.0, 0.1], [1.0, 1.0, -0.3, 9.0], [0.2, -0.4, 0.0, 0.0],
                     [3.0, -2.0, 0.7, 1.5], [0.0, 0.0, 0.0, 0.0]], np.float32)
  # Padding's ranks are arbitrary too: only `valid` says which responses are real.
  ranks = np.array([[2, 4, 1, 3], [1, 1, 2, 5], [2, 3, 1, 9], [1, 4, 4, 7], [1, 2, 3, 4]],
                   np.int32)
  valid = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]],
                   np.float32)
  margin = np.array([0.0, 0.3, 1.0, 0.5, 2.0], np.float32)
  return scores, ranks, valid, margin


def test_ranking_reward_loss_is_the_mean_of_its_pairs_computed_one_at_a_time():
  scores, ranks, valid, margin = ranking_batch()
  # Padding may hold anything: its score must not leak.
  scores[1, 3], scores[4] = np.inf, np.nan
  loss, metrics = rl.ranking_reward_loss(scores, ranks, valid, margin)
  hand = ranking_reference(np.nan_to_num(scores), ranks, valid, margin)
  assert (hand["pairs"], hand["rankings"]) == (6 + 2 + 1 + 5, 4)  # ties and padding: no pair
  assert float(loss) == pytest.approx(hand["loss"], rel=1e-6)
  assert float(metrics["accuracy"]) == pytest.approx(hand["accuracy"])
  assert (float(metrics["pairs"]), float(metrics["rankings"])) == (14, 4)
  # A ranking is one example, not its pairs each counted as one.
  assert float(loss) != pytest.approx(hand["pooled"], rel=1e-3)
  # A ranking of two is pairwise_reward_loss's pair.
  pair_loss, pair_metrics = rl.pairwise_reward_loss(scores[2, :1], scores[2, 1:2], margin[2:3])
  two, two_metrics = rl.ranking_reward_loss(scores[2:3], ranks[2:3], valid[2:3], margin[2:3])
  assert float(two) == pytest.approx(float(pair_loss), rel=1e-6)
  for key in pair_metrics:
    assert float(two_metrics[key]) == pytest.approx(float(pair_metrics[key]), rel=1e-6), key


def test_ranking_reward_loss_gradient_matches_finite_differences():
  scores, ranks, valid, margin = ranking_batch()
  grad = np.asarray(jax.grad(lambda s: rl.ranking_reward_loss(s, ranks, valid, margin)[0])(
      scores))
  eps = 1e-3
  for b, k in np.ndindex(*scores.shape):
    up, down = scores.astype(np.float64), scores.astype(np.float64)
    up[b, k] += eps
    down[b, k] -= eps
    numeric = (ranking_reference(up, ranks, valid, margin)["loss"]
               - ranking_reference(down, ranks, valid, margin)["loss"]) / (2 * eps)
    assert grad[b, k] == pytest.approx(numeric, abs=1e-4), (b, k)
  assert (grad[valid == 0] == 0).all() and (grad[1, :2] != 0).all()
  # Tied responses 1 and 2 of row 1 each beat response 3 only: the same gradient.
  assert grad[1, 0] == pytest.approx(grad[1, 1])


def test_gather_last_reads_the_eos_position():
  rng = np.random.default_rng(9)
  values = rng.normal(size=(3, 8, 2)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0, 0, 0, 0], [1] * 8, [1, 1, 1, 1, 1, 0, 0, 0]], np.float32)
  np.testing.assert_array_equal(rl.last_token_index(mask), [2, 7, 4])
  got = np.asarray(rl.gather_last(values, mask))
  np.testing.assert_array_equal(got, values[[0, 1, 2], [2, 7, 4]])
  changed = values.copy()
  changed[0, 3:] = 100.0
  changed[2, 5:] = -100.0
  np.testing.assert_array_equal(rl.gather_last(changed, mask), got)
  np.testing.assert_array_equal(rl.gather_last(values[..., 0], mask), got[:, 0])


def test_group_estimators_by_hand():
  # one group of 4 (mean 0.5), one group of 2 equal scores
  s = np.array([1.0, 0.0, 0.0, 1.0], np.float32)
  two = np.array([0.5, 0.5, 3.0, 3.0], np.float32)
  out = {e: np.asarray(rl.group_advantages(s, 4, e)) for e in rl.GROUP_ESTIMATORS}
  # population std of (1, 0, 0, 1) is 0.5
  np.testing.assert_allclose(out["grpo"], np.array([0.5, -0.5, -0.5, 0.5]) / (0.5 + 1e-6),
                             rtol=1e-6)
  np.testing.assert_allclose(out["dr_grpo"], [0.5, -0.5, -0.5, 0.5])
  # leave-one-out: 1 - mean(0, 0, 1) = 2/3; 0 - mean(1, 0, 1) = -2/3
  np.testing.assert_allclose(out["rloo"], [2 / 3, -2 / 3, -2 / 3, 2 / 3], rtol=1e-6)
  np.testing.assert_allclose(out["rloo"], [s[i] - np.delete(s, i).mean() for i in range(4)],
                             rtol=1e-6)
  # groups of 2: (1, 0) (0, 1) (0.5, 0.5) (3, 3) centred to (.5, -.5, -.5, .5, 0, 0, 0, 0), whose
  # std over the batch is sqrt(1 / 8): each nonzero advantage is +-0.5 * sqrt(8) = +-sqrt(2)
  batch = np.asarray(rl.group_advantages(np.concatenate([s, two]), 2, "reinforce_baseline"))
  np.testing.assert_allclose(batch, np.sqrt(2) * np.array([1, -1, -1, 1, 0, 0, 0, 0]), rtol=1e-5)
  for e in rl.GROUP_ESTIMATORS:  # equal scores: exactly 0
    np.testing.assert_array_equal(np.asarray(rl.group_advantages(two, 2, e)), 0.0)
  with pytest.raises(ValueError, match="unknown estimator 'gae'"):
    rl.group_advantages(s, 2, "gae")


def test_loss_aggregations_by_hand():
  mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], np.float32)  # lengths 3 and 1, budget T=4
  x = np.array([[1.0, 2.0, 3.0, np.inf], [10.0, np.nan, 0.0, 0.0]], np.float32)
  agg = lambda mode: float(rl.weighted_sum(x, rl.aggregation_weights(mask, mode)))
  assert agg("token") == pytest.approx((1 + 2 + 3 + 10) / 4)
  assert agg("sequence") == pytest.approx((2.0 + 10.0) / 2)
  assert agg("dr_grpo") == pytest.approx((1 + 2 + 3 + 10) / (2 * 4))
  # weights from the whole batch: the rows' sums add up to the batch's aggregate
  for mode in rl.AGGREGATIONS:
    w = rl.aggregation_weights(mask, mode)
    parts = sum(float(rl.weighted_sum(x[i:i + 1], w[i:i + 1])) for i in range(2))
    assert parts == pytest.approx(agg(mode))
  logp, old = np.log(np.full((2, 4), 0.5, np.float32)), np.log(np.full((2, 4), 0.25, np.float32))
  adv = np.ones((2, 4), np.float32)
  # ratio 2, clipped at 1.2 for a positive advantage: the loss is -1.2 on every token
  loss, metrics = rl.ppo_policy_loss(logp, old, adv, mask, 0.2,
                                     rl.aggregation_weights(mask, "dr_grpo"))
  assert float(loss) == pytest.approx(-1.2 * 4 / 8)
  assert float(metrics["clipfrac"]) == pytest.approx(4 / 8)


def test_kl_clip():
  kl = jnp.array([-3.0, 0.5, 7.0])
  np.testing.assert_array_equal(rl.clip_kl(kl, 2.0), [-2.0, 0.5, 2.0])
  assert rl.clip_kl(kl, None) is kl


def test_a_degenerate_reward_model_is_refused_unless_allowed(tmp_path):
  import json
  from lmtrain.errors import UserError
  from lmtrain.rl import stage as rl_stage
  from lmtrain.train import roles
  path = tmp_path / roles.NORMALIZATION_FILE
  path.write_text(json.dumps({"offset": 0.5, "scale": 2.0}))
  assert rl_stage.read_normalization(str(tmp_path)) == (0.5, 2.0)
  path.write_text(json.dumps({"offset": 0.69, "scale": 1e-6}))  # every pair scored alike
  with pytest.raises(UserError, match=r"cannot rank rollouts: its scores' std 1e-06 is under "
                                      r"0.001: it scores every response alike; .*"
                                      r"make_stage.allow_degenerate_reward=True"):
    rl_stage.read_normalization(str(tmp_path))
  assert rl_stage.read_normalization(str(tmp_path), allow_degenerate=True) == (0.69, 1e-6)
  # A reward model at chance on its held-out pairs, though its scores spread.
  path.write_text(json.dumps({"offset": 0.1, "scale": 3.0, "eval_accuracy": 0.5}))
  with pytest.raises(UserError, match=r"held-out accuracy 0.500 is at chance \(under 0.55\)"):
    rl_stage.read_normalization(str(tmp_path))
  assert rl_stage.read_normalization(str(tmp_path), allow_degenerate=True) == (0.1, 3.0)
  path.write_text(json.dumps({"offset": 0.1, "scale": 3.0, "eval_accuracy": 0.9}))
  assert rl_stage.read_normalization(str(tmp_path)) == (0.1, 3.0)
