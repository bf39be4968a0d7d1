"""Attention implementations: chunked, causal_blocks and splash (in Pallas's interpreter on CPU)
equal xla (forward, gradients, packing, padding, GQA, odd lengths, a continuation of shared keys,
the KV cache, a mesh); blocks no query can see are skipped; `auto`'s choice; the remat policies."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmtrain.losses import lm_loss
from lmtrain.model import attention
from lmtrain.model import generate as gen
from lmtrain.model import transformer
import util


def packed_visibility(batch, length, seed=0):
  """Rows of 1-3 packed documents (positions restarting) and trailing padding of varying width."""
  rng = np.random.default_rng(seed)
  seg, pos = np.zeros((batch, length), np.int32), np.zeros((batch, length), np.int32)
  for r in range(batch):
    real = length - int(rng.integers(0, length // 3))
    cuts = np.sort(rng.choice(np.arange(1, real), size=int(rng.integers(0, 3)), replace=False))
    for s, (a, b) in enumerate(zip([0, *cuts], [*cuts, real]), start=1):
      seg[r, a:b], pos[r, a:b] = s, np.arange(b - a)
  return seg, pos


def attention_and_grads(impl, q, k, v, vis, weights, block):
  def loss(q, k, v):
    out = attention.attend(q, k, v, vis, impl, block)
    return jnp.sum(out * weights), out
  (value, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return value, out, grads


def mean_loss_and_grads(cfg, params, batch):
  """The token-mean LM loss of `cfg` on `batch` and its gradients, jitted."""
  graphdef = transformer.abstract_model(cfg)[0]

  def f(p, b):
    total, weight, _ = lm_loss(transformer.merge(graphdef, p), b, None)
    return total / weight

  return jax.jit(jax.value_and_grad(f))(params, batch)


def check_against_xla(impl, batch, length, heads, kv_heads, head_dim, block):
  """`impl` on random queries, keys and values over packed, padded rows: the output on every row
  that sees a key, the loss and the gradients equal xla's. Returns (output, segment ids)."""
  rng = np.random.default_rng(length)
  q = jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(batch, length, kv_heads, head_dim)), jnp.float32)
          for _ in range(2))
  seg, pos = packed_visibility(batch, length, seed=length)
  vis = attention.Visibility(*map(jnp.asarray, (seg, seg, pos, pos)))
  return assert_equals_xla(impl, q, k, v, vis, block, rng), seg


def assert_equals_xla(impl, q, k, v, vis, block, rng):
  """`impl`'s output on every query row that is not padding, a loss weighting those rows at
  random, and its gradients equal xla's. Returns the output."""
  real = jnp.asarray(vis.q_segment != 0)[:, :, None, None]
  weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32) * real  # padding rows unread
  ref_loss, ref_out, ref_grads = attention_and_grads("xla", q, k, v, vis, weights, block)
  loss, out, grads = attention_and_grads(impl, q, k, v, vis, weights, block)
  assert abs(float(loss - ref_loss)) < 1e-4
  np.testing.assert_allclose(out * real, ref_out * real, atol=1e-5)
  for g, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(g, ref, atol=1e-5)
  return out


@pytest.mark.parametrize("length,heads,kv_heads,block", [
    (37, 4, 2, 8),    # odd length, several blocks, the last one partly padded, GQA
    (32, 4, 4, 16),   # blocks that divide the length, plain multi-head
    (20, 6, 1, 64),   # one block longer than the sequence, multi-query
])
def test_chunked_equals_xla_forward_and_gradients(length, heads, kv_heads, block):
  out, seg = check_against_xla("chunked", 3, length, heads, kv_heads, 8, block)
  assert np.all(np.asarray(out)[seg == 0] == 0)  # a query that sees nothing: zero, not NaN


@pytest.mark.parametrize("length,heads,kv_heads,block", [
    (37, 4, 2, 8),    # odd length, several query blocks, the last one short, GQA
    (32, 4, 4, 16),   # blocks that divide the length, plain multi-head
    (20, 6, 1, 64),   # one block longer than the sequence, multi-query
])
def test_causal_blocks_equals_xla_forward_and_gradients(monkeypatch, length, heads, kv_heads,
                                                         block):
  monkeypatch.setattr(attention, "CAUSAL_BLOCK", block)
  assert attention.causal_block(length) == block
  check_against_xla("causal_blocks", 3, length, heads, kv_heads, 8, block)


def test_causal_blocks_of_a_continuation_equal_xla(monkeypatch):
  """Queries that are the last T of the S keys' sequence (a response after its shared prompt's
  keys, Transformer.hidden_shared): each query block reads the keys up to its own index in the
  whole sequence, and output and gradients equal xla's."""
  monkeypatch.setattr(attention, "CAUSAL_BLOCK", 4)
  rng = np.random.default_rng(1)
  batch, total, length, heads, kv_heads, head_dim = 2, 29, 11, 4, 2, 8
  seg, pos = packed_visibility(batch, total, seed=1)
  q = jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(batch, total, kv_heads, head_dim)), jnp.float32)
          for _ in range(2))
  vis = attention.Visibility(*map(jnp.asarray, (seg[:, -length:], seg, pos[:, -length:], pos)))
  assert_equals_xla("causal_blocks", q, k, v, vis, 4, rng)


