"""The same step on 1 device and on several 8-device meshes gives the same loss, grads and params."""

import dataclasses

import jax
import numpy as np
import pytest

from lmtrain import parallel
from lmtrain.losses import lm_loss
from lmtrain.model import transformer
from lmtrain.train.state import TrainState
import util

MESHES = [
    {"data": 8, "fsdp": 1, "tensor": 1},
    {"data": 1, "fsdp": 8, "tensor": 1},
    {"data": 2, "fsdp": 2, "tensor": 2},
    {"data": 1, "fsdp": 2, "tensor": 4},
]


def loss_and_grads(mesh, params, batch, cfg=util.TINY):
  rules = parallel.axis_rules()
  graphdef, _, names = transformer.abstract_model(cfg)
  p_shard = parallel.tree_shardings(mesh, params, names, rules)
  params = jax.device_put(params, p_shard)
  batch = jax.device_put(batch, parallel.batch_sharding(mesh, rules))

  def f(p, b):
    s, w, _ = lm_loss(transformer.merge(graphdef, p), b, None)
    return s / w

  with parallel.activate(mesh, rules):
    loss, grads = jax.jit(jax.value_and_grad(f))(params, batch)
  return float(loss), jax.device_get(grads), p_shard


def train_three_steps(mesh, params, batches):
  # AdamW's update g / (|g| + eps) maps a 1-ulp difference in a near-zero gradient (reductions run in
  # another order on another mesh) to an O(lr) difference; eps 1e-4 sets where "near zero" begins.
  step, shardings, batch_sharding, optimizer, *_ = util.sharded_setup(mesh, eps=1e-4)
  state = jax.jit(lambda p: TrainState.create(p, optimizer, jax.random.PRNGKey(0)),
                  out_shardings=shardings)(params)
  losses = []
  for b in batches:
    state, m = step(state, jax.device_put(b, batch_sharding))
    losses.append(float(m["loss"]))
  return losses, jax.device_get(state.params)


@pytest.fixture(scope="module")
def reference():
  params = util.init_params()
  batch = util.packed_batch()
  batches = [util.packed_batch(seed=s) for s in range(3)]
  one = util.mesh_of({"data": 1, "fsdp": 1, "tensor": 1})
  return params, batch, batches, loss_and_grads(one, params, batch)[:2], train_three_steps(
      one, params, batches)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(str(v) for v in s.values()))
def test_same_loss_grads_and_params_on_every_mesh(reference, shape):
  params, batch, batches, (loss1, grads1), (losses1, params1) = reference
  mesh = util.mesh_of(shape)
  loss, grads, p_shard = loss_and_grads(mesh, params, batch)
  assert loss == pytest.approx(loss1, rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, grads1)
  losses, params3 = train_three_steps(mesh, params, batches)
  np.testing.assert_allclose(losses, losses1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), params3, params1)


@pytest.mark.parametrize("shape", MESHES[2:], ids=lambda s: "x".join(str(v) for v in s.values()))
def test_chunked_attention_on_a_mesh_equals_xla_on_one_device(reference, shape):
  """Chunked attention (blocks of 8 over rows of 32: block skipping on) under batch, FSDP and
  head sharding gives the loss and gradients of the xla path on one device."""
  params, batch, _, (loss1, grads1), _ = reference
  cfg = dataclasses.replace(util.TINY, attention_impl="chunked", attention_block=8)
  loss, grads, _ = loss_and_grads(util.mesh_of(shape), params, batch, cfg)
  assert loss == pytest.approx(loss1, rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, grads1)


def test_parameters_are_actually_sharded():
  mesh = util.mesh_of({"data": 1, "fsdp": 2, "tensor": 4})
  _, shardings, *_ = util.sharded_setup(mesh)
  spec = shardings.params["layers"]["mlp"]["gate"].spec
  assert spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert shardings.params["embed"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  # AdamW moments follow their parameters.
  mu = shardings.opt_state[1][0].mu["layers"]["mlp"]["gate"].spec
  assert mu == spec


def test_the_embedding_lookup_does_not_gather_the_table():
  """Under FSDP the compiled gradient gathers no copy of the [vocab, d] embedding table (the token
  ids move instead); its only vocab-sized all-gather is the untied LM head's, as for every matmul
  weight under FSDP."""
  import re
  import jax.numpy as jnp
  cfg = dataclasses.replace(util.TINY, vocab_size=4096, d_model=128)
  mesh = util.mesh_of({"data": 1, "fsdp": 8, "tensor": 1})
  rules = parallel.axis_rules()
  graphdef, abstract, names = transformer.abstract_model(cfg)
  shardings = parallel.tree_shardings(mesh, abstract, names, rules)
  params = parallel.with_shardings(abstract, shardings)
  ids = jax.ShapeDtypeStruct((8, 32), jnp.int32, sharding=parallel.batch_sharding(mesh, rules))
  batch = {k: ids for k in ("inputs", "targets", "segment_ids", "positions")}
  batch["loss_mask"] = jax.ShapeDtypeStruct((8, 32), jnp.float32, sharding=ids.sharding)

  def f(p, b):
    total, weight, _ = lm_loss(transformer.merge(graphdef, p), b, None)
    return total / weight

  with parallel.activate(mesh, rules):
    hlo = jax.jit(jax.value_and_grad(f)).lower(params, batch).compile().as_text()
  gathered = re.findall(r"= f32\[([0-9,]+)\][^ ]* all-gather\(", hlo)
  assert "4096,128" not in gathered, gathered  # the table, gathered whole
  assert "128,4096" in gathered  # the LM head: the check sees the gathers that are there
