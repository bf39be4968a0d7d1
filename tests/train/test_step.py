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


def full_gradient(params, batch):
  """The gradient of the mean LM loss with respect to every parameter, frozen or not."""
  graphdef, _, _ = transformer.abstract_model(util.TINY)

  def mean_loss(p):
    loss_sum, weight, _ = lm_loss(transformer.merge(graphdef, p),
                                  jax.tree.map(jnp.asarray, batch), None)
    return loss_sum / weight

  return jax.grad(mean_loss)(params)


def frozen_setup(mesh, trainable, trainable_layers=None):
  """(jitted step, state) training only the parameters `trainable` names (of the stacked ones
  only the last `trainable_layers` layers), on `mesh`."""
  import optax
  from lmtrain import parallel
  from lmtrain.train import optim
  from lmtrain.train.state import state_shardings
  from lmtrain.train.step import make_train_step
  graphdef, abstract_params, names = transformer.abstract_model(util.TINY)
  schedule = optax.constant_schedule(1e-2)
  optimizer = optim.make_optimizer(schedule, trainable=optim.trainable_fn(trainable),
                                   trainable_layers=trainable_layers)
  abstract_state = jax.eval_shape(
      lambda p: TrainState.create(p, optimizer, jax.random.PRNGKey(0)), abstract_params)
  shardings = state_shardings(mesh, parallel.axis_rules(), abstract_state, names)
  step = make_train_step(graphdef, lm_loss, optimizer, schedule,
                         trainable=optim.trainable_fn(trainable), trainable_layers=trainable_layers)
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
  grads = full_gradient(params, batch)
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


def test_trainable_layers_train_the_last_layers_only_the_same_on_any_mesh():
  """TRAINABLE_LAYERS=1 with patterns naming the layers and the head: the first of the 2 stacked
  layers stays bit for bit as loaded (no gradient, and no weight decay), the last one and the
  head train, the embedding and the final norm (not named) are frozen."""
  from lmtrain.train import optim
  trainable = ["layers/.*", "lm_head"]
  params = jax.device_get(util.init_params())
  batch = util.packed_batch(batch_size=8, seed=5)
  runs = []
  for shape in ({"data": 1, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2}):
    step, state, batch_sharding = frozen_setup(util.mesh_of(shape), trainable, trainable_layers=1)
    norms, losses = [], []
    for _ in range(2):
      state, metrics = step(state, jax.device_put(batch, batch_sharding))
      norms.append(float(metrics["grad_norm"]))
      losses.append(float(metrics["loss"]))
    runs.append((jax.device_get(state), norms, losses))
  (state, norms, losses), (state_8, _, losses_8) = runs
  np.testing.assert_allclose(losses_8, losses, rtol=1e-5)
  for path, before in jax.tree_util.tree_leaves_with_path(params):
    name = optim.param_path(path)
    after = state.params
    for k in path:
      after = after[k.key]
    if name.startswith("layers/"):
      np.testing.assert_array_equal(after[0], before[0], err_msg=name)
      assert not np.array_equal(after[1], before[1]), name
    elif name == "lm_head":
      assert not np.array_equal(after, before), name
    else:
      np.testing.assert_array_equal(after, before, err_msg=name)
  # The stacked leaves keep AdamW moments for every layer (the saving is per leaf).
  layer_elements = sum(int(x.size) for x in jax.tree.leaves(params["layers"]))
  assert opt_elements(state) == 2 * (layer_elements + params["lm_head"].size)
  # The start-up block's count: the first layer is frozen.
  mask = optim.trainable_fn(trainable)(params)
  assert optim.trained_count(params, mask, 1) == layer_elements // 2 + params["lm_head"].size
  total = sum(int(x.size) for x in jax.tree.leaves(params))
  assert optim.trained_count(params, None, 1) == total - layer_elements // 2
  # The gradient norm is over the trained part only: the last layer's and the head's.
  grads = full_gradient(params, batch)
  trained = [g[1] for g in jax.tree.leaves(grads["layers"])] + [grads["lm_head"]]
  expected = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in trained)))
  assert norms[0] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("value, message", [
    ("0", "TRAINABLE_LAYERS=0: must be at least 1"),
    ("1.5", "TRAINABLE_LAYERS=1.5: must be a whole number"),
    ("'last'", "TRAINABLE_LAYERS='last': must be a whole number"),
    ("3", "TRAINABLE_LAYERS=3 must be None (every layer) or a whole number from 1 to the model's "
          "2 layers"),
])
def test_bad_trainable_layers_are_one_line_errors(value, message):
  import gin
  from lmtrain import config
  from lmtrain.errors import UserError
  from lmtrain.train.step import LossStep
  try:
    with pytest.raises(UserError) as error:
      config.setup("sft", macros={"MODEL": "tiny", "TRAINABLE_LAYERS": value})
      LossStep(util.TINY, lm_loss)  # the model's layers are known once the stage is built
  finally:
    gin.clear_config()
  assert str(error.value) == message


def test_rl_stages_refuse_trainable_layers_in_one_line(tmp_path):
  import gin
  from lmtrain import config
  from lmtrain.errors import UserError
  from lmtrain.stages import get_stage_builder
  from lmtrain.train.loop import LoopConfig
  config.setup("grpo", macros={"MODEL": "tiny", "TRAINABLE_LAYERS": "1"})
  try:
    with gin.config_scope("grpo"), pytest.raises(UserError) as error:
      config.call(get_stage_builder("grpo"), "grpo", str(tmp_path),
                  config.call(transformer.model_config, "model_config"),
                  config.call(LoopConfig, "LoopConfig"))
  finally:
    gin.clear_config()
  assert str(error.value).splitlines()[0].startswith(
      "TRAINABLE_LAYERS=1: grpo does not restrict training to the last layers")


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
