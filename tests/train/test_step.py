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


HEAD_ONLY = ["final_norm/scale", "lm_head"]


def frozen_setup(mesh, trainable):
  """(jitted step, state) training only the parameters `trainable` names, on `mesh`."""
  import optax
  from lmtrain import parallel
  from lmtrain.train import optim
  from lmtrain.train.state import state_shardings
  from lmtrain.train.step import make_train_step
  graphdef, abstract_params, names = transformer.abstract_model(util.TINY)
  schedule = optax.constant_schedule(1e-2)
  optimizer = optim.make_optimizer(schedule, trainable=optim.trainable_fn(trainable))
  abstract_state = jax.eval_shape(
      lambda p: TrainState.create(p, optimizer, jax.random.PRNGKey(0)), abstract_params)
  shardings = state_shardings(mesh, parallel.axis_rules(), abstract_state, names)
  step = make_train_step(graphdef, lm_loss, optimizer, schedule,
                         trainable=optim.trainable_fn(trainable))
  batch_sharding = parallel.batch_sharding(mesh, parallel.axis_rules())
  with parallel.activate(mesh, parallel.axis_rules()):
    jitted = jax.jit(step, in_shardings=(shardings, batch_sharding),
                     out_shardings=(shardings, parallel.replicated(mesh)))
  state = jax.jit(lambda p: TrainState.create(p, optimizer, jax.random.PRNGKey(0)),
                  out_shardings=shardings)(util.init_params())
  return jitted, state, batch_sharding


def opt_elements(state):
  return sum(int(x.size) for x in jax.tree.leaves(state.opt_state) if x.ndim)


def test_frozen_parameters_keep_their_values_and_get_no_optimizer_state():
  from lmtrain.train import optim
  params = util.init_params()
  batch = util.packed_batch(batch_size=8, seed=5)
  runs = []
  for shape in ({"data": 1, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2}):
    step, state, batch_sharding = frozen_setup(util.mesh_of(shape), HEAD_ONLY)
    norms, losses = [], []
    for _ in range(3):
      state, metrics = step(state, jax.device_put(batch, batch_sharding))
      norms.append(float(metrics["grad_norm"]))
      losses.append(float(metrics["loss"]))
    runs.append((state, norms, losses))
  (state, norms, losses), (state_8, _, losses_8) = runs
  # The same steps on 1 device and on (2, 2, 2).
  np.testing.assert_allclose(losses_8, losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               jax.device_get(state_8.params), jax.device_get(state.params))
  # AdamW keeps its two moments for the trained elements only (64 + 64 x 128 of the 140k).
  _, full_state, _ = frozen_setup(util.mesh_of({"data": 1, "fsdp": 1, "tensor": 1}), "all")
  assert opt_elements(state) == 2 * (64 + 64 * 128)
  assert opt_elements(full_state) == 2 * sum(int(x.size) for x in jax.tree.leaves(params))
  new = jax.device_get(state.params)
  for path, before in jax.tree_util.tree_leaves_with_path(params):
    after = new
    for k in path:
      after = after[k.key]
    name = optim.param_path(path)
    if name in HEAD_ONLY:
      assert not np.array_equal(after, before), name
    else:  # left bit for bit as loaded
      np.testing.assert_array_equal(after, np.asarray(before), err_msg=name)
  # The gradient norm is over the trained parameters only: the head's part of the full gradient.
  graphdef, _, _ = transformer.abstract_model(util.TINY)

  def mean_loss(p):
    loss_sum, weight, _ = lm_loss(transformer.merge(graphdef, p),
                                  jax.tree.map(jnp.asarray, batch), None)
    return loss_sum / weight

  grads = jax.grad(mean_loss)(params)
  head = float(jnp.sqrt(jnp.sum(grads["final_norm"]["scale"] ** 2) + jnp.sum(grads["lm_head"] ** 2)))
  assert norms[0] == pytest.approx(head, rel=1e-4)


def test_trainable_patterns_that_match_nothing_or_do_not_parse_are_one_line_errors():
  from lmtrain.errors import UserError
  from lmtrain.train import optim
  params = util.init_params()
  mask = optim.trainable_mask(params, ["layers/mlp/.*"])
  assert mask["layers"]["mlp"] == {"down": True, "gate": True, "up": True}
  assert not mask["layers"]["attn"]["q"] and not mask["embed"]
  with pytest.raises(UserError, match=r"TRAINABLE: 'head' matches no parameter; the parameters "
                                      r"are embed, final_norm/scale, layers/attn/k, "):
    optim.trainable_mask(params, ["lm_head", "head"])
  with pytest.raises(UserError, match=r"TRAINABLE: 'lm_head\[' is not a regular expression"):
    optim.trainable_mask(params, ["lm_head["])


def test_throughput_and_activations_count_every_sequence_an_example_reads():
  """A reward model's ranking of K responses reads K sequences; DPO's pair reads 2, and its frozen
  reference adds a forward pass (a third of a trained one) per token."""
  from lmtrain.train.step import LossStep
  mesh = util.mesh_of({"data": 2, "fsdp": 2, "tensor": 2})
  flops = util.TINY.flops_per_token(64)
  assert LossStep(util.TINY, lm_loss).work(8, 64) == (8 * 64, flops)
  assert LossStep(util.TINY, lm_loss, rows_per_example=4).work(8, 64) == (4 * 8 * 64, flops)
  tokens, dpo_flops = LossStep(util.TINY, lm_loss, frozen_reference=True,
                               rows_per_example=2).work(8, 64)
  assert tokens == 2 * 8 * 64 and dpo_flops == pytest.approx(flops * 4 / 3)
  # Activations: one microbatch's rows on each of the mesh's 4 batch shards (data x fsdp).
  assert LossStep(util.TINY, lm_loss, rows_per_example=4).memory(mesh, 8, 64, 2)[1] == (4, 64)
  assert LossStep(util.TINY, lm_loss).memory(mesh, 8, 64, 2)[1] == (1, 64)