def test_causal_blocks_never_read_the_keys_after_a_query_block():
  """NaN keys and values after the first query block leave that block's output as it was (the
  scores above the diagonal are never computed; xla's masked multiply gives NaN), and the lowered
  computation has one score matrix per block, of the keys up to its end."""
  rng = np.random.default_rng(0)
  length, block = 24, 8
  q, k, v = (jnp.asarray(rng.normal(size=(1, length, 2, 8)), jnp.float32) for _ in range(3))
  ones = jnp.ones((1, length), jnp.int32)
  pos = jnp.arange(length, dtype=jnp.int32)[None]
  vis = attention.Visibility(ones, ones, pos, pos)
  poisoned_k, poisoned_v = k.at[:, block:].set(jnp.nan), v.at[:, block:].set(jnp.nan)
  out = attention.causal_blocks_attention(q, poisoned_k, poisoned_v, vis, block)
  clean = attention.causal_blocks_attention(q, k, v, vis, block)
  np.testing.assert_array_equal(out[:, :block], clean[:, :block])
  assert np.isnan(np.asarray(out[:, block:])).all()
  dense = attention.attend(q, poisoned_k, poisoned_v, vis, "xla")
  assert np.isnan(np.asarray(dense[:, :block])).any()
  hlo = jax.jit(lambda q, k, v: attention.causal_blocks_attention(q, k, v, vis, block)).lower(
      q, k, v).as_text()
  assert [f"tensor<1x2x8x{keys}xf32>" in hlo for keys in (8, 16, 24)] == [True] * 3
  assert "tensor<1x2x24x24xf32>" not in hlo


@pytest.mark.parametrize("length,kv_heads", [(200, 2), (128, 4)])
def test_splash_equals_xla_forward_and_gradients(length, kv_heads):
  """The splash kernel's mask wiring (causal by index + segment ids, GQA, a length padded to its
  128-lane blocks), run by Pallas's interpreter: the TPU kernel's own code on CPU."""
  check_against_xla("splash", 2, length, 4, kv_heads, 16, 128)


@pytest.mark.parametrize("impl", ["splash", "causal_blocks"])
def test_splash_and_causal_blocks_on_a_mesh_equal_xla_on_one_device(monkeypatch, impl):
  """On a (2, 2, 2) mesh (splash under shard_map over the batch and head axes; causal_blocks'
  query blocks of 8 as XLA partitions them), the model's loss and gradients equal xla's on one
  device."""
  from lmtrain import parallel
  monkeypatch.setattr(attention, "CAUSAL_BLOCK", 8)
  batch = jax.tree.map(jnp.asarray, util.packed_batch(seq_len=32))
  params = util.init_params()

  def loss_and_grads(cfg, mesh):
    rules = parallel.axis_rules()
    names = transformer.abstract_model(cfg)[2]
    p = jax.device_put(params, parallel.tree_shardings(mesh, params, names, rules))
    b = jax.device_put(batch, parallel.batch_sharding(mesh, rules))
    with parallel.activate(mesh, rules):
      return mean_loss_and_grads(cfg, p, b)

  ref_loss, ref_grads = loss_and_grads(util.TINY, util.mesh_of({"data": 1}))
  cfg = dataclasses.replace(util.TINY, attention_impl=impl)
  loss, grads = loss_and_grads(cfg, util.mesh_of({"data": 2, "fsdp": 2, "tensor": 2}))
  assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               jax.device_get(grads), jax.device_get(ref_grads))


def test_blocks_no_query_sees_are_skipped():
  """NaN keys and values in blocks that are wholly in the future of a query block, or of another
  packed segment, leave its output finite: those blocks are never computed (a masked multiply
  would give 0 x NaN = NaN, as xla's does)."""
  rng = np.random.default_rng(0)
  length, block = 32, 8
  q, k, v = (jnp.asarray(rng.normal(size=(1, length, 2, 8)), jnp.float32) for _ in range(3))
  seg = np.ones((1, length), np.int32)
  seg[0, 16:] = 2  # two documents of 16 tokens: blocks 0-1 and 2-3
  pos = np.concatenate([np.arange(16), np.arange(16)])[None].astype(np.int32)
  vis = attention.Visibility(*map(jnp.asarray, (seg, seg, pos, pos)))
  poisoned_k = k.at[:, 8:16].set(jnp.nan)  # block 1: in the future of block 0, another document
  poisoned_v = v.at[:, 8:16].set(jnp.nan)  # than blocks 2 and 3
  out = attention.chunked_attention(q, poisoned_k, poisoned_v, vis, block, block)
  clean = attention.chunked_attention(q, k, v, vis, block, block)
  np.testing.assert_array_equal(out[:, :8], clean[:, :8])
  np.testing.assert_array_equal(out[:, 16:], clean[:, 16:])
  assert np.isnan(np.asarray(out[:, 8:16])).all()  # block 1 reads itself
  assert np.isnan(np.asarray(attention.attend(q, poisoned_k, poisoned_v, vis, "xla"))).any()


