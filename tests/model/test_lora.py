"""LoRA adapters: a fresh one changes nothing, merging gives the same model, training moves only
the adapters (the same on 1 device and on (2, 2, 2)), and DPO's reference is the base."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmtrain import parallel
from lmtrain.errors import UserError
from lmtrain.losses import lm_loss
from lmtrain.model import generate as generate_lib
from lmtrain.model import lora, transformer
from lmtrain.train import optim
from lmtrain.train.state import state_shardings
from lmtrain.train.step import LossStep, make_train_step
import util

RANK = 4
LORA = dataclasses.replace(util.TINY, lora_rank=RANK, lora_alpha=8.0)


def lora_params(base, seed=1, b_scale=0.0):
  """`base` with adapters: A as a fresh model makes them, B zero or random of std b_scale."""
  fresh = transformer.init_fn(LORA)(jax.random.PRNGKey(seed))[lora.KEY]
  if b_scale:
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), len(fresh)))
    fresh = {t: {"a": ad["a"], "b": b_scale * jax.random.normal(next(keys), ad["b"].shape)}
             for t, ad in fresh.items()}
  return {**base, lora.KEY: fresh}


def logits_of(cfg, params, tokens):
  return transformer.merge(transformer.abstract_model(cfg)[0], params)(tokens)


def test_adapters_sit_beside_the_weights_they_adapt_with_their_axes():
  _, abstract, names = transformer.abstract_model(LORA)
  d, h, n, m, layers = 64, 16, 4, 128, 2
  shapes = {t: (abstract[lora.KEY][t]["a"].shape, abstract[lora.KEY][t]["b"].shape)
            for t in transformer.LORA_TARGETS}
  assert shapes["q"] == ((layers, d, RANK), (layers, RANK, n, h))
  assert shapes["o"] == ((layers, n, h, RANK), (layers, RANK, d))
  assert shapes["down"] == ((layers, m, RANK), (layers, RANK, d))
  assert names[lora.KEY]["q"]["a"] == ("layers", "embed", None)
  assert names[lora.KEY]["q"]["b"] == ("layers", None, "heads", "head_dim")
  assert names[lora.KEY]["o"]["a"] == ("layers", "heads", "head_dim", None)
  adapters = sum(math.prod(s) for pair in shapes.values() for s in pair)
  assert LORA.param_count() == util.TINY.param_count() + adapters
  assert sum(x.size for x in jax.tree.leaves(abstract)) == LORA.param_count()
  # Another rank or targets is another model (a resume key); a model without LoRA is described
  # as it was before LoRA existed.
  assert "lora_rank" not in util.TINY.architecture()
  assert LORA.architecture()["lora_targets"] == transformer.LORA_TARGETS


def test_fresh_adapters_give_exactly_the_base_models_logits():
  base = util.init_params()
  tokens = jnp.asarray(util.packed_batch(batch_size=2, seq_len=16)["inputs"])
  expected = np.asarray(logits_of(util.TINY, base, tokens))
  np.testing.assert_array_equal(np.asarray(logits_of(LORA, lora_params(base), tokens)), expected)
  # And the KV-cache sampler: the same greedy tokens.
  mesh, rules = util.mesh_of({"data": 1, "fsdp": 1, "tensor": 1}), parallel.axis_rules()
  ids, lengths = generate_lib.pad_prompts([[5, 6, 7], [9, 10]], pad_id=0)
  outs = []
  for cfg, params in ((util.TINY, base), (LORA, lora_params(base))):
    gen = generate_lib.make_generate(mesh, rules, cfg, 2, ids.shape[1], max_new_tokens=6,
                                     greedy=True, eos_id=2, pad_id=0)
    outs.append(np.asarray(gen(params, ids, lengths, jax.random.PRNGKey(0)).tokens))
  np.testing.assert_array_equal(outs[1], outs[0])


def test_merged_weights_give_the_same_logits_as_base_plus_adapters():
  base = util.init_params()
  params = lora_params(base, b_scale=0.05)
  tokens = jnp.asarray(util.packed_batch(batch_size=2, seq_len=16)["inputs"])
  with_adapters = np.asarray(logits_of(LORA, params, tokens))
  assert not np.allclose(with_adapters, np.asarray(logits_of(util.TINY, base, tokens)), atol=1e-3)
  merged = lora.merged(params, LORA.lora_scale)
  assert lora.KEY not in merged
  np.testing.assert_allclose(np.asarray(logits_of(util.TINY, merged, tokens)), with_adapters,
                             atol=1e-5, rtol=1e-5)
  # By hand for one weight: W + alpha / r x A B.
  a, b = params[lora.KEY]["up"]["a"], params[lora.KEY]["up"]["b"]
  expected = base["layers"]["mlp"]["up"] + 2.0 * jnp.einsum("ldr,lrm->ldm", a, b)
  np.testing.assert_allclose(merged["layers"]["mlp"]["up"], expected, rtol=1e-6, atol=1e-6)


def test_fewer_targets_adapt_only_those_weights():
  cfg = dataclasses.replace(LORA, lora_targets=("q", "v"))
  _, abstract, _ = transformer.abstract_model(cfg)
  assert sorted(abstract[lora.KEY]) == ["q", "v"]
  for bad, message in (
      ({"lora_targets": ("q", "w")}, "LORA_TARGETS=['q', 'w']: choose one or more (each once) of "
                                     "q, k, v, o, gate, up, down"),
      ({"lora_targets": ()}, "LORA_TARGETS=[]"),
      ({"lora_rank": -1}, "LORA_RANK=-1 must be 0 (no adapters) or positive"),
      ({"lora_alpha": 0.0}, "LORA_ALPHA=0.0 must be positive")):
    with pytest.raises(UserError) as error:
      dataclasses.replace(LORA, **bad).validate()
    assert str(error.value).startswith(message)


def lora_setup(mesh, loss_fn=lm_loss, frozen_reference=False, params=None, cfg=LORA):
  """(jitted step, state, batch sharding, factory) of a LoRA model `cfg` on `mesh`, as the loop
  builds them (LossStep's optimizer, init and trainable mask), from `params` (default: fresh
  adapters on util's base)."""
  factory = LossStep(cfg, loss_fn, frozen_reference=frozen_reference)
  graphdef, abstract_params, names = transformer.abstract_model(cfg)
  schedule = optax.constant_schedule(1e-2)
  optimizer = factory.optimizer(schedule, None)
  abstract_state = jax.eval_shape(lambda p: factory.init(p, optimizer, jax.random.PRNGKey(0)),
                                  abstract_params)
  param_names, extras_names = factory.state_names(names)
  shardings = state_shardings(mesh, parallel.axis_rules(), abstract_state, param_names,
                              extras_names)
  step = make_train_step(graphdef, loss_fn, optimizer, schedule, trainable=factory.trainable(),
                         base_reference=factory.base_reference)
  batch_sharding = parallel.batch_sharding(mesh, parallel.axis_rules())
  with parallel.activate(mesh, parallel.axis_rules()):
    jitted = jax.jit(step, in_shardings=(shardings, batch_sharding),
                     out_shardings=(shardings, parallel.replicated(mesh)))
  state = jax.jit(lambda p: factory.init(p, optimizer, jax.random.PRNGKey(0)),
                  out_shardings=shardings)(
                      lora_params(util.init_params()) if params is None else params)
  return jitted, state, batch_sharding, factory


def test_training_moves_only_the_adapters_the_same_on_any_mesh():
  start = jax.device_get(lora_params(util.init_params()))
  batch = util.packed_batch(batch_size=8, seed=5)
  runs = []
  for shape in ({"data": 1, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2}):
    step, state, batch_sharding, _ = lora_setup(util.mesh_of(shape))
    losses = []
    for _ in range(3):
      state, metrics = step(state, jax.device_put(batch, batch_sharding))
      losses.append(float(metrics["loss"]))
    runs.append((jax.device_get(state), losses))
  (state, losses), (state_8, losses_8) = runs
  assert losses[2] < losses[0]
  np.testing.assert_allclose(losses_8, losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               state_8.params, state.params)
  for path, before in jax.tree_util.tree_leaves_with_path(start):
    name = optim.param_path(path)
    after = state.params
    for k in path:
      after = after[k.key]
    if name.startswith("lora/") and name.endswith("/b"):
      assert np.abs(after).max() > 0, name  # B leaves zero at the first step
    elif not name.startswith("lora/"):
      np.testing.assert_array_equal(after, before, err_msg=name)
  # AdamW's moments exist for the adapters only.
  moments = sum(int(x.size) for x in jax.tree.leaves(state.opt_state) if np.ndim(x))
  assert moments == 2 * lora.adapter_count(start)


def test_a_scalar_head_trains_beside_the_adapters():
  cfg = dataclasses.replace(LORA, head="scalar")
  _, abstract, _ = transformer.abstract_model(cfg)
  mask = optim.trainable_fn("all", lora=True)(abstract)
  trained = sorted(optim.param_path(p) for p, m in jax.tree_util.tree_leaves_with_path(mask) if m)
  assert trained == sorted([f"lora/{t}/{x}" for t in transformer.LORA_TARGETS for x in "ab"]
                           + ["score", "score_bias"])
  # TRAINABLE's patterns add to the adapters.
  mask = optim.trainable_fn(["final_norm/scale"], lora=True)(abstract)
  assert mask["final_norm"]["scale"]
  assert not mask["layers"]["mlp"]["up"]


def test_dpo_with_lora_references_the_base_without_a_copy():
  from lmtrain.stages.dpo import completion_logprobs, make_dpo_loss
  mesh = util.mesh_of({"data": 2, "fsdp": 2, "tensor": 2})
  loss = make_dpo_loss(beta=0.1, label_smoothing=0.0)
  step, state, batch_sharding, factory = lora_setup(mesh, loss, frozen_reference=True)
  assert state.extras == {}  # no second copy of the weights
  rng = np.random.default_rng(0)
  batch = {}
  for side in ("chosen", "rejected"):
    inputs = rng.integers(3, 128, (8, 17)).astype(np.int32)
    batch.update({f"{side}_inputs": inputs,
                  f"{side}_positions": np.tile(np.arange(17, dtype=np.int32), (8, 1)),
                  f"{side}_segment_ids": np.ones((8, 17), np.int32),
                  f"{side}_loss_mask": (np.arange(17) >= 8).astype(np.float32)[None].repeat(8, 0)})
  for i in range(2):
    new_state, metrics = step(state, jax.device_put(batch, batch_sharding))
    if i == 0:
      assert float(metrics["loss"]) == pytest.approx(math.log(2), abs=1e-6)
    state = new_state
  # The reference's log-probs are the base model's (the parent's weights, no adapters).
  base_model = transformer.merge(transformer.abstract_model(util.TINY)[0], util.init_params())
  expected = completion_logprobs(base_model, jax.tree.map(jnp.asarray, batch), "chosen")
  ref_fn = jax.jit(lambda p: completion_logprobs(
      transformer.merge(factory.base_reference, lora.without_adapters(p)),
      jax.tree.map(jnp.asarray, batch), "chosen"))
  np.testing.assert_allclose(np.asarray(ref_fn(jax.device_get(state.params))),
                             np.asarray(expected), rtol=1e-5, atol=1e-5)
  assert float(metrics["loss"]) < math.log(2)


def test_the_memory_plan_counts_the_frozen_base_without_gradients():
  from lmtrain.train import memory
  mesh = util.mesh_of({"data": 1, "fsdp": 1, "tensor": 1})
  _, state, _, factory = lora_setup(mesh)
  abstract = jax.eval_shape(lambda s: s, state)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  parts = memory.state_bytes(abstract, shardings, factory.trainable())
  adapters = 4 * lora.adapter_count(state.params)
  assert parts["trained params"] == parts["gradients"] == adapters
  assert parts["optimizer state"] >= 2 * adapters  # AdamW's two moments (and its counts)
  assert parts["optimizer state"] < 2 * adapters + 64
  assert parts["frozen models"] == 4 * util.TINY.param_count()


@pytest.mark.parametrize("stage, macros, expected", [
    ("pretrain", {"LORA_RANK": "4"}, "LORA_RANK=4: pretraining starts from fresh weights, which "
                                     "adapters would leave frozen at random"),
    ("dpo", {"LORA_RANK": "4", "TRAINABLE": "['lm_head']"},
     "TRAINABLE=['lm_head'] with LORA_RANK=4: DPO's reference is the base without the adapters"),
    ("ppo", {"LORA_RANK": "4", "TRAINABLE": "['lm_head']"},
     "TRAINABLE=['lm_head'] with LORA_RANK=4: ppo's reference is the base without the adapters"),
    ("ppo", {"LORA_RANK": "4", "LORA_DROPOUT": "0.1"}, "LORA_DROPOUT=0.1: ppo takes no dropout"),
    ("grpo", {"LORA_RANK": "4", "LORA_DROPOUT": "0.1"}, "LORA_DROPOUT=0.1: grpo takes no dropout"),
    ("sft", {"LORA_DROPOUT": "0.1"}, "LORA_DROPOUT=0.1 needs LORA_RANK > 0"),
])
def test_stages_that_cannot_take_lora_refuse_it_in_one_line(tmp_path, stage, macros, expected):
  import gin
  from lmtrain import config
  from lmtrain.stages import get_stage_builder
  from lmtrain.train.loop import LoopConfig
  config.setup(stage, macros={"MODEL": "tiny", **macros})
  try:
    with gin.config_scope(stage), pytest.raises(UserError) as error:
      config.call(get_stage_builder(stage), stage, str(tmp_path),
                  config.call(transformer.model_config, "model_config"),
                  config.call(LoopConfig, "LoopConfig"))
  finally:
    gin.clear_config()
  # (gin adds a line naming the configurable; the CLI prints the first line only)
  assert str(error.value).splitlines()[0].startswith(expected)


DROPOUT = dataclasses.replace(LORA, lora_dropout=0.5)


def test_lora_dropout_off_is_exactly_the_computation_without_it():
  """LORA_DROPOUT = 0: a dropout key changes nothing, not one operation, and a train step whose
  loss passes the key to the model is bit for bit the step that passes none."""
  params = lora_params(util.init_params(), b_scale=0.05)
  tokens = jnp.asarray(util.packed_batch(batch_size=2, seq_len=16)["inputs"])
  model = transformer.merge(transformer.abstract_model(LORA)[0], params)
  key = jax.random.PRNGKey(3)
  np.testing.assert_array_equal(np.asarray(model(tokens, dropout_rng=key)),
                                np.asarray(model(tokens)))
  with_key = jax.make_jaxpr(lambda t, k: model(t, dropout_rng=k))(tokens, key)
  without = jax.make_jaxpr(lambda t: model(t))(tokens)
  assert len(with_key.eqns) == len(without.eqns)
  assert "random_bits" not in str(with_key)
  mesh = util.mesh_of({"data": 1, "fsdp": 1, "tensor": 1})
  batch = util.packed_batch(batch_size=4, seed=5)
  runs = []
  for loss_fn in (lm_loss, lambda model, batch, rng: lm_loss(model, batch, None)):
    step, state, batch_sharding, _ = lora_setup(mesh, loss_fn, params=params)
    for _ in range(2):
      state, metrics = step(state, jax.device_put(batch, batch_sharding))
    runs.append(jax.device_get((state.params, state.opt_state, metrics)))
  jax.tree.map(np.testing.assert_array_equal, runs[0], runs[1])


def test_lora_dropout_drops_the_adapters_inputs_unbiased_only_in_training_on_any_mesh():
  # The dropout itself: kept elements scaled by 1 / (1 - rate), the rest zero.
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 64))
  dropped = np.asarray(transformer.dropout(x, 0.25, jax.random.PRNGKey(1)))
  kept = dropped != 0
  np.testing.assert_allclose(dropped[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
  assert abs(1 - kept.mean() - 0.25) < 0.03
  # An adapter's output: another key, another output; over many keys, the output without dropout.
  from flax import nnx
  layer = transformer.LayerAdapters(DROPOUT, nnx.Rngs(0))
  layer.q.b[...] = jax.random.normal(jax.random.PRNGKey(2), layer.q.b.shape)
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 64))
  exact = np.asarray(transformer.LayerLora(layer)("q", x, jnp.float32))
  n = 4000
  samples = np.asarray(jax.vmap(
      lambda k: transformer.LayerLora(layer, 0.5, k)("q", x, jnp.float32))(
          jax.random.split(jax.random.PRNGKey(4), n)))
  assert not np.allclose(samples[0], samples[1])
  z = np.abs(samples.mean(0) - exact) / (samples.std(0) / np.sqrt(n))
  assert z.max() < 5, z.max()
  # The train step drops out (with random B the loss moves); evaluation and sampling never do.
  params = lora_params(util.init_params(), b_scale=0.5)
  mesh = util.mesh_of({"data": 1, "fsdp": 1, "tensor": 1})
  batch = util.packed_batch(batch_size=4, seed=5)
  losses, evals = [], []
  for cfg in (LORA, DROPOUT):
    step, state, batch_sharding, factory = lora_setup(mesh, params=params, cfg=cfg)
    losses.append(float(step(state, jax.device_put(batch, batch_sharding))[1]["loss"]))
    eval_step = jax.jit(factory.eval_step(lm_loss))
    evals += [jax.device_get(eval_step(params, {}, jax.tree.map(jnp.asarray, batch)))
              for _ in range(2)]
  assert losses[1] != losses[0]
  # The dropout masks do not depend on the mesh.
  step, state, batch_sharding, _ = lora_setup(util.mesh_of({"data": 2, "fsdp": 2, "tensor": 2}),
                                              params=params, cfg=DROPOUT)
  sharded = float(step(state, jax.device_put(batch, batch_sharding))[1]["loss"])
  assert sharded == pytest.approx(losses[1], rel=1e-5)
  for other in evals[1:]:
    jax.tree.map(np.testing.assert_array_equal, other, evals[0])
  ids, lengths = generate_lib.pad_prompts([[5, 6, 7], [9, 10]], pad_id=0)
  outs = []
  for cfg in (LORA, DROPOUT):
    gen = generate_lib.make_generate(mesh, parallel.axis_rules(), cfg, 2, ids.shape[1],
                                     max_new_tokens=6, greedy=False, eos_id=2, pad_id=0)
    outs.append(gen(params, ids, lengths, jax.random.PRNGKey(0)))
  jax.tree.map(np.testing.assert_array_equal, *jax.device_get(outs))


