"""The transformer: causal attention, packed documents that do not see each other, and the
unrolled layer loop (scan_layers=False)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmtrain.model import attention
from lmtrain.model import transformer
import util


def test_packed_rows_give_each_documents_own_loss():
  """A document's per-token losses are the same packed beside others as alone in its own row."""
  cfg = util.TINY
  graphdef, _, _ = transformer.abstract_model(cfg)
  model = transformer.merge(graphdef, util.init_params())
  rng = np.random.default_rng(0)
  docs = [rng.integers(4, cfg.vocab_size, n).astype(np.int32) for n in (9, 14, 7)]
  seq = 32

  def token_losses(inputs, positions, segments):
    logits = model(jnp.asarray(inputs)[None], jnp.asarray(positions)[None],
                   jnp.asarray(segments)[None])[0]
    return -jax.nn.log_softmax(logits)

  packed_in, packed_pos, packed_seg = (np.zeros(seq, np.int32) for _ in range(3))
  start = 0
  for i, d in enumerate(docs):
    packed_in[start:start + len(d)] = d
    packed_pos[start:start + len(d)] = np.arange(len(d))
    packed_seg[start:start + len(d)] = i + 1
    start += len(d)
  packed = token_losses(packed_in, packed_pos, packed_seg)
  start = 0
  for d in docs:
    alone_in = np.zeros(seq, np.int32)
    alone_in[:len(d)] = d
    alone_seg = (np.arange(seq) < len(d)).astype(np.int32)
    alone = token_losses(alone_in, np.arange(seq), alone_seg)
    np.testing.assert_allclose(packed[start:start + len(d)], alone[:len(d)], rtol=1e-5, atol=1e-5)
    start += len(d)


def test_attention_is_causal():
  """Changing token t changes no logit before t (no peeking at the future)."""
  graphdef, _, _ = transformer.abstract_model(util.TINY)
  model = transformer.merge(graphdef, util.init_params())
  x = np.random.default_rng(0).integers(4, util.TINY.vocab_size, (1, 16)).astype(np.int32)
  y = x.copy()
  y[0, 10] = (y[0, 10] + 1) % util.TINY.vocab_size
  diff = np.abs(np.asarray(model(jnp.asarray(x)) - model(jnp.asarray(y)))).max(-1)[0]
  assert (diff[:10] == 0).all() and (diff[10:] > 0).all()


@pytest.mark.parametrize("remat", ["none", "full"])
def test_unrolled_layers_give_the_scanned_loss_gradients_and_generation(remat):
  """scan_layers=False runs the same layers unrolled: the same loss and gradients (fp32 rounding),
  the same greedy tokens; it is not an architecture field (a resume may change it)."""
  from lmtrain.losses import lm_loss
  from lmtrain.model import generate as gen
  scanned = dataclasses.replace(util.TINY, remat=remat)
  unrolled = dataclasses.replace(scanned, scan_layers=False)
  assert scanned.architecture() == unrolled.architecture()
  params = util.init_params(util.TINY)
  batch = {k: jnp.asarray(v) for k, v in util.packed_batch(batch_size=2, seq_len=24).items()}

  def loss_and_grads(cfg):
    graphdef = transformer.abstract_model(cfg)[0]
    fn = lambda p: lm_loss(transformer.merge(graphdef, p), batch, None)[0]
    return jax.jit(jax.value_and_grad(fn))(params)

  (want, want_grads), (got, got_grads) = loss_and_grads(scanned), loss_and_grads(unrolled)
  assert float(got) == pytest.approx(float(want), rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got_grads, want_grads)
  tokens, lengths = gen.pad_prompts([[5, 6, 7], [9, 10, 11, 12, 13]])
  outs = [gen.generate(transformer.abstract_model(cfg)[0], params, tokens, lengths,
                       jax.random.PRNGKey(0), max_new_tokens=5, greedy=True, eos_id=-1).tokens
          for cfg in (scanned, unrolled)]
  np.testing.assert_array_equal(outs[0], outs[1])
  with pytest.raises(Exception, match="scan_layers='no' must be True or False"):
    dataclasses.replace(util.TINY, scan_layers="no").validate()


