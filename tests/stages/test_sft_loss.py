"""SFT's loss: response tokens only, a token mean over the whole global batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmtrain.losses import lm_loss
from lmtrain.model import transformer
import util


def test_prompt_targets_change_neither_loss_nor_gradients():
  graphdef, _, _ = transformer.abstract_model(util.TINY)
  params = util.init_params()
  batch = util.packed_batch(batch_size=4, seq_len=32, seed=1)
  batch["loss_mask"][:, :12] = 0.0  # the first 12 targets of each row are "prompt"

  def loss(p, b):
    s, w, _ = lm_loss(transformer.merge(graphdef, p), b, None)
    return s / w

  changed = {k: v.copy() for k, v in batch.items()}
  changed["targets"][:, :12] = (changed["targets"][:, :12] + 7) % util.TINY.vocab_size
  l1, g1 = jax.value_and_grad(loss)(params, batch)
  l2, g2 = jax.value_and_grad(loss)(params, changed)
  assert float(l1) == float(l2)
  jax.tree.map(np.testing.assert_array_equal, g1, g2)
  # ... while a response target does change it.
  changed["targets"][:, 20] = (changed["targets"][:, 20] + 7) % util.TINY.vocab_size
  assert float(loss(params, changed)) != float(l1)


def test_loss_is_a_token_mean_over_the_whole_batch_not_a_mean_of_example_means():
  graphdef, _, _ = transformer.abstract_model(util.TINY)
  model = transformer.merge(graphdef, util.init_params())
  batch = {k: jnp.asarray(v) for k, v in util.packed_batch(batch_size=2, seq_len=16).items()}
  mask = np.zeros((2, 16), np.float32)
  mask[0, 3:5] = 1.0  # 2 response tokens in row 0
  mask[1, 2:12] = 1.0  # 10 in row 1
  batch["loss_mask"] = jnp.asarray(mask)
  logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
  nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)),
                            np.asarray(batch["targets"])[..., None], -1)[..., 0]
  loss_sum, weight, _ = lm_loss(model, batch, None)
  assert float(weight) == 12.0
  assert float(loss_sum / weight) == pytest.approx((nll * mask).sum() / 12.0, rel=1e-5)
  per_example_means = ((nll * mask).sum(1) / mask.sum(1)).mean()
  assert abs(float(loss_sum / weight) - per_example_means) > 1e-4
