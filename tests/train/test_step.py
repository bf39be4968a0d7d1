"""The shared train step: gradient accumulation over microbatches, and the token cross-entropy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmtrain.losses import lm_loss
from lmtrain.model import transformer
from lmtrain.train.state import TrainState
import util


def test_gradient_accumulation_matches_one_big_batch():
  mesh = util.mesh_of({"data": 2, "fsdp": 2, "tensor": 2})
  # Rows with very different token counts: a mean of per-microbatch means would differ.
  batch = util.packed_batch(batch_size=16, seed=3)
  batch["loss_mask"][::3, 10:] = 0.0
  params = util.init_params()
  results = []
  for micro in (1, 4):
    # eps 1e-4: see test_sharding.train_three_steps (Adam amplifies 1-ulp near-zero gradients).
    step, shardings, batch_sharding, optimizer, *_ = util.sharded_setup(
        mesh, microbatches=micro, eps=1e-4)
    state = jax.jit(lambda p: TrainState.create(p, optimizer, jax.random.PRNGKey(0)),
                    out_shardings=shardings)(params)
    new_state, metrics = step(state, jax.device_put(batch, batch_sharding))
    results.append((float(metrics["loss"]), float(metrics["grad_norm"]),
                    jax.device_get(new_state.params)))
  (l1, g1, p1), (l4, g4, p4) = results
  assert l4 == pytest.approx(l1, rel=1e-6)
  assert g4 == pytest.approx(g1, rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), p4, p1)


def test_lm_loss_matches_hand_computation():
  """Summed cross-entropy over masked tokens, checked against log-softmax by hand."""
  cfg = util.TINY
  graphdef, _, _ = transformer.abstract_model(cfg)
  model = transformer.merge(graphdef, util.init_params())
  batch = {k: jnp.asarray(v) for k, v in util.packed_batch(batch_size=2, seq_len=16).items()}
  loss_sum, weight, _ = lm_loss(model, batch, None)
  logits = np.asarray(model(batch["inputs"], batch["positions"], batch["segment_ids"]),
                      np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  picked = np.take_along_axis(logp, np.asarray(batch["targets"])[..., None], -1)[..., 0]
  mask = np.asarray(batch["loss_mask"])
  assert float(weight) == mask.sum()
  assert float(loss_sum) == pytest.approx(-(picked * mask).sum(), rel=1e-5)
