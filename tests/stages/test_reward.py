"""The reward model: read at the last real token, its LM-score term, the ranking loss (each
response scored once; pairs give the pairwise numbers), and the same step on one device and a
2x2x2 mesh."""

import dataclasses

import jax
import numpy as np
import pytest

from lmtrain import parallel
from lmtrain.losses import METRIC_WEIGHT
from lmtrain.model import transformer
from lmtrain.rl import core as rl
from lmtrain.stages import reward
from lmtrain.train.state import TrainState
import util


def test_reward_is_read_at_the_last_real_token():
  cfg = dataclasses.replace(util.TINY, head="scalar")
  graphdef, _, _ = transformer.abstract_model(cfg)
  model = transformer.merge(graphdef, jax.jit(transformer.init_fn(cfg))(jax.random.PRNGKey(0)))
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, cfg.vocab_size, (3, 12)).astype(np.int32)
  lengths = np.array([5, 12, 8])
  segments = (np.arange(12)[None] < lengths[:, None]).astype(np.int32)
  positions = np.broadcast_to(np.arange(12, dtype=np.int32), (3, 12))
  response = segments * (np.arange(12)[None] >= 2)  # the mask is only read with lm_score
  scores = rl.reward_scores(model, tokens, positions, segments, response)
  changed = tokens.copy()
  changed[0, 5:] = 7  # after row 0's last real token
  changed[2, 8:] = 9
  np.testing.assert_array_equal(scores, rl.reward_scores(model, changed, positions, segments,
                                                         response))
  full = model.scores(model.hidden(tokens, positions, segments))
  np.testing.assert_allclose(scores, [full[0, 4], full[1, 11], full[2, 7]], rtol=1e-6)
  changed[0, 4] = (changed[0, 4] + 1) % cfg.vocab_size  # the last real token itself matters
  assert float(rl.reward_scores(model, changed, positions, segments, response)[0]) != float(
      scores[0])


def test_lm_score_adds_the_weighted_mean_response_log_prob():
  cfg = dataclasses.replace(util.TINY, head="scalar", lm_score=True)
  graphdef, _, _ = transformer.abstract_model(cfg)
  params = jax.jit(transformer.init_fn(cfg))(jax.random.PRNGKey(2))
  assert float(params["lm_score_weight"]) == 1.0
  params["lm_score_weight"] = jax.numpy.asarray(2.5)
  model = transformer.merge(graphdef, params)
  rng = np.random.default_rng(2)
  tokens = rng.integers(4, cfg.vocab_size, (3, 12)).astype(np.int32)
  lengths, starts = np.array([5, 12, 8]), np.array([2, 6, 3])  # response = [start, length)
  index = np.arange(12)[None]
  segments = (index < lengths[:, None]).astype(np.int32)
  response = ((index >= starts[:, None]) & (index < lengths[:, None])).astype(np.float32)
  positions = np.broadcast_to(np.arange(12, dtype=np.int32), (3, 12))
  scores = rl.reward_scores(model, tokens, positions, segments, response)
  head = model.scores(model.hidden(tokens, positions, segments))
  for i in range(3):
    n, s = lengths[i], starts[i]
    logp = jax.nn.log_softmax(model(jnp_row(tokens[i, :n]))[0])  # unpadded, on its own
    mean = np.mean([logp[t - 1, tokens[i, t]] for t in range(s, n)])
    assert float(scores[i]) == pytest.approx(float(head[i, n - 1]) + 2.5 * float(mean), rel=1e-5)
  changed = tokens.copy()
  changed[0, 5:] = 3  # after the EOS: nothing changes
  np.testing.assert_array_equal(scores, rl.reward_scores(model, changed, positions, segments,
                                                         response))
  assert cfg.param_count() == sum(x.size for x in jax.tree.leaves(params))


def jnp_row(row):
  return jax.numpy.asarray(row[None])