def test_every_loss_stage_drops_out_in_training_only():
  """SFT's, the reward model's and DPO's losses pass the step's key to the policy: another key,
  another loss; None (evaluation), the loss without dropout."""
  from lmtrain.stages.dpo import make_dpo_loss
  from lmtrain.stages.reward import reward_loss
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 128, (4, 2, 17)).astype(np.int32)
  ranking = {"inputs": tokens, "positions": np.broadcast_to(np.arange(17, dtype=np.int32),
                                                            tokens.shape),
             "segment_ids": np.ones_like(tokens), "loss_mask": np.ones(tokens.shape, np.float32),
             "ranks": np.tile(np.array([1, 2], np.int32), (4, 1)),
             "valid": np.ones((4, 2), np.float32), "margin": np.zeros(4, np.float32)}
  pair = {f"{side}_{k}": ranking[k][:, i] for i, side in enumerate(("chosen", "rejected"))
          for k in ("inputs", "positions", "segment_ids", "loss_mask")}
  base = util.init_params()
  dpo = make_dpo_loss(beta=0.1, label_smoothing=0.0)
  base_model = transformer.merge(transformer.abstract_model(util.TINY)[0], base)
  cases = ((lm_loss, util.packed_batch(batch_size=4), "lm"),
           (reward_loss, ranking, "scalar"),
           (lambda m, b, r: dpo(m, b, r, reference=base_model), pair, "lm"))
  for loss_fn, batch, head in cases:
    losses = {}
    for cfg in (LORA, DROPOUT):
      cfg = dataclasses.replace(cfg, head=head)
      params = transformer.init_fn(cfg)(jax.random.PRNGKey(1))
      params = {**params, **{k: v for k, v in base.items() if k in params}}
      params[lora.KEY] = lora_params(base, b_scale=0.5)[lora.KEY]
      graphdef = transformer.abstract_model(cfg)[0]
      three = jax.jit(lambda p, b, keys, loss_fn=loss_fn, graphdef=graphdef: [
          loss_fn(transformer.merge(graphdef, p), b, key)[0] for key in (None, *keys)])
      losses[cfg.lora_dropout] = [float(x) for x in three(
          params, batch, jax.random.split(jax.random.PRNGKey(0)))]
    assert losses[0.5][0] == losses[0.0][0] == losses[0.0][1] == losses[0.0][2], head
    assert losses[0.5][1] != losses[0.5][2] and losses[0.5][1] != losses[0.5][0], head


