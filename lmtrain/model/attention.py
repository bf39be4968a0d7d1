"""Attention implementations behind `ModelConfig.attention_impl`.

Each takes queries [B, T, N, H], keys and values [B, S, K, H] (N a multiple of K: query head n reads
key/value head n // (N / K), grouped-query attention) and a `Visibility`: query t sees key s when

    q_segment[t] == kv_segment[s] != 0   and   q_position[t] >= kv_position[s]

so segment 0 is padding, packed documents never see each other, and causality is by position.
Training and a generation's prefill (one segment of right-padded prompt tokens) pass the tokens'
own segment ids and positions. A decode step attends over the KV cache with `cached_attention`
instead, whatever the implementation: one query per row against every cached slot up to its
position.

- `xla`: `jax.nn.dot_product_attention` on a dense [B, 1, T, S] mask. Memory grows with T x S: fp32
  logits for every head, the masked half included.
- `cudnn`: the same call with cuDNN's fused kernel (GPU, bf16/fp16).
- `chunked`: blockwise attention with an online softmax (pure JAX, any backend), forward and
  backward written as one custom VJP, so the saved state is the output and one log-sum-exp per
  query: memory O(T x block), never O(T x S). A block pair that no query of it can see (entirely
  above the causal diagonal, or of disjoint packed segments) is skipped, forward and backward.
- `causal_blocks`: dense attention a block of queries at a time, each block over the keys up to its
  last query by index, so the blocks above the causal diagonal are never computed, forward or
  backward (about half of `xla`'s work); masks by `Visibility` inside the blocks.
  Needs what splash needs (below): causal by index. The fastest on CPU for short sequences.
- `splash`: the Pallas splash-attention kernel (TPU; Pallas's interpreter elsewhere, for tests), its
  causal mask by index plus segment ids, under shard_map over the batch and head axes when a mesh is
  active. Causal by index equals causal by position wherever positions rise with the index inside
  each segment: packed and padded training rows, left-padded rollouts, a generation's prefill.

A query that sees no key (a padding row) comes out as zero from `chunked` and as an average of
the values from `xla`; nothing downstream reads those rows (the loss masks them, and no real query
sees a padding key).
"""

import functools
from typing import NamedTuple

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from lmtrain import parallel

IMPLEMENTATIONS = ("xla", "cudnn", "chunked", "causal_blocks", "splash", "auto")
# causal_blocks' query block: the one measured fastest on CPU (bench_tiny, bench_small), with at
# most CAUSAL_MAX_BLOCKS blocks (the layer's HLO holds one set of ops per block).
CAUSAL_BLOCK, CAUSAL_MAX_BLOCKS = 64, 16
SPLASH_LANES = 128  # splash's block sizes (and so padded lengths) are multiples of this


class Visibility(NamedTuple):
  """Which keys each query sees (module docstring): [B, T] for queries, [B, S] for keys."""
  q_segment: jax.Array
  kv_segment: jax.Array
  q_position: jax.Array
  kv_position: jax.Array


def dense_mask(vis: Visibility):
  """[B, 1, T, S] boolean mask of `vis`."""
  same = vis.q_segment[:, :, None] == vis.kv_segment[:, None, :]
  causal = vis.q_position[:, :, None] >= vis.kv_position[:, None, :]
  real = (vis.kv_segment != 0)[:, None, :]
  return (same & causal & real)[:, None, :, :]


def resolve(impl: str, seq_len: int, dtype, chunked_from: int, backend: str | None = None) -> str:
  """The implementation to run. `auto`: splash on TPU, cuDNN on GPU in 16-bit compute, else
  chunked from `chunked_from` tokens on and, for shorter sequences, causal_blocks on CPU and XLA
  elsewhere."""
  backend = backend or jax.default_backend()
  if impl == "auto":
    if backend == "tpu":
      return "splash"
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
      return "cudnn"
    if seq_len >= chunked_from:
      return "chunked"
    return "causal_blocks" if backend == "cpu" else "xla"
  return impl