def random_rankings(n, k, seq_len, vocab, seed):
  """n rankings of 2..k responses (padding responses after them, holding junk), of different
  lengths padded after EOS (segment 0), with ties and margins."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(seq_len // 2, seq_len + 1, (n, k))
  real = np.arange(seq_len) < lengths[..., None]
  counts = rng.integers(2, k + 1, n)
  counts[0] = k
  valid = (np.arange(k) < counts[:, None]).astype(np.float32)
  ranks = rng.integers(1, 4, (n, k)).astype(np.int32)
  ranks[:, 0], ranks[:, 1] = 1, 2  # every ranking orders at least one pair
  real &= valid[..., None] > 0
  return {
      "inputs": np.where(real, rng.integers(4, vocab, (n, k, seq_len)), 0).astype(np.int32),
      "segment_ids": real.astype(np.int32),
      "positions": np.where(real, np.arange(seq_len), 0).astype(np.int32),
      "loss_mask": (real & (np.arange(seq_len) >= 4)).astype(np.float32),
      "ranks": ranks, "valid": valid, "margin": rng.uniform(0, 1, n).astype(np.float32)}


def ragged_pairs(n, seq_len, vocab, seed):
  """n preference pairs of different lengths, padded after EOS (segment 0), margins included, in
  the batch format of the pairs-only reward loss (chosen_/rejected_ features)."""
  rng = np.random.default_rng(seed)
  batch = {"margin": rng.uniform(0, 1, n).astype(np.float32)}
  for side in ("chosen", "rejected"):
    lengths = rng.integers(seq_len // 2, seq_len + 1, n)
    real = np.arange(seq_len)[None] < lengths[:, None]
    batch[f"{side}_inputs"] = np.where(real, rng.integers(4, vocab, (n, seq_len)), 0).astype(
        np.int32)
    batch[f"{side}_segment_ids"] = real.astype(np.int32)
    batch[f"{side}_positions"] = np.where(real, np.arange(seq_len)[None], 0).astype(np.int32)
    batch[f"{side}_loss_mask"] = (real & (np.arange(seq_len)[None] >= 4)).astype(np.float32)
  return batch


def as_rankings(pairs, k=2):
  """The pairs as rankings of two (chosen rank 1), in batches of k responses (padding after)."""
  n, seq_len = pairs["margin"].shape[0], pairs["chosen_inputs"].shape[1]
  out = {"ranks": np.zeros((n, k), np.int32), "valid": np.zeros((n, k), np.float32),
         "margin": pairs["margin"]}
  for key in reward.RESPONSE_FEATURES:
    out[key] = np.zeros((n, k, seq_len), pairs[f"chosen_{key}"].dtype)
    out[key][:, 0], out[key][:, 1] = pairs[f"chosen_{key}"], pairs[f"rejected_{key}"]
  out["ranks"][:, :2], out["valid"][:, :2] = [1, 2], 1.0
  return out


def pairwise_loss(model, batch, rng):
  """The reward loss as it was before rankings: both sides of every pair scored, summed
  -log sigmoid(r_chosen - r_rejected - margin) over the pairs."""
  del rng
  chosen, rejected = (rl.reward_scores(model, batch[f"{s}_inputs"], batch[f"{s}_positions"],
                                       batch[f"{s}_segment_ids"], batch[f"{s}_loss_mask"])
                      for s in ("chosen", "rejected"))
  loss, metrics = rl.pairwise_reward_loss(chosen, rejected, batch["margin"])
  n = chosen.shape[0]
  return loss * n, jax.numpy.asarray(n, jax.numpy.float32), {k: v * n for k, v in metrics.items()}


class CountingModel:
  """A model that records the rows of every forward pass (model.hidden)."""

  def __init__(self, model):
    self.model, self.rows = model, []

  def hidden(self, tokens, *args):
    self.rows.append(tokens.shape[0])
    return self.model.hidden(tokens, *args)

  def __getattr__(self, name):
    return getattr(self.model, name)


@pytest.mark.parametrize("lm_score", [False, True])
def test_reward_loss_scores_each_response_once_and_averages_each_rankings_pairs(lm_score):
  cfg = dataclasses.replace(util.TINY, head="scalar", lm_score=lm_score)
  graphdef, _, _ = transformer.abstract_model(cfg)
  model = transformer.merge(graphdef, jax.jit(transformer.init_fn(cfg))(jax.random.PRNGKey(1)))
  batch = random_rankings(3, 4, 12, cfg.vocab_size, 5)
  counting = CountingModel(model)
  loss_sum, weight, sums = reward.reward_loss(counting, batch, None)
  # One pass over the B * K responses, not two per pair (2 x C(4, 2) x B rows).
  assert counting.rows == [3 * 4]
  scores = np.stack([np.asarray(rl.reward_scores(
      model, batch["inputs"][b], batch["positions"][b], batch["segment_ids"][b],
      batch["loss_mask"][b])) for b in range(3)])  # each ranking's responses on their own
  expected, metrics = rl.ranking_reward_loss(scores, batch["ranks"], batch["valid"],
                                             batch["margin"])
  assert float(weight) == 3.0 and float(sums[METRIC_WEIGHT]) == float(metrics["pairs"]) > 3
  assert float(loss_sum) / 3 == pytest.approx(float(expected), rel=1e-5)
  assert float(sums["accuracy"]) / float(metrics["pairs"]) == pytest.approx(
      float(metrics["accuracy"]))


@pytest.mark.parametrize("lm_score", [False, True])
def test_pairs_as_rankings_give_the_pairwise_numbers(lm_score):
  cfg = dataclasses.replace(util.TINY, head="scalar", lm_score=lm_score)
  graphdef, _, _ = transformer.abstract_model(cfg)
  model = transformer.merge(graphdef, jax.jit(transformer.init_fn(cfg))(jax.random.PRNGKey(1)))
  pairs = ragged_pairs(4, 10, cfg.vocab_size, 1)
  loss_sum, weight, sums = reward.reward_loss(model, as_rankings(pairs), None)
  rc, rr = (np.asarray(rl.reward_scores(model, pairs[f"{s}_inputs"], pairs[f"{s}_positions"],
                                        pairs[f"{s}_segment_ids"], pairs[f"{s}_loss_mask"]))
            for s in ("chosen", "rejected"))
  expected = np.mean(np.log1p(np.exp(-(rc - rr - pairs["margin"]))))
  assert float(weight) == float(sums[METRIC_WEIGHT]) == 4.0
  assert float(loss_sum) / 4 == pytest.approx(expected, rel=1e-5)
  assert float(sums["accuracy"]) / 4 == pytest.approx(np.mean(rc > rr))
  # In batches of 3 responses (beside rankings of 3), the padding changes nothing.
  padded = reward.reward_loss(model, as_rankings(pairs, k=3), None)
  assert float(padded[0]) == pytest.approx(float(loss_sum), rel=1e-6)


def run_steps(cfg, loss_fn, batches, shape):
  """(metrics of each step, final params) of the reward step on a mesh of `shape`."""
  params = util.init_params(cfg, seed=1)
  mesh = util.mesh_of(shape)
  step, shardings, batch_sharding, optimizer, *_ = util.sharded_setup(
      mesh, cfg, eps=1e-4, loss_fn=loss_fn, batch_example=batches[0])
  state = jax.jit(lambda p: TrainState.create(p, optimizer, jax.random.PRNGKey(0)),
                  out_shardings=shardings)(params)
  metrics = []
  for b in batches:
    state, m = step(state, jax.device_put(b, batch_sharding))
    metrics.append({k: float(m[k]) for k in ("loss", "accuracy", "margin", "grad_norm")})
  return metrics, jax.device_get(state.params)


ONE_DEVICE, MESH_2X2X2 = {"data": 1, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2}


def assert_same_run(a, b):
  (m1, p1), (m2, p2) = a, b
  for x, y in zip(m1, m2):
    for key in x:
      # margin, a mean of score differences near 0, keeps the rounding of the scores (~1e-6).
      assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-5), key
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), p1, p2)


@pytest.mark.parametrize("lm_score", [False, True])
def test_ranking_step_is_the_same_on_one_device_and_a_2x2x2_mesh(lm_score):
  cfg = dataclasses.replace(util.TINY, head="scalar", lm_score=lm_score)
  batches = [random_rankings(8, 4, 16, cfg.vocab_size, seed) for seed in range(2)]
  one = run_steps(cfg, reward.reward_loss, batches, ONE_DEVICE)
  assert one[0][0]["loss"] > 0 and one[0][0]["grad_norm"] > 0
  assert_same_run(one, run_steps(cfg, reward.reward_loss, batches, MESH_2X2X2))
  # The logged accuracy counts pairs: the step's is the loss function's pair accuracy.
  graphdef, _, _ = transformer.abstract_model(cfg)
  model = transformer.merge(graphdef, util.init_params(cfg, seed=1))
  _, metrics = rl.ranking_reward_loss(reward.ranking_scores(model, batches[0]),
                                      batches[0]["ranks"], batches[0]["valid"],
                                      batches[0]["margin"])
  assert one[0][0]["accuracy"] == pytest.approx(float(metrics["accuracy"]), abs=1e-6)


def test_pairs_give_the_pairwise_steps_numbers_on_a_2x2x2_mesh():
  cfg = dataclasses.replace(util.TINY, head="scalar")
  pairs = [ragged_pairs(8, 16, cfg.vocab_size, seed) for seed in range(2)]
  assert_same_run(run_steps(cfg, pairwise_loss, pairs, ONE_DEVICE),
                  run_steps(cfg, reward.reward_loss, [as_rankings(p) for p in pairs], MESH_2X2X2))


def test_preference_normalisation_scores_every_response_once_on_a_mesh_that_needs_padding():
  # 5 rankings on the (2,2,2) mesh's 4 batch shards: padded to 8, the padding's scores dropped,
  # as are those of the padding responses; the scores equal one device's, record by record.
  cfg = dataclasses.replace(util.TINY, head="scalar")
  graphdef, _, names = transformer.abstract_model(cfg)
  params = util.init_params(cfg, seed=3)
  rankings = random_rankings(5, 3, 16, cfg.vocab_size, 7)
  rows = [{k: v[i] for k, v in rankings.items()} for i in range(5)]
  mesh, rules = util.mesh_of(MESH_2X2X2), parallel.axis_rules()
  shardings = parallel.tree_shardings(mesh, params, names, rules)
  scores = reward.preference_scores(graphdef, jax.device_put(params, shardings), rows, mesh,
                                    rules)
  expected = reward.ranking_scores(transformer.merge(graphdef, params), rankings)
  assert scores.shape == (int(rankings["valid"].sum()),) and scores.shape[0] < 15
  np.testing.assert_allclose(scores, np.asarray(expected)[rankings["valid"] > 0], rtol=1e-5,
                             atol=1e-6)