@pytest.mark.parametrize("scan_layers", [True, False])
def test_the_rotation_is_computed_once_per_step(scan_layers):
  """Rotation.at makes the sin/cos tables once; every layer's queries and keys, forward and
  backward, read them (XLA:CPU would otherwise fuse sin/cos into each use: 4 per layer, 12
  of each here). The tables are the positions times the frequencies, and the rotation turns each
  pair (i, i + H/2) by its angle."""
  from lmtrain.losses import lm_loss
  cfg = dataclasses.replace(util.TINY, num_layers=3, scan_layers=scan_layers)
  graphdef = transformer.abstract_model(cfg)[0]
  batch = {k: jnp.asarray(v) for k, v in util.packed_batch(batch_size=2, seq_len=24).items()}
  step = jax.jit(jax.grad(lambda p, b: lm_loss(transformer.merge(graphdef, p), b, None)[0]))
  hlo = step.lower(util.init_params(cfg), batch).compile().as_text()
  assert (hlo.count(" sine("), hlo.count(" cosine(")) == (1, 1)

  positions = np.array([[0, 1, 2, 3], [7, 0, 1, 100]])
  rope = transformer.Rotation.at(jnp.asarray(positions), cfg)
  freqs = np.asarray(transformer.rope_frequencies(cfg))
  np.testing.assert_allclose(rope.sin[:, :, 0], np.sin(positions[..., None] * freqs), atol=1e-6)
  x = np.random.default_rng(0).normal(size=(2, 4, 3, cfg.head_size)).astype(np.float32)
  half = cfg.head_size // 2
  angle = (positions[..., None] * freqs)[:, :, None]
  want = np.concatenate([x[..., :half] * np.cos(angle) - x[..., half:] * np.sin(angle),
                         x[..., half:] * np.cos(angle) + x[..., :half] * np.sin(angle)], -1)
  np.testing.assert_allclose(rope(jnp.asarray(x)), want, atol=1e-5)


@pytest.mark.parametrize("impl,remat,lora_rank", [
    ("xla", "none", 0), ("chunked", "full", 0), ("causal_blocks", "none", 0),
    ("splash", "none", 0), ("xla", "none", 2)])
def test_shared_prefix_rows_give_the_hidden_states_and_gradients_of_whole_rows(
    monkeypatch, impl, remat, lora_rank):
  """hidden_shared (a prompt computed once for the rows that repeat it) equals hidden() of the
  whole rows, forward and backward, with padding in both parts, GQA and a continuation longer
  than the chunked block (and causal_blocks' query block); splash's continuation runs chunked."""
  monkeypatch.setattr(attention, "CAUSAL_BLOCK", 4)
  cfg = dataclasses.replace(util.TINY, num_kv_heads=2, attention_impl=impl, attention_block=4,
                            remat=remat, lora_rank=lora_rank, lora_alpha=4.0)
  graphdef = transformer.abstract_model(cfg)[0]
  params = util.init_params(cfg)
  if lora_rank:  # fresh adapters' B is zero: make them matter
    params["lora"] = jax.tree.map(lambda x: x + 0.05, params["lora"])
  rng = np.random.default_rng(0)
  unique, repeats, width, length = 2, 3, 9, 7
  prefix = rng.integers(2, cfg.vocab_size, (unique, width)).astype(np.int32)
  prefix_len = np.array([9, 4], np.int32)  # the second is left-padded
  prefix_seg = (np.arange(width)[None] >= (width - prefix_len)[:, None]).astype(np.int32)
  prefix_pos = np.maximum(np.arange(width)[None] - (width - prefix_len)[:, None], 0)
  rows = unique * repeats
  cont = rng.integers(2, cfg.vocab_size, (rows, length)).astype(np.int32)
  ends = np.array([7, 3, 5, 7, 1, 6])  # real continuation tokens per row, padding after
  cont_seg = (np.arange(length)[None] < ends[:, None]).astype(np.int32)
  cont_pos = np.repeat(prefix_len, repeats)[:, None] + np.arange(length)[None]
  whole = lambda a, b: np.concatenate([np.repeat(a, repeats, 0), b], axis=1)
  weights = rng.normal(size=(rows, width + length, cfg.d_model)).astype(np.float32)
  real = whole(prefix_seg, cont_seg)[..., None]

  def separate(p):
    model = transformer.merge(graphdef, p)
    return model.hidden(*(jnp.asarray(whole(a, b)) for a, b in
                          ((prefix, cont), (prefix_pos, cont_pos), (prefix_seg, cont_seg))))

  def shared(p):
    model = transformer.merge(graphdef, p)
    head, tail = model.hidden_shared(prefix, prefix_pos, prefix_seg, cont, cont_pos, cont_seg,
                                     repeats)
    return transformer.after_shared(head, tail, repeats)

  def loss(fn):  # over the real positions only (what a padded query gets is unspecified)
    return jax.jit(jax.value_and_grad(lambda p: (jnp.sum(fn(p) * weights * real),
                                                 fn(p) * real), has_aux=True))(params)

  (want, want_hidden), want_grads = loss(separate)
  (got, got_hidden), got_grads = loss(shared)
  np.testing.assert_allclose(got_hidden, want_hidden, atol=1e-5)
  assert float(got) == pytest.approx(float(want), rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), got_grads,
               want_grads)
  # the shared part really is computed once per prompt: its activations have `unique` rows
  text = jax.jit(shared).lower(params).as_text()
  assert f"tensor<{unique}x{width}x{cfg.d_model}xf32>" in text