def causal_block(length: int) -> int:
  """causal_blocks' query block for a sequence of `length` queries."""
  return max(CAUSAL_BLOCK, -(-length // CAUSAL_MAX_BLOCKS))


def attend(q, k, v, vis: Visibility, impl: str, block: int = 512):
  """Attention output [B, T, N, H] of `impl` (already resolved, see `resolve`)."""
  if impl == "chunked":
    return chunked_attention(q, k, v, vis, block, block)
  if impl == "splash":
    return splash_attention(q, k, v, vis, block)
  if impl == "causal_blocks":
    return causal_blocks_attention(q, k, v, vis)
  mask = dense_mask(vis)
  return jax.nn.dot_product_attention(q, k, v, mask=mask,
                                      implementation=None if impl == "xla" else impl)


def cached_attention(q, k_cache, v_cache, q_position):
  """The decode step's attention: queries [B, T, N, H] at positions q_position [B, T] over a
  layer's KV cache [B, K, S, H] (heads before slots; slot s holds position s), query t seeing
  slots 0..q_position[t]. Dense over the slots (a decode step has one query per row), scores and
  softmax in float32 as `xla`'s."""
  batch, length, heads, head_dim = q.shape
  kv_heads, slots = k_cache.shape[1], k_cache.shape[2]
  grouped = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
  scores = jnp.einsum("btkgh,bksh->bkgts", grouped, k_cache, preferred_element_type=jnp.float32)
  scores = scores * jnp.float32(head_dim ** -0.5)
  visible = jnp.arange(slots)[None, None, :] <= q_position[:, :, None]  # [B, T, S]
  scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
  out = jnp.einsum("bkgts,bksh->btkgh", probs, v_cache)
  return out.reshape(batch, length, heads, head_dim)


def chunked_attention(q, k, v, vis: Visibility, block_q: int = 512, block_kv: int = 512):
  """Blockwise attention (module docstring); equals `xla` on every query that sees a key."""
  batch, length, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  bq, bk = min(block_q, length), min(block_kv, kv_len)
  pad_q, pad_kv = -length % bq, -kv_len % bk

  def pad(x, n):  # padded rows get segment 0: they see nothing and nothing sees them
    return jnp.pad(x, [(0, 0), (0, n)] + [(0, 0)] * (x.ndim - 2)) if n else x

  grouped = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
  out = _flash(pad(grouped, pad_q), pad(k, pad_kv), pad(v, pad_kv),
               pad(vis.q_segment.astype(jnp.int32), pad_q),
               pad(vis.kv_segment.astype(jnp.int32), pad_kv),
               pad(vis.q_position.astype(jnp.int32), pad_q),
               pad(vis.kv_position.astype(jnp.int32), pad_kv), bq, bk)
  return out[:, :length].reshape(batch, length, heads, head_dim)


def causal_blocks_attention(q, k, v, vis: Visibility, block: int | None = None):
  """Attention of queries [B, T, N, H] that are the last T of the S keys' sequence (T = S in
  self-attention; a continuation of a shared prefix has S > T): query block i (rows i*block ..)
  scores only the keys up to its last row's index, in fp32, masked by `vis` as `xla` does. Equals
  `xla` where causal by index holds; what it leaves out is what such a query cannot see."""
  batch, length, heads, head_dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  block = block or causal_block(length)
  # Heads before positions once, so each block's matmuls read contiguous rows; each query head
  # with its own copy of its key/value head (a 4-D batched matmul is ~25% faster on CPU than the
  # grouped 5-D one, and the FLOPs are the same).
  q = jnp.einsum("btnh->bnth", q)
  k, v = (jnp.repeat(jnp.einsum("bskh->bksh", x), heads // kv_heads, axis=1) for x in (k, v))

  def query_block(start, q, k, v, vis):
    rows, keys = slice(start, min(start + block, length)), slice(0, kv_len - length + start + block)
    scores = jnp.einsum("bnth,bnsh->bnts", q[:, :, rows], k[:, :, keys],
                        preferred_element_type=jnp.float32) * head_dim ** -0.5
    scores = checkpoint_name(scores, "block_scores")
    mask = _block_mask(vis.q_segment[:, rows], vis.kv_segment[:, keys], vis.q_position[:, rows],
                       vis.kv_position[:, keys])[:, 0]
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.einsum("bnts,bnsh->bnth", probs.astype(v.dtype), v[:, :, keys])

  # The backward keeps each block's scores and recomputes its mask and softmax (elementwise) and
  # its slices of q, k, v, rather than keeping the masked scores, the mask, the probabilities and
  # each block's own copy of the keys and values: bench_small 18% less peak memory, and with the
  # layers scanned fewer stacked buffers to fill (~2% faster).
  query_block = jax.checkpoint(query_block, static_argnums=(0,),
                               policy=jax.checkpoint_policies.save_only_these_names("block_scores"))
  outs = [query_block(start, q, k, v, vis) for start in range(0, length, block)]
  return jnp.einsum("bnth->btnh", jnp.concatenate(outs, axis=2))


def splash_attention(q, k, v, vis: Visibility, block: int = 512, interpret: bool | None = None):
  """The splash kernel (module docstring). interpret: run it in Pallas's interpreter (default:
  anywhere but on TPU)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
  interpret = jax.default_backend() != "tpu" if interpret is None else interpret
  batch, length, heads, head_dim = q.shape
  size = min(_round_up(block, SPLASH_LANES), _round_up(length, SPLASH_LANES))
  padded = _round_up(length, size)

  def pad(x):  # padded rows are segment 0: no real query sees them
    return jnp.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2))

  heads_first = lambda x: jnp.swapaxes(pad(x), 1, 2)  # [B, T, N, H] -> [B, N, T, H]
  q_in = heads_first(q * jnp.asarray(head_dim ** -0.5, q.dtype))  # splash does not scale
  k_in, v_in = heads_first(k), heads_first(v)
  seg_q, seg_kv = pad(vis.q_segment.astype(jnp.int32)), pad(vis.kv_segment.astype(jnp.int32))
  sizes = kernels.BlockSizes(block_q=size, block_kv=size, block_kv_compute=size,
                             block_q_dkv=size, block_kv_dkv=size, block_kv_dkv_compute=size,
                             block_q_dq=size, block_kv_dq=size)

  def local(q, k, v, seg_q, seg_kv):
    mask = masks.MultiHeadMask([masks.CausalMask((padded, padded))] * q.shape[1])
    kernel = kernels.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                     interpret=interpret)
    return jax.vmap(kernel)(q, k, v, segment_ids=kernels.SegmentIds(seg_q, seg_kv))

  mesh_rules = parallel.active()
  if mesh_rules is not None:
    # A Pallas kernel is not partitioned by XLA: run it per shard of the batch and head axes.
    mesh, rules = mesh_rules
    q_spec = parallel.logical_to_spec(("batch", "act_heads", None, None), rules, mesh,
                                      q_in.shape)
    kv_spec = parallel.logical_to_spec(("batch", "act_kv_heads", None, None), rules, mesh,
                                       k_in.shape)
    if q_spec[1] != kv_spec[1]:  # the kv heads do not split like the query heads
      kv_spec = jax.sharding.PartitionSpec(kv_spec[0], None, None, None)
      q_spec = jax.sharding.PartitionSpec(q_spec[0], None, None, None)
    seg_spec = jax.sharding.PartitionSpec(q_spec[0], None)
    local = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec,
                                                      seg_spec),
                          out_specs=q_spec, check_vma=False)
  out = local(q_in, k_in, v_in, seg_q, seg_kv)
  return jnp.swapaxes(out, 1, 2)[:, :length].astype(q.dtype)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _blocks(x, size):
  """[B, T, ...] -> [T / size, B, size, ...]: the block index leads, for lax.scan."""
  return jnp.moveaxis(x.reshape(x.shape[0], -1, size, *x.shape[2:]), 1, 0)


def _unblock(x):
  """Inverse of `_blocks`."""
  return jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:])


def _ranges(segment, position):
  """Per block [n] of segment ids and positions [n, B, size]: the lowest and highest segment and
  position among its real (non-padding) entries; an empty block gets an empty range."""
  real = segment != 0
  top, bottom = jnp.iinfo(jnp.int32).max, jnp.iinfo(jnp.int32).min
  low = lambda x: jnp.min(jnp.where(real, x, top), axis=(1, 2))
  high = lambda x: jnp.max(jnp.where(real, x, bottom), axis=(1, 2))
  return low(segment), high(segment), low(position), high(position)


def _visible_blocks(q_seg, q_pos, kv_seg, kv_pos):
  """[nq, nk] boolean: False where no query of block i can see any key of block j, because their
  segment ranges are disjoint or every key's position is after every query's (the block is above
  the causal diagonal). Block ids and positions are [n, B, size]."""
  q_seg_lo, q_seg_hi, _, q_pos_hi = (x[:, None] for x in _ranges(q_seg, q_pos))
  kv_seg_lo, kv_seg_hi, kv_pos_lo, _ = (x[None, :] for x in _ranges(kv_seg, kv_pos))
  return ~((q_seg_hi < kv_seg_lo) | (kv_seg_hi < q_seg_lo) | (kv_pos_lo > q_pos_hi))


def _span(visible):
  """(first, end) of the True entries of each row of [n, m] (0, 0 for a row without any): the
  loops run over that span, so what lies outside it is never computed. (A lax.cond per block pair
  would skip more in theory, but inside a differentiated layer scan JAX then stacks the cond's
  linearisation residuals over every block pair: O(T x S) memory again.)"""
  m = visible.shape[1]
  anything = visible.any(axis=1)
  first = jnp.argmax(visible, axis=1)
  end = m - jnp.argmax(visible[:, ::-1], axis=1)
  return jnp.where(anything, first, 0), jnp.where(anything, end, 0)


def _block_mask(q_seg, kv_seg, q_pos, kv_pos):
  """[B, 1, 1, bq, bk], broadcasting over the scores' (kv head, group) axes."""
  mask = ((q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg != 0)[:, None, :]
          & (q_pos[:, :, None] >= kv_pos[:, None, :]))
  return mask[:, None, None]


def _scores(q, k):
  """q [B, bq, K, G, H] . k [B, bk, K, H] -> [B, K, G, bq, bk] float32, scaled by 1/sqrt(H)."""
  s = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
  return s * q.shape[-1] ** -0.5


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _flash(q, k, v, q_seg, kv_seg, q_pos, kv_pos, bq, bk):
  return _flash_forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, bq, bk)[0]


def _flash_forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, bq, bk):
  """q [B, T, K, G, H] -> (out [B, T, K, G, H], log-sum-exp [T / bq, B, K, G, bq])."""
  k_b, v_b, kv_seg_b, kv_pos_b = (_blocks(x, bk) for x in (k, v, kv_seg, kv_pos))
  q_seg_b, q_pos_b = _blocks(q_seg, bq), _blocks(q_pos, bq)
  first, end = _span(_visible_blocks(q_seg_b, q_pos_b, kv_seg_b, kv_pos_b))
  batch, _, kv_heads, groups, head_dim = q.shape
  take = lambda x, j: jax.lax.dynamic_index_in_dim(x, j, keepdims=False)

  def one_query_block(inputs):
    q_blk, seg, pos, first, end = inputs

    def step(j, carry):
      top, total, acc = carry  # running max, sum of exp(score - max), weighted values
      v_blk = take(v_b, j)
      s = _scores(q_blk, take(k_b, j))
      s = jnp.where(_block_mask(seg, take(kv_seg_b, j), pos, take(kv_pos_b, j)), s, -jnp.inf)
      new_top = jnp.maximum(top, s.max(axis=-1))
      shift = jnp.where(jnp.isneginf(new_top), 0.0, new_top)  # rows that have seen nothing yet
      p = jnp.exp(s - shift[..., None])
      rescale = jnp.exp(top - shift)
      total = rescale * total + p.sum(axis=-1)
      acc = rescale[..., None] * acc + jnp.einsum(
          "bkgts,bskh->bkgth", p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
      return new_top, total, acc

    shape = (batch, kv_heads, groups, bq)
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape + (head_dim,), jnp.float32))
    top, total, acc = jax.lax.fori_loop(first, end, step, init)
    seen = total != 0  # NaN counts as seen: a NaN input must come out as NaN, not be hidden
    safe_total = jnp.where(seen, total, 1.0)
    out = jnp.where(seen[..., None], acc / safe_total[..., None], 0.0)
    lse = jnp.where(seen, top + jnp.log(safe_total), 0.0)
    return jnp.einsum("bkgth->btkgh", out).astype(q.dtype), lse

  out, lse = jax.lax.map(one_query_block, (_blocks(q, bq), q_seg_b, q_pos_b, first, end))
  return _unblock(out), lse


def _flash_fwd(q, k, v, q_seg, kv_seg, q_pos, kv_pos, bq, bk):
  out, lse = _flash_forward(q, k, v, q_seg, kv_seg, q_pos, kv_pos, bq, bk)
  return out, (q, k, v, q_seg, kv_seg, q_pos, kv_pos, out, lse)


def _flash_bwd(bq, bk, residuals, d_out):
  """Gradients block by block: for each key block, a pass over the query blocks that see it
  recomputes the probabilities from the saved log-sum-exp and accumulates dK, dV; dQ accumulates
  across the passes."""
  q, k, v, q_seg, kv_seg, q_pos, kv_pos, out, lse = residuals
  # D = rowsum(dO * O): the softmax backward's correction term, [B, T, K, G] -> [nq, B, K, G, bq].
  correction = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  correction = jnp.einsum("nbtkg->nbkgt", _blocks(correction, bq))
  q_b, do_b, q_seg_b, q_pos_b = (_blocks(x, bq) for x in (q, d_out, q_seg, q_pos))
  kv_seg_b, kv_pos_b = _blocks(kv_seg, bk), _blocks(kv_pos, bk)
  first, end = _span(_visible_blocks(q_seg_b, q_pos_b, kv_seg_b, kv_pos_b).T)
  scale = q.shape[-1] ** -0.5
  take = lambda x, i: jax.lax.dynamic_index_in_dim(x, i, keepdims=False)

  def one_key_block(d_q, inputs):
    k_blk, v_blk, kv_seg_blk, kv_pos_blk, first, end = inputs

    def step(i, carry):
      dk, dv, d_q = carry
      q_blk, do_blk = take(q_b, i), take(do_b, i)
      s = _scores(q_blk, k_blk)
      mask = _block_mask(take(q_seg_b, i), kv_seg_blk, take(q_pos_b, i), kv_pos_blk)
      p = jnp.where(mask, jnp.exp(s - take(lse, i)[..., None]), 0.0)
      dv = dv + jnp.einsum("bkgts,btkgh->bskh", p.astype(do_blk.dtype), do_blk,
                           preferred_element_type=jnp.float32)
      dp = jnp.einsum("btkgh,bskh->bkgts", do_blk, v_blk, preferred_element_type=jnp.float32)
      ds = p * (dp - take(correction, i)[..., None])
      dq_blk = take(d_q, i) + scale * jnp.einsum(
          "bkgts,bskh->btkgh", ds.astype(k_blk.dtype), k_blk, preferred_element_type=jnp.float32)
      dk = dk + scale * jnp.einsum("bkgts,btkgh->bskh", ds.astype(q_blk.dtype), q_blk,
                                   preferred_element_type=jnp.float32)
      return dk, dv, jax.lax.dynamic_update_index_in_dim(d_q, dq_blk, i, axis=0)

    zeros = jnp.zeros(k_blk.shape, jnp.float32)
    dk, dv, d_q = jax.lax.fori_loop(first, end, step, (zeros, zeros, d_q))
    return d_q, (dk, dv)

  d_q = jnp.zeros(q_b.shape, jnp.float32)
  d_q, (d_k, d_v) = jax.lax.scan(
      one_key_block, d_q, (_blocks(k, bk), _blocks(v, bk), kv_seg_b, kv_pos_b, first, end))
  return (_unblock(d_q).astype(q.dtype), _unblock(d_k).astype(k.dtype),
          _unblock(d_v).astype(v.dtype), None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)
