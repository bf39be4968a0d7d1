"""The shared losses: the chunked token cross-entropy against the full one, forward and gradients,
lm_loss with and without it, and the chunked log-probs and entropies that DPO, the reward model's
LM score and PPO/GRPO take."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmtrain.losses import lm_loss, position_blocks, token_cross_entropy, unblock_positions
from lmtrain.model import transformer
import util


def full_cross_entropy(hidden, head, targets):
  return optax.softmax_cross_entropy_with_integer_labels(
      jnp.einsum("btd,dv->btv", hidden, head), targets)


@pytest.mark.parametrize("chunk", [1, 4, 13, 32])  # 13 positions: 4 leaves a ragged last block
def test_chunked_cross_entropy_equals_the_full_one_with_its_gradients(chunk):
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(3, 13, 16)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(16, 50)) / 4, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 50, (3, 13)), jnp.int32)
  weight = jnp.asarray(rng.random((3, 13)) > 0.3, jnp.float32)  # masked positions, as in SFT

  def loss(fn):
    return lambda h, w: jnp.sum(fn(h, w) * weight)

  chunked = lambda h, w: token_cross_entropy(h, w, targets, chunk)
  full = lambda h, w: full_cross_entropy(h, w, targets)
  np.testing.assert_allclose(chunked(hidden, head), full(hidden, head), atol=1e-5)
  got = jax.grad(loss(chunked), argnums=(0, 1))(hidden, head)
  want = jax.grad(loss(full), argnums=(0, 1))(hidden, head)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5)
  assert float(jnp.abs(got[0][weight == 0]).max()) == 0.0  # masked positions get no gradient


@pytest.mark.parametrize("length,chunk,blocks,block", [
    (13, 32, 1, 13), (13, 13, 1, 13), (13, 4, 4, 4), (300, 256, 2, 150), (2048, 1024, 2, 1024),
    (32, 1024, 1, 32)])
def test_position_blocks_split_evenly_and_pad_less_than_one_position_per_block(
    length, chunk, blocks, block):
  x = jnp.arange(2 * length).reshape(2, length)
  parts = position_blocks(x, chunk)
  assert parts.shape == (blocks, 2, block) and block <= chunk
  np.testing.assert_array_equal(unblock_positions(parts, length), x)


@pytest.mark.parametrize("tie", [False, True])
def test_lm_loss_is_the_same_with_chunked_logits(tie):
  cfg = dataclasses.replace(util.TINY, tie_embeddings=tie)
  graphdef, _, _ = transformer.abstract_model(cfg)
  chunked_gd, _, _ = transformer.abstract_model(dataclasses.replace(cfg, logits_chunk=5))
  params = util.init_params(cfg)
  batch = {k: jnp.asarray(v) for k, v in util.packed_batch(batch_size=2, seq_len=32).items()}

  def loss(gd):
    def fn(p):
      loss_sum, weight, _ = lm_loss(transformer.merge(gd, p), batch, None)
      return loss_sum / weight
    return jax.value_and_grad(fn)

  (full, full_grads), (chunked, chunked_grads) = loss(graphdef)(params), loss(chunked_gd)(params)
  assert float(chunked) == pytest.approx(float(full), rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), chunked_grads,
               full_grads)


@pytest.mark.parametrize("chunk", [4, 7])  # 7 leaves a ragged last block of the 17 positions
def test_token_logprobs_and_entropy_are_the_same_in_chunks(chunk):
  from lmtrain.rl import core
  cfg = util.TINY
  graphdef, _, _ = transformer.abstract_model(cfg)
  chunked_gd, _, _ = transformer.abstract_model(dataclasses.replace(cfg, logits_chunk=chunk))
  params = util.init_params(cfg)
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(4, cfg.vocab_size, (3, 18)), jnp.int32)
  mask = jnp.asarray(rng.random((3, 17)) > 0.3, jnp.float32)

  def objective(gd):
    def f(p):
      model = transformer.merge(gd, p)
      hidden = model.hidden(tokens[:, :-1])
      logp, ent = core.token_logprobs(model, hidden, tokens[:, 1:], mask, temperature=0.7,
                                      with_entropy=True)
      return jnp.sum(logp * 0.3) + jnp.sum(ent * 0.1), (logp, ent)
    return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

  (want, (want_logp, want_ent)), want_grads = objective(graphdef)
  (got, (got_logp, got_ent)), got_grads = objective(chunked_gd)
  np.testing.assert_allclose(got_logp, want_logp, atol=1e-5)
  np.testing.assert_allclose(got_ent, want_ent, atol=1e-5)
  assert np.all(np.asarray(got_logp)[np.asarray(mask) == 0] == 0)
  assert float(got) == pytest.approx(float(want), rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got_grads, want_grads)


def test_a_negative_chunk_is_a_one_line_error():
  with pytest.raises(Exception, match="logits_chunk=-1 must be 0"):
    dataclasses.replace(util.TINY, logits_chunk=-1).validate()
