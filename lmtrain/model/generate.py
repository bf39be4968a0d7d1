"""Jitted KV-cache sampling: greedy, temperature, top-k and top-p, per-sequence EOS, batch-sharded.

Prompts come as one int32 [B, P] array with their lengths [B] (each >= 1). By default rows are
right-padded (the prompt's tokens first, padding after); `left_padded=True` takes rows whose padding
comes first. Either way every sequence sees positions 0..len-1 over its own tokens, so the padding and
the width P change nothing. `pad_prompts` builds the array from ragged lists of ids.

One compiled program runs the prefill (the whole padded prompt in one pass, filling the KV cache) and
then a `lax.while_loop` of one-token decode steps that stops when every sequence has produced EOS or
`max_new_tokens` are out. `make_generate` compiles it once for a mesh and fixed shapes.
"""

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmtrain import parallel
from lmtrain.model import transformer


class GenerateOutput(NamedTuple):
  tokens: jax.Array  # int32 [B, N]: generated tokens, pad_id after the first EOS
  logprobs: jax.Array  # float32 [B, N]: log p(token) under softmax(logits / temperature); 0 after it
  mask: jax.Array  # int32 [B, N]: 1 for generated tokens up to and including the first EOS
  lengths: jax.Array  # int32 [B]: generated tokens per sequence (the sum of mask)
  done: jax.Array  # bool [B]: whether the sequence produced EOS


