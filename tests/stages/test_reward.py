"""The reward model: read at the last real token, its LM-score term, the pairwise loss, and the
same step on one device and a 2x2x2 mesh."""

import dataclasses

import jax
import numpy as np
import pytest

from lmtrain import parallel
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


@pytest.mark.parametrize("lm_score", [False, True])
def test_reward_loss_is_the_pairwise_formula(lm_score):
  cfg = dataclasses.replace(util.TINY, head="scalar", lm_score=lm_score)
  graphdef, _, _ = transformer.abstract_model(cfg)
  model = transformer.merge(graphdef, jax.jit(transformer.init_fn(cfg))(jax.random.PRNGKey(1)))
  rng = np.random.default_rng(1)
  batch = {"margin": np.array([0.0, 0.5, 1.0, 0.0], np.float32)}
  for side in ("chosen", "rejected"):
    batch[f"{side}_inputs"] = rng.integers(4, cfg.vocab_size, (4, 10)).astype(np.int32)
    batch[f"{side}_segment_ids"] = np.ones((4, 10), np.int32)
    batch[f"{side}_positions"] = np.broadcast_to(np.arange(10, dtype=np.int32), (4, 10))
    batch[f"{side}_loss_mask"] = (np.arange(10)[None] >= 6).astype(np.float32).repeat(4, 0)
  loss_sum, weight, sums = reward.reward_loss(model, batch, None)
  rc, rr = (np.asarray(rl.reward_scores(model, batch[f"{s}_inputs"], batch[f"{s}_positions"],
                                        batch[f"{s}_segment_ids"], batch[f"{s}_loss_mask"]))
            for s in ("chosen", "rejected"))
  expected = np.mean(np.log1p(np.exp(-(rc - rr - batch["margin"]))))
  assert float(weight) == 4.0
  assert float(loss_sum) / 4 == pytest.approx(expected, rel=1e-5)
  assert float(sums["accuracy"]) / 4 == pytest.approx(np.mean(rc > rr))


def ragged_pairs(n, seq_len, vocab, seed):
  """n preference pairs of different lengths, padded after EOS (segment 0), margins included."""
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


@pytest.mark.parametrize("lm_score", [False, True])
def test_reward_step_is_the_same_on_one_device_and_a_2x2x2_mesh(lm_score):
  cfg = dataclasses.replace(util.TINY, head="scalar", lm_score=lm_score)
  params = util.init_params(cfg, seed=1)
  batches = [ragged_pairs(8, 16, cfg.vocab_size, seed) for seed in range(2)]
  runs = []
  for shape in ({"data": 1, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2}):
    mesh = util.mesh_of(shape)
    step, shardings, batch_sharding, optimizer, *_ = util.sharded_setup(
        mesh, cfg, eps=1e-4, loss_fn=reward.reward_loss, batch_example=batches[0])
    state = jax.jit(lambda p: TrainState.create(p, optimizer, jax.random.PRNGKey(0)),
                    out_shardings=shardings)(params)
    metrics = []
    for b in batches:
      state, m = step(state, jax.device_put(b, batch_sharding))
      metrics.append({k: float(m[k]) for k in ("loss", "accuracy", "margin", "grad_norm")})
    runs.append((metrics, jax.device_get(state.params)))
  (m1, p1), (m8, p8) = runs
  assert m1[0]["loss"] > 0 and m1[0]["grad_norm"] > 0
  for a, b in zip(m1, m8):
    for key in a:
      assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), p1, p8)


def test_preference_normalisation_scores_every_pair_once_on_a_mesh_that_needs_padding():
  # 5 pairs on the (2,2,2) mesh's 4 batch shards: padded to 8, the padding's scores dropped; the
  # scores equal one device's, chosen first.
  cfg = dataclasses.replace(util.TINY, head="scalar")
  graphdef, _, names = transformer.abstract_model(cfg)
  params = util.init_params(cfg, seed=3)
  pairs = ragged_pairs(5, 16, cfg.vocab_size, 7)
  rows = [{k: v[i] for k, v in pairs.items()} for i in range(5)]
  mesh, rules = util.mesh_of({"data": 2, "fsdp": 2, "tensor": 2}), parallel.axis_rules()
  shardings = parallel.tree_shardings(mesh, params, names, rules)
  scores = reward.preference_scores(graphdef, jax.device_put(params, shardings), rows, mesh,
                                    rules)
  chosen, rejected = reward.pair_scores(transformer.merge(graphdef, params), pairs)
  assert scores.shape == (10,)
  np.testing.assert_allclose(scores, np.concatenate([chosen, rejected]), rtol=1e-5, atol=1e-6)