def test_the_frozen_base_is_held_in_lora_base_dtype_and_a_resume_rebuilds_it(tmp_path):
  """LORA_BASE_DTYPE=bfloat16: the frozen base matrices in bf16 (norms and adapters float32), the
  same model as float32 storage rounded to bf16; its checkpoints hold the adapters only, and a
  resume takes the base from the parent again, pinned to the lineage's entry."""
  import gin
  from lmtrain import config
  from lmtrain.train import checkpoint as ckpt_lib, memory, start
  mesh, rules = util.mesh_of({"data": 2, "fsdp": 2, "tensor": 2}), parallel.axis_rules()
  factory = LossStep(LORA, lm_loss)
  parent = lora_params(util.init_params())
  pins = []

  def from_parent(abstract, pinned=None):
    pins.append(pinned)
    return jax.device_put(parent, jax.tree.map(lambda a: a.sharding, abstract)), {"step": 5}

  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "sft" / "checkpoints"), async_save=False)
  config.setup("sft", macros={"LORA_BASE_DTYPE": "bfloat16", "LEARNING_RATE": "0.01"})
  try:
    first = start.start_state(factory, from_parent, 10, 0, mesh, rules, checkpointer, None)
    params = first.state.params
    assert params["layers"]["mlp"]["up"].dtype == jnp.bfloat16
    assert params["embed"].dtype == params["lm_head"].dtype == jnp.bfloat16
    assert params["final_norm"]["scale"].dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params[lora.KEY]))
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(x.dtype)
                           if x.ndim >= 2 else x, lora.without_adapters(parent))
    tokens = util.packed_batch(batch_size=2, seed=3)["inputs"]
    np.testing.assert_array_equal(
        logits_of(LORA, jax.device_get(params), tokens),
        logits_of(LORA, {**rounded, lora.KEY: parent[lora.KEY]}, tokens))
    # The memory plan counts the frozen base at 2 bytes a weight.
    abstract = jax.eval_shape(lambda s: s, first.state)
    frozen = memory.state_bytes(abstract, first.shardings, factory.trainable())["frozen models"]
    assert frozen < 0.6 * 4 * util.TINY.param_count()

    step = jax.jit(make_train_step(transformer.abstract_model(LORA)[0], lm_loss, first.optimizer,
                                   first.schedule, trainable=factory.trainable()))
    state, metrics = step(first.state, util.packed_batch(batch_size=8, seed=5))
    assert np.isfinite(float(metrics["loss"]))
    checkpointer.save(1, first.saved(state))
    assert sorted(ckpt_lib.saved_params(checkpointer.directory, 1)) == [lora.KEY]
    ckpt_lib.write_lineage(str(tmp_path / "sft"), "sft", "", {"stage": "pretrain", "step": 5})
    resumed = start.start_state(factory, from_parent, 10, 0, mesh, rules, checkpointer, None)
    assert resumed.resumed_from == 1
    assert pins == [None, {"stage": "pretrain", "step": 5}]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state.params),
                 jax.device_get(state.params))
    assert resumed.state.params["layers"]["mlp"]["up"].dtype == jnp.bfloat16
  finally:
    checkpointer.close()
    gin.clear_config()


