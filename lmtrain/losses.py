"""Losses and eval metrics that several stages share, in the loss contract of lmtrain/train/step.py."""

import functools
import math

import jax
import jax.numpy as jnp
import optax

from lmtrain.model.transformer import dense

# The entry of a loss's metric sums that holds the weight they are sums over, when that is not the
# loss's own (a ranking loss averages rankings while its accuracy counts their pairs).
METRIC_WEIGHT = "metric_weight"


def position_blocks(x, chunk: int):
  """[B, T, ...] -> [n, B, block, ...]: n = ceil(T / chunk) blocks of one size, block =
  ceil(T / n) <= chunk, T zero-padded by fewer than n positions. (Padding T to a multiple of
  `chunk` instead would compute up to chunk - 1 positions of nothing, and for T < chunk, as with
  a response of 32 tokens and logits_chunk 1024, mostly nothing.)"""
  length = x.shape[1]
  n = -(-length // chunk)
  block = -(-length // n)
  x = jnp.pad(x, [(0, 0), (0, n * block - length)] + [(0, 0)] * (x.ndim - 2))
  return x.reshape(x.shape[0], n, block, *x.shape[2:]).swapaxes(0, 1)


def unblock_positions(x, length: int):
  """[n, B, chunk] -> [B, length]."""
  return x.swapaxes(0, 1).reshape(x.shape[1], -1)[:, :length]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def token_cross_entropy(hidden, head, targets, chunk: int):
  """[B, T] cross-entropy of `targets` under softmax(hidden @ head) in fp32, `chunk` positions at a
  time: forward and backward hold one [B, chunk, vocab] block of logits, never [B, T, vocab]. The
  backward recomputes each block's logits from the saved log-sum-exp."""
  return _ce_forward(hidden, head, targets, chunk)[0]


def _ce_forward(hidden, head, targets, chunk):
  def block(_, xs):
    h, y = xs
    logits = dense(h, head).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
    return None, (lse - picked, lse)

  _, (ce, lse) = jax.lax.scan(block, None, (position_blocks(hidden, chunk),
                                            position_blocks(targets, chunk)))
  length = hidden.shape[1]
  return unblock_positions(ce, length), unblock_positions(lse, length)


def _ce_fwd(hidden, head, targets, chunk):
  ce, lse = _ce_forward(hidden, head, targets, chunk)
  return ce, (hidden, head, targets, lse)


def _ce_bwd(chunk, residuals, grad):
  hidden, head, targets, lse = residuals
  vocab = head.shape[-1]

  def block(grad_head, xs):
    h, y, block_lse, g = xs
    logits = dense(h, head).astype(jnp.float32)
    # d ce / d logits = softmax - onehot(target), times the incoming gradient.
    grad_logits = (jnp.exp(logits - block_lse[..., None])
                   - jax.nn.one_hot(y, vocab, dtype=jnp.float32)) * g[..., None]
    grad_h = dense(grad_logits.astype(head.dtype), head.T)
    grad_head = grad_head + (h.reshape(-1, h.shape[-1]).astype(jnp.float32).T
                             @ grad_logits.reshape(-1, vocab))
    return grad_head, grad_h

  grad_head, grad_hidden = jax.lax.scan(
      block, jnp.zeros(head.shape, jnp.float32),
      (position_blocks(hidden, chunk), position_blocks(targets, chunk), position_blocks(lse, chunk),
       position_blocks(grad.astype(jnp.float32), chunk)))
  grad_hidden = grad_hidden.swapaxes(0, 1).reshape(hidden.shape[0], -1, hidden.shape[-1])
  return (grad_hidden[:, :hidden.shape[1]].astype(hidden.dtype), grad_head.astype(head.dtype),
          None)


token_cross_entropy.defvjp(_ce_fwd, _ce_bwd)


def lm_loss(model, batch, rng):
  """Summed token cross-entropy where loss_mask is 1, and the number of such tokens. With the
  model's logits_chunk, the vocabulary projection runs a block of positions at a time. `rng`: the
  training step's key for the adapters' dropout (None in evaluation)."""
  chunk = model.cfg.logits_chunk
  if chunk:
    hidden = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"], rng)
    ce = token_cross_entropy(hidden, model.head_matrix(), batch["targets"], chunk)
  else:
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"], rng)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  weight = batch["loss_mask"]
  return jnp.sum(ce * weight), jnp.sum(weight), {}


def perplexity_metrics(totals: dict) -> dict:
  loss = totals["loss_sum"] / max(totals["weight"], 1e-9)
  return {"eval_perplexity": math.exp(min(loss, 80.0))}


def mean_metrics(*names: str):
  """eval_metrics for stages whose metric sums are weighted by the batch's weight: eval_<name>
  is each sum over the total weight (the metrics' own, METRIC_WEIGHT, when the loss gives it)."""
  def metrics(totals: dict) -> dict:
    weight = totals.get(METRIC_WEIGHT, totals["weight"])
    return {f"eval_{k}": totals[k] / max(weight, 1e-9) for k in names}
  return metrics