def pad_prompts(prompts: Sequence[Sequence[int]], width: int | None = None, pad_id: int = 0,
                left: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Ragged lists of ids -> (int32 [B, width] padded prompts, int32 [B] lengths).

  width defaults to the longest prompt. left=True puts the padding first (then pass
  `left_padded=True` to generate).
  """
  lengths = np.array([len(p) for p in prompts], np.int32)
  width = int(lengths.max()) if width is None else width
  if lengths.min() < 1 or lengths.max() > width:
    raise ValueError(f"prompt lengths must be in 1..{width}, got {lengths.tolist()}")
  out = np.full((len(prompts), width), pad_id, np.int32)
  for row, ids in zip(out, prompts):
    if left:
      row[width - len(ids):] = ids
    else:
      row[:len(ids)] = ids
  return out, lengths


def filter_logits(logits, top_k: int = 0, top_p: float = 1.0):
  """Sets logits [..., V] outside the top-k, then outside the top-p nucleus, to -inf.

  The nucleus is the smallest set of highest-probability tokens whose mass reaches top_p (always at
  least the top token). Tokens tied with the last one kept are kept too. top_k=0 and top_p=1 disable
  each filter.
  """
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    ranked = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_above = jnp.cumsum(probs, axis=-1) - probs  # probability of the strictly better ranks
    n_keep = jnp.maximum(jnp.sum(mass_above < top_p, axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(ranked, n_keep - 1, axis=-1)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def sample_logits(logits, rng, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  greedy: bool = False):
  """Next tokens [B] from logits [B, V], and their log-probs [B] under softmax(logits / temperature).

  The log-probs ignore the top-k/top-p filters: they are the policy's, which RLHF losses compare.
  """
  scaled = logits.astype(jnp.float32) / temperature
  if greedy:
    tokens = jnp.argmax(scaled, axis=-1)
  else:
    tokens = jax.random.categorical(rng, filter_logits(scaled, top_k, top_p), axis=-1)
  tokens = tokens.astype(jnp.int32)
  logprobs = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tokens[:, None], axis=-1)
  return tokens, logprobs[:, 0]


def _right_align(prompts, lengths):
  """Left-padded rows -> right-padded rows (rotates each row by its padding)."""
  width = prompts.shape[1]
  index = (jnp.arange(width)[None, :] + (width - lengths)[:, None]) % width
  return jnp.take_along_axis(prompts, index, axis=1)


_STATIC = ("graphdef", "max_new_tokens", "temperature", "top_k", "top_p", "greedy", "eos_id",
           "pad_id", "left_padded", "share")


def sample_sequences(graphdef, params, prompts, prompt_lengths, rng, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
             eos_id: int = 1, pad_id: int = 0, left_padded: bool = False,
             share: int = 1) -> GenerateOutput:
  """Samples up to `max_new_tokens` after each prompt, with a KV cache.

  Args:
    graphdef: the model's graph (transformer.abstract_model or split_params).
    params: the model's params as a pure dict.
    prompts: int32 [B, P], right-padded unless `left_padded` (see the module docstring).
    prompt_lengths: int32 [B], real tokens per row, each in 1..P.
    rng: a PRNG key; the same key gives the same samples (on any mesh).
    max_new_tokens: N, the most tokens generated per sequence.
    temperature: divides the logits, for sampling and for the returned log-probs.
    top_k: sample among the k most likely tokens only (0: all).
    top_p: sample within the nucleus of this probability mass only (1: all).
    greedy: take the argmax instead of sampling (log-probs still use `temperature`).
    eos_id: the token that ends a sequence; a negative id never matches (always N tokens).
    pad_id: fills the tokens after EOS (the prompt padding may hold any id).
    left_padded: the prompt rows have their padding first.
    share: each `share` consecutive rows hold the same prompt (several samples of one prompt):
      the prefill runs on one row of each and its KV cache is repeated for the others.

  Returns:
    GenerateOutput with [B, N] tokens, logprobs, mask and [B] lengths, done.

  Under `parallel.activate(mesh, rules)` the batch follows the `batch` logical axis; `make_generate`
  compiles this once for a mesh with explicit shardings.
  """
  model = transformer.merge(graphdef, params)
  batch, width = prompts.shape
  lengths = prompt_lengths.astype(jnp.int32)
  prompts = prompts.astype(jnp.int32)
  if left_padded:
    prompts = _right_align(prompts, lengths)
  prompts = parallel.constrain(prompts, ("batch", "length"))
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p,
                             greedy=greedy)

  # The last sampled token is never fed back, so the cache needs one slot less than the total.
  hidden, cache = model.prefill(transformer.first_of_groups(prompts, share),
                                width + max_new_tokens - 1)
  last = jnp.take_along_axis(
      hidden, (transformer.first_of_groups(lengths, share) - 1)[:, None, None], axis=1)
  last = transformer.repeat_rows(last, share)
  cache = jax.tree.map(lambda x: transformer.repeat_rows(x, share, transformer.CACHE_AXES), cache)
  # XLA:CPU hands each matmul a contiguous operand, so a layer's weights sliced from the stacked
  # ones inside the loop would be copied out on every step: slice them once before it. Elsewhere
  # the slices fuse into their matmuls and a hoisted copy would only cost memory.
  layers = model.decode_layers() if jax.default_backend() == "cpu" else None

  def record(i, logits, out):
    """Samples token i from `logits` and writes it (or padding, once done) into the outputs."""
    tokens, logprobs, mask, done = out
    token, logprob = sample(logits, jax.random.fold_in(rng, i))
    token = jnp.where(done, pad_id, token)
    write = lambda buf, col: jax.lax.dynamic_update_slice_in_dim(buf, col[:, None], i, axis=1)
    tokens = write(tokens, token)
    logprobs = write(logprobs, jnp.where(done, 0.0, logprob))
    mask = write(mask, (~done).astype(jnp.int32))
    return tokens, logprobs, mask, done | (token == eos_id)

  shape = (batch, max_new_tokens)
  out = (jnp.full(shape, pad_id, jnp.int32), jnp.zeros(shape, jnp.float32),
         jnp.zeros(shape, jnp.int32), jnp.zeros((batch,), bool))
  out = record(0, model.logits(last)[:, 0], out)

  def not_finished(carry):
    i, _, out = carry
    return (i < max_new_tokens) & _any_decoding(out[3])

  def decode(carry):
    i, cache, out = carry
    previous = jax.lax.dynamic_slice_in_dim(out[0], i - 1, 1, axis=1)
    hidden, cache = model.decode(previous, cache, lengths + i - 1, layers)
    return i + 1, cache, record(i, model.logits(hidden)[:, 0], out)

  _, _, (tokens, logprobs, mask, done) = jax.lax.while_loop(
      not_finished, decode, (jnp.int32(1), cache, out))
  return GenerateOutput(tokens, logprobs, mask, mask.sum(axis=1), done)


def _any_decoding(done):
  """Whether a row has yet to produce EOS: the decode loop's condition, taken identically on
  every device.

  Under a mesh each device counts the unfinished rows of its own copy of its batch block and one
  integer all-reduce over every mesh axis adds the counts up. `~jnp.all(done)` would reduce over
  the batch shards only, each replica group on its own copy: should the copies of a block that the
  tensor axis replicates ever differ, the groups would run different numbers of iterations and wait
  for each other's tensor-parallel collectives for good (XLA:CPU stopped a 2 x 2 x 2 mesh so)."""
  active = parallel.active()
  if active is None:
    return ~jnp.all(done)
  mesh, rules = active
  spec = parallel.logical_to_spec(("batch",), rules, mesh, done.shape)

  def count(block):
    return jax.lax.psum(jnp.sum(~block, dtype=jnp.int32), mesh.axis_names)

  pending = jax.shard_map(count, mesh=mesh, in_specs=spec, out_specs=jax.sharding.PartitionSpec(),
                          check_vma=False)(done)
  return pending > 0


# Jitted on its own; a caller that traces a larger function (a rollout) calls sample_sequences.
generate = jax.jit(sample_sequences, static_argnames=_STATIC)


def make_generate(mesh, rules, cfg: transformer.ModelConfig, batch_size: int, prompt_len: int,
                  **sampling):
  """`generate` for `cfg`, compiled once for `mesh` and [batch_size, prompt_len] prompts.

  `sampling` are generate's keyword arguments (max_new_tokens is required). Returns a function
  (params, prompts, prompt_lengths, rng) -> GenerateOutput, rng a jax.random.PRNGKey. The params
  must be sharded as `parallel.tree_shardings(mesh, abstract_params, names, rules)` lays them out
  (as a train state's are); prompts, lengths and the outputs are split over the `batch` logical axis.
  """
  graphdef, abstract_params, names = transformer.abstract_model(cfg)
  param_shardings = parallel.tree_shardings(mesh, abstract_params, names, rules)
  rows = parallel.named_sharding(mesh, ("batch", None), rules, (batch_size, prompt_len))
  per_row = parallel.named_sharding(mesh, ("batch",), rules, (batch_size,))
  replicated = parallel.replicated(mesh)
  fn = functools.partial(sample_sequences, graphdef, **sampling)
  with parallel.activate(mesh, rules):
    jitted = jax.jit(fn, in_shardings=(param_shardings, rows, per_row, replicated),
                     out_shardings=GenerateOutput(rows, rows, rows, per_row, per_row))
    abstract = lambda shape, dtype, sharding: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    compiled = jitted.lower(
        jax.tree.map(lambda a, s: abstract(a.shape, a.dtype, s), abstract_params, param_shardings),
        abstract((batch_size, prompt_len), jnp.int32, rows),
        abstract((batch_size,), jnp.int32, per_row),
        abstract(key.shape, key.dtype, replicated)).compile()

  def run(params, prompts, prompt_lengths, rng):
    # Host arrays (the same on every host) become global ones, so this also runs on several hosts.
    return compiled(params, parallel.from_host(prompts, rows),
                    parallel.from_host(prompt_lengths, per_row),
                    parallel.from_host(jax.device_get(rng), replicated))

  return run