def test_a_lora_checkpoint_that_holds_its_base_resumes_whole(tmp_path):
  """A LoRA run's checkpoint written with its base (before checkpoints left it out) resumes from
  itself alone, with no parent to read."""
  import gin
  from lmtrain import config
  from lmtrain.train import checkpoint as ckpt_lib, start
  mesh, rules = util.mesh_of({"data": 2, "fsdp": 2, "tensor": 2}), parallel.axis_rules()
  factory = LossStep(LORA, lm_loss)
  parent = lora_params(util.init_params(), b_scale=0.1)

  def from_parent(abstract, pinned=None):
    if pinned is not None:
      raise AssertionError("the resume read the parent")
    return jax.device_put(parent, jax.tree.map(lambda a: a.sharding, abstract)), {"step": 5}

  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "sft" / "checkpoints"), async_save=False)
  config.setup("sft", macros={"LEARNING_RATE": "0.01"})
  try:
    first = start.start_state(factory, from_parent, 10, 0, mesh, rules, checkpointer, None)
    checkpointer.save(3, first.state.replace(step=first.state.step + 3))  # whole, as before
    resumed = start.start_state(factory, from_parent, 10, 0, mesh, rules, checkpointer, None)
    assert resumed.resumed_from == 3
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state.params),
                 jax.device_get(parent))
    assert sorted(resumed.saved(resumed.state).params) == [lora.KEY]  # from now on, adapters only
  finally:
    checkpointer.close()
    gin.clear_config()
