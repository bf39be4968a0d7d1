"""KV-cache generation against full recomputation: tokens, log-probs, padding, meshes, EOS, sampling."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmtrain import parallel
from lmtrain.model import generate as gen
from lmtrain.model import transformer
import util

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [20], [30, 31, 32, 33]]
NEW = 6


@pytest.fixture(scope="module")
def model():
  graphdef, _, names = transformer.abstract_model(util.TINY)
  return graphdef, util.init_params(), names


@jax.jit
def _full_logits(params, tokens):
  graphdef = transformer.abstract_model(util.TINY)[0]
  return transformer.merge(graphdef, params)(tokens)


def full_logits(params, prompts, completions):
  """Logits of one forward pass over each prompt + completion, right-padded to a common width."""
  seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
  tokens, _ = gen.pad_prompts(seqs, width=max(len(p) for p in prompts) + NEW)
  return np.asarray(_full_logits(params, tokens))


def run(model, prompts=PROMPTS, width=None, left=False, **kwargs):
  graphdef, params, _ = model
  tokens, lengths = gen.pad_prompts(prompts, width=width, left=left)
  kwargs = {"max_new_tokens": NEW, "eos_id": -1, **kwargs}
  out = gen.generate(graphdef, params, tokens, lengths, jax.random.PRNGKey(0), left_padded=left,
                     **kwargs)
  return jax.device_get(out)


def test_greedy_equals_argmax_of_full_recomputation(model):
  out = run(model, greedy=True)
  for i in range(NEW):
    # Feed the sequences generated so far; the next greedy token is the argmax at the last one.
    logits = full_logits(model[1], PROMPTS, [t[:i] for t in out.tokens])
    for b, prompt in enumerate(PROMPTS):
      assert logits[b, len(prompt) + i - 1].argmax() == out.tokens[b, i], (b, i)
  assert (out.mask == 1).all() and (out.lengths == NEW).all() and not out.done.any()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_one_full_forward(model, temperature):
  out = run(model, temperature=temperature)
  logits = full_logits(model[1], PROMPTS, out.tokens)
  logp = jax.nn.log_softmax(logits / temperature, axis=-1)
  for b, prompt in enumerate(PROMPTS):
    expected = logp[b, len(prompt) - 1 + np.arange(NEW), out.tokens[b]]
    np.testing.assert_allclose(out.logprobs[b], expected, rtol=1e-5, atol=1e-5)


def test_padding_width_and_side_change_nothing(model):
  base = run(model)
  for width, left in [(12, False), (9, True), (7, True)]:
    other = run(model, width=width, left=left)
    np.testing.assert_array_equal(other.tokens, base.tokens)
    np.testing.assert_allclose(other.logprobs, base.logprobs, rtol=1e-5, atol=1e-5)


def test_same_results_on_one_device_and_a_2x2x2_mesh(model):
  _, params, names = model
  prompts = PROMPTS * 2
  tokens, lengths = gen.pad_prompts(prompts)
  rules = parallel.axis_rules()
  results = []
  for shape in ({"data": 1, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2}):
    mesh = util.mesh_of(shape)
    sampler = gen.make_generate(mesh, rules, util.TINY, *tokens.shape, max_new_tokens=NEW,
                                top_k=20, top_p=0.9, eos_id=-1)
    sharded = jax.device_put(params, parallel.tree_shardings(mesh, params, names, rules))
    results.append(jax.device_get(sampler(sharded, tokens, lengths, jax.random.PRNGKey(3))))
  one, many = results
  np.testing.assert_array_equal(many.tokens, one.tokens)
  np.testing.assert_allclose(many.logprobs, one.logprobs, rtol=1e-5, atol=1e-5)
  # Rows 4..7 repeat the prompts of rows 0..3 but draw their own samples.
  assert (one.tokens[:4] != one.tokens[4:]).any()


def test_eos_ends_each_sequence(model):
  free = run(model, greedy=True)
  eos = int(free.tokens[0, 2])  # sequence 0 now stops by step 2, the others where (if) they emit it
  out = run(model, greedy=True, eos_id=eos, pad_id=3)
  for b in range(len(PROMPTS)):
    hits = np.flatnonzero(free.tokens[b] == eos)
    n = hits[0] + 1 if hits.size else NEW
    np.testing.assert_array_equal(out.tokens[b, :n], free.tokens[b, :n])
    assert (out.tokens[b, n:] == 3).all() and (out.logprobs[b, n:] == 0).all()
    np.testing.assert_array_equal(out.mask[b], np.arange(NEW) < n)
    assert out.lengths[b] == n and out.done[b] == bool(hits.size)
  np.testing.assert_allclose(out.logprobs[out.mask == 1], free.logprobs[out.mask == 1], rtol=1e-6)
  # All sequences done: the loop stops early and the rest stays padding.
  alone = run(model, prompts=PROMPTS[:1], greedy=True, eos_id=eos)
  n = out.lengths[0]
  np.testing.assert_array_equal(alone.tokens[0], list(free.tokens[0, :n]) + [0] * (NEW - n))
  assert alone.done[0] and alone.lengths[0] == n


def test_filters_and_seeds(model):
  greedy = run(model, greedy=True)
  for kwargs in ({"top_k": 1}, {"top_p": 1e-6}):
    out = run(model, **kwargs)
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
    np.testing.assert_allclose(out.logprobs, greedy.logprobs, rtol=1e-6)
  graphdef, params, _ = model
  tokens, lengths = gen.pad_prompts(PROMPTS)
  sample = lambda seed: jax.device_get(gen.generate(
      graphdef, params, tokens, lengths, jax.random.PRNGKey(seed), max_new_tokens=NEW, eos_id=-1))
  np.testing.assert_array_equal(sample(0).tokens, sample(0).tokens)
  assert (sample(0).tokens != sample(1).tokens).any()


def test_filter_logits_by_hand():
  logits = jnp.log(jnp.array([[0.1, 0.4, 0.2, 0.3]]))
  kept = lambda **kw: np.isfinite(gen.filter_logits(logits, **kw))[0].tolist()
  assert kept(top_k=2) == [False, True, False, True]
  assert kept(top_p=0.65) == [False, True, False, True]  # 0.4 + 0.3 reaches 0.65
  assert kept(top_p=0.75) == [False, True, True, True]
  assert kept(top_p=0.0) == [False, True, False, False]
  assert kept(top_k=3, top_p=0.95) == [False, True, True, True]


def test_pad_prompts():
  right, lengths = gen.pad_prompts([[4, 5], [6]], width=3, pad_id=9)
  left, _ = gen.pad_prompts([[4, 5], [6]], width=3, pad_id=9, left=True)
  np.testing.assert_array_equal(right, [[4, 5, 9], [6, 9, 9]])
  np.testing.assert_array_equal(left, [[9, 4, 5], [9, 9, 6]])
  np.testing.assert_array_equal(lengths, [2, 1])
  with pytest.raises(ValueError):
    gen.pad_prompts([[4, 5, 6]], width=2)


@pytest.mark.parametrize("flags, expected", [
    ({"max_new_tokens": 0}, "--max_new_tokens 0: must be at least 1"),
    ({"temperature": -1.0}, "--temperature -1.0: must be 0 (greedy) or above"),
    ({"temperature": float("nan")}, "--temperature nan: must be 0 (greedy) or above"),
    ({"top_k": -2}, "--top_k -2: must be 0 (all tokens) or above"),
    ({"top_p": 2.0}, "--top_p 2.0: must be in (0, 1]"),
    ({"top_p": 0.0}, "--top_p 0.0: must be in (0, 1]"),
])
def test_sample_refuses_flags_out_of_range(flags, expected):
  import argparse
  from lmtrain import sample
  from lmtrain.errors import UserError
  parser = argparse.ArgumentParser()
  sample.add_arguments(parser)
  args = parser.parse_args(["--checkpoint", "x"])
  for k, v in flags.items():
    setattr(args, k, v)
  with pytest.raises(UserError, match=re.escape(expected)):
    sample.check_sampling(args)


def test_sample_temperature_zero_is_greedy():
  import argparse
  from lmtrain import sample
  parser = argparse.ArgumentParser()
  sample.add_arguments(parser)
  assert sample.check_sampling(parser.parse_args(["--checkpoint", "x", "--temperature", "0"])) == (
      1.0, True)
  assert sample.check_sampling(parser.parse_args(["--checkpoint", "x", "--temperature", "0.7"])) == (
      0.7, False)