def chunked(cfg, block=8):
  return dataclasses.replace(cfg, attention_impl="chunked", attention_block=block)


@pytest.mark.parametrize("impl", ["chunked", "causal_blocks"])
def test_model_loss_and_gradients_are_the_same_with_each_attention(monkeypatch, impl):
  monkeypatch.setattr(attention, "CAUSAL_BLOCK", 8)  # 5 query blocks of the 36 positions
  batch = jax.tree.map(jnp.asarray, util.packed_batch(seq_len=36))
  params = util.init_params()
  ref_loss, ref_grads = mean_loss_and_grads(util.TINY, params, batch)
  cfg = chunked(util.TINY) if impl == "chunked" else dataclasses.replace(
      util.TINY, attention_impl=impl)
  loss, grads = mean_loss_and_grads(cfg, params, batch)
  assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, ref_grads)


@pytest.mark.parametrize("impl", ["chunked", "causal_blocks", "splash"])
def test_generation_with_each_attention_equals_xla(monkeypatch, impl):
  """Generation (the prefill of ragged prompts through `impl`, then one token at a time with
  cached_attention) gives the same tokens and log-probs as with xla."""
  monkeypatch.setattr(attention, "CAUSAL_BLOCK", 8)
  params = util.init_params()
  prompts = [[5, 6, 7], list(range(9, 30)), [20], [30, 31, 32, 33]]
  tokens, lengths = gen.pad_prompts(prompts)

  def sample(cfg):
    graphdef = transformer.abstract_model(cfg)[0]
    return jax.device_get(gen.generate(graphdef, params, tokens, lengths, jax.random.PRNGKey(0),
                                       max_new_tokens=12, eos_id=-1, temperature=0.8))

  cfg = chunked(util.TINY) if impl == "chunked" else dataclasses.replace(
      util.TINY, attention_impl=impl, attention_chunked_from=1)
  ref, out = sample(util.TINY), sample(cfg)
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)


def test_auto_picks_by_backend_dtype_and_length():
  bf16, f32 = jnp.bfloat16, jnp.float32
  assert attention.resolve("auto", 4096, bf16, 2048, backend="tpu") == "splash"
  assert attention.resolve("auto", 128, bf16, 2048, backend="gpu") == "cudnn"
  assert attention.resolve("auto", 8192, f32, 2048, backend="gpu") == "chunked"  # cuDNN: 16-bit
  assert attention.resolve("auto", 1024, f32, 2048, backend="cpu") == "causal_blocks"
  assert attention.resolve("auto", 1024, f32, 2048, backend="gpu") == "xla"
  assert attention.resolve("auto", 2048, f32, 2048, backend="cpu") == "chunked"
  for backend in ("cpu", "gpu"):  # splash only where asked for or on TPU
    assert "splash" not in {attention.resolve("auto", t, dt, 2048, backend=backend)
                            for t in (1, 4096) for dt in (bf16, f32)}
  assert attention.resolve("xla", 8192, f32, 2048, backend="gpu") == "xla"


def test_cached_attention_equals_xla_over_the_cache_slots():
  """The decode step's attention (cache [B, K, S, H], query t sees slots 0..position[t]) equals
  `xla` given the slots as key positions, with GQA and ragged positions."""
  rng = np.random.default_rng(3)
  batch, length, heads, kv_heads, head_dim, slots = 3, 2, 4, 2, 8, 11
  q = jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(batch, slots, kv_heads, head_dim)), jnp.float32)
          for _ in range(2))
  positions = jnp.array([[0, 1], [4, 5], [9, 10]], jnp.int32)
  slot_ids = jnp.broadcast_to(jnp.arange(slots), (batch, slots))
  vis = attention.Visibility(jnp.ones_like(positions), jnp.ones_like(slot_ids), positions, slot_ids)
  want = attention.attend(q, k, v, vis, "xla")
  got = attention.cached_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), positions)
  np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("policy", sorted(set(transformer.REMAT_POLICIES) - {"none"}))
def test_every_remat_policy_gives_the_same_gradients(policy):
  batch = jax.tree.map(jnp.asarray, util.packed_batch(seq_len=16))
  params = util.init_params()
  for impl in ("xla", "chunked"):
    cfg = chunked(util.TINY) if impl == "chunked" else util.TINY
    _, ref = mean_loss_and_grads(cfg, params, batch)
    _, out = mean_loss_and_grads(dataclasses.replace(cfg, remat=policy), params, batch)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), out, ref)


def test_unknown_attention_impl_is_refused():
  with pytest.raises(Exception, match="attention_impl='flash'; choose one of xla, cudnn, chunked"):
    dataclasses.replace(util.TINY, attention_impl="flash").validate()
