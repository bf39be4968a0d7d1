"""PPO and GRPO: the rollout layout, the update's exactness properties, sharding invariance, and
that both actually raise a rule-based score with bounded KL; with LoRA and TRAINABLE, that only the
trained parameters move and the reference is the adapter-free base."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmtrain import bench, parallel
from lmtrain.errors import UserError
from lmtrain.model import generate as generate_lib
from lmtrain.model import lora, transformer
from lmtrain.rl import core as rl, learner, rollout as rollout_lib, stage as rl_stage
from lmtrain.rl.config import RLConfig
from lmtrain.train import optim
from lmtrain.train.state import state_shardings
from lmtrain.train.state import TrainState
import util

POLICY = transformer.ModelConfig(vocab_size=48, d_model=32, num_layers=2, num_heads=4,
                                 num_kv_heads=2, mlp_dim=64)
VALUE = dataclasses.replace(POLICY, head="scalar")
EOS, PAD = 1, 0
PROMPT_LEN, NEW = 8, 6


def with_lora(cfg, rank):
  return dataclasses.replace(cfg, lora_rank=rank, lora_alpha=8.0) if rank else cfg


def setup(cfg: RLConfig, lr=1e-3, seed=0, weight_decay=0.0, rank=0):
  """(graphdefs, optimizer, schedule, state) with policy == reference and value == reward. With
  `rank`, policy and value have fresh LoRA adapters of that rank over those weights, the
  optimizer trains the adapters and the value head, and there is no reference copy (as
  RLStep.init makes them)."""
  pgd, policy_abs, _ = transformer.abstract_model(with_lora(POLICY, rank))
  vgd, value_abs, _ = transformer.abstract_model(with_lora(VALUE, rank))
  rgd, _, _ = transformer.abstract_model(VALUE)
  policy = util.init_params(POLICY, seed)
  value = util.init_params(VALUE, seed + 1)
  reward = jax.tree.map(jnp.copy, value)
  extras = {"reference": jax.tree.map(jnp.copy, policy), "reward": reward,
            "kl_ctl": rl.kl_controller_init(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)}
  if rank:
    policy = {**policy, lora.KEY: lora.fresh_adapters(policy_abs[lora.KEY],
                                                      jax.random.PRNGKey(seed + 10))}
    value = {**value, lora.KEY: lora.fresh_adapters(value_abs[lora.KEY],
                                                    jax.random.PRNGKey(seed + 11))}
    del extras["reference"]
  schedule = optax.constant_schedule(lr)
  params = {"policy": policy} if cfg.algorithm == "grpo" else {"policy": policy, "value": value}
  optimizer = optim.make_optimizer(schedule, weight_decay=weight_decay, clip_norm=1.0,
                                   trainable=trainable_of(params))
  state = TrainState.create(params, optimizer, jax.random.PRNGKey(seed), extras)
  return (pgd, None if cfg.algorithm == "grpo" else vgd, rgd), optimizer, schedule, state


def trainable_of(params):
  """The RL stage's mask function for these roles (their adapters; None without LoRA)."""
  return optim.roles_trainable_fn({role: lora.has_adapters(p) for role, p in params.items()},
                                  "all")


def prompts(batch, seed=0, vocab=POLICY.vocab_size):
  """Left-padded prompts of ragged lengths (2..PROMPT_LEN) and the lengths."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, PROMPT_LEN + 1, batch).astype(np.int32)
  out = np.full((batch, PROMPT_LEN), PAD, np.int32)
  for i, n in enumerate(lengths):
    out[i, PROMPT_LEN - n:] = rng.integers(4, vocab, n)
  return out, lengths


def make_rollout(graphdefs, cfg, state, prompt, length, seed=5):
  pgd, _, rgd = graphdefs
  data = rollout_lib.rollout(pgd, rgd, cfg, state.params["policy"], state.extras["reward"],
                             jnp.asarray(prompt), jnp.asarray(length), jax.random.PRNGKey(seed),
                             eos_id=EOS, pad_id=PAD)
  return {**data, "prompt": jnp.asarray(prompt), "prompt_length": jnp.asarray(length)}


def run_update(graphdefs, cfg, optimizer, schedule, state, data, score):
  pgd, vgd, _ = graphdefs
  fn = jax.jit(functools.partial(learner.update, pgd, vgd, cfg, optimizer, schedule,
                                 trainable=trainable_of(state.params)))
  return fn(state, data, score)


def test_sequences_put_the_response_right_after_the_prompt():
  prompt = np.array([[0, 0, 7, 8], [5, 6, 7, 8]], np.int32)
  tokens, positions, segments = rollout_lib.sequences(
      jnp.asarray(prompt), jnp.array([2, 4]), jnp.array([[9, 1, 0], [9, 9, 9]]),
      jnp.array([[1, 1, 0], [1, 1, 1]], jnp.float32))
  np.testing.assert_array_equal(tokens, [[0, 0, 7, 8, 9, 1, 0], [5, 6, 7, 8, 9, 9, 9]])
  np.testing.assert_array_equal(positions, [[0, 0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5, 6]])
  np.testing.assert_array_equal(segments, [[0, 0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]])


def test_rollout_log_probs_and_reward_match_the_unpadded_sequences():
  cfg = RLConfig(prompt_len=PROMPT_LEN, max_new_tokens=NEW, temperature=0.7)
  graphdefs, _, _, state = setup(cfg)
  prompt, length = prompts(6)
  data = make_rollout(graphdefs, cfg, state, prompt, length)
  old = learner.evaluate_roles(graphdefs[0], graphdefs[1], cfg, state.params, state.extras, data)
  policy = transformer.merge(graphdefs[0], state.params["policy"])
  reward = transformer.merge(graphdefs[2], state.extras["reward"])
  gen = generate_lib.generate(graphdefs[0], state.params["policy"], jnp.asarray(prompt),
                              jnp.asarray(length), jax.random.PRNGKey(5), max_new_tokens=NEW,
                              temperature=0.7, eos_id=EOS, pad_id=PAD, left_padded=True)
  np.testing.assert_array_equal(gen.tokens, data["response"])
  for i in range(6):
    n = int(data["mask"][i].sum())
    seq = np.concatenate([prompt[i, PROMPT_LEN - length[i]:], np.asarray(data["response"][i, :n])])
    logits = policy(jnp.asarray(seq[None, :-1]))[0] / 0.7
    want = jax.nn.log_softmax(logits)[np.arange(len(seq) - 1), seq[1:]][-n:]
    np.testing.assert_allclose(old["logp"][i, :n], want, rtol=1e-5, atol=1e-5)
    # the sampler's own log-probs (KV cache) agree with the recomputed ones
    np.testing.assert_allclose(gen.logprobs[i, :n], want, rtol=1e-4, atol=1e-4)
    assert np.all(np.asarray(old["logp"][i, n:]) == 0)
    scores = reward.scores(reward.hidden(jnp.asarray(seq[None])))[0]
    assert float(data["rm_score"][i]) == pytest.approx(float(scores[-1]), rel=1e-5, abs=1e-5)
    # the value model starts as the reward model: the value before each response token is the
    # reward model's score of the sequence up to that token
    np.testing.assert_allclose(old["values"][i, :n], scores[-n - 1:-1], rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(old["values"][i, n:]) == 0)


def test_lm_score_reward_in_rollouts_equals_the_reward_stage_score():
  # The reward model scores a left-padded rollout exactly as the reward stage scored the same
  # sequence unpadded; the value model starts as its head in normalised units.
  rm_cfg = dataclasses.replace(VALUE, lm_score=True)
  rgd, _, _ = transformer.abstract_model(rm_cfg)
  params = util.init_params(rm_cfg, 3)
  params["lm_score_weight"] = jnp.asarray(1.7)
  model = transformer.merge(rgd, params)
  prompt, length = prompts(4, seed=3)
  rng = np.random.default_rng(3)
  response = rng.integers(4, POLICY.vocab_size, (4, NEW)).astype(np.int32)
  n_resp = np.array([2, NEW, 4, 3])
  mask = (np.arange(NEW)[None] < n_resp[:, None]).astype(np.float32)
  response[np.arange(4), n_resp - 1] = EOS
  offset, scale = 0.3, 2.0
  got = rollout_lib.sequence_reward(model, jnp.asarray(prompt), jnp.asarray(length),
                                    jnp.asarray(response), jnp.asarray(mask), offset, scale)
  for i in range(4):
    seq = np.concatenate([prompt[i, PROMPT_LEN - length[i]:], response[i, :n_resp[i]]])
    resp = (np.arange(len(seq)) >= length[i]).astype(np.float32)
    want = rl.reward_scores(model, seq[None], np.arange(len(seq))[None], np.ones((1, len(seq))),
                            resp[None])
    assert float(got[i]) == pytest.approx((float(want[0]) - offset) / scale, rel=1e-5, abs=1e-6)
  value = transformer.merge(rgd, rl_stage.normalized_head(params, offset, scale))
  tokens = jnp.asarray(rng.integers(4, POLICY.vocab_size, (2, 9)))
  np.testing.assert_allclose(value.scores(value.hidden(tokens)),
                             (model.scores(model.hidden(tokens)) - offset) / scale, rtol=1e-5,
                             atol=1e-6)


def test_first_minibatch_is_exact_and_frozen_roles_stay_bit_identical():
  cfg = RLConfig(prompt_len=PROMPT_LEN, max_new_tokens=NEW, epochs=2, num_minibatches=2,
                  kl_coef=0.1)
  graphdefs, optimizer, schedule, state = setup(cfg, lr=3e-3)
  data = make_rollout(graphdefs, cfg, state, *prompts(8))
  before = jax.tree.map(np.asarray, state.extras)
  policy_before = jax.tree.map(np.asarray, state.params["policy"])
  new_state, metrics, per_mb = run_update(graphdefs, cfg, optimizer, schedule, state, data,
                                          data["rm_score"])
  # policy == reference: the KL is exactly 0; the first minibatch sees the rollout's own policy
  assert float(metrics["kl"]) == 0.0
  # approx_kl, a weighted sum of squared log-ratios, is exactly 0 only if every ratio is exactly 1
  assert float(per_mb["approx_kl"][0]) == 0.0
  assert float(per_mb["ratio_mean"][0]) == pytest.approx(1.0, abs=1e-6)
  assert float(per_mb["clipfrac"][0]) == 0.0
  assert float(per_mb["approx_kl"][-1]) > 0  # later minibatches see an updated policy
  jax.tree.map(np.testing.assert_array_equal, before["reference"], new_state.extras["reference"])
  jax.tree.map(np.testing.assert_array_equal, before["reward"], new_state.extras["reward"])
  changed = jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), policy_before,
                         new_state.params["policy"])
  assert any(jax.tree.leaves(changed))
  assert int(new_state.step) == 1
  # a second iteration now measures a positive KL to the unchanged reference
  data2 = make_rollout(graphdefs, cfg, new_state, *prompts(8, seed=1))
  _, metrics2, _ = run_update(graphdefs, cfg, optimizer, schedule, new_state, data2,
                              data2["rm_score"])
  assert float(metrics2["kl"]) != 0.0


def test_lora_ppo_trains_only_adapters_and_value_head_against_the_adapter_free_base():
  cfg = RLConfig(prompt_len=PROMPT_LEN, max_new_tokens=NEW, epochs=2, num_minibatches=2,
                  kl_coef=0.1)
  graphdefs, optimizer, schedule, state = setup(cfg, lr=3e-3, rank=4)
  base_graphdefs, _, _, base_state = setup(cfg)  # the SFT policy (and reward model) alone
  assert "reference" not in state.extras  # no second copy of the policy's weights
  prompt, length = prompts(8)
  data = make_rollout(graphdefs, cfg, state, prompt, length)
  # Fresh adapters (B = 0) decode exactly as the base model does.
  base_data = make_rollout(base_graphdefs, cfg, base_state, prompt, length)
  np.testing.assert_array_equal(data["response"], base_data["response"])
  # The reference's log-probs are the SFT base model's, and the LoRA policy's equal them at init.
  old = learner.evaluate_roles(graphdefs[0], graphdefs[1], cfg, state.params, state.extras, data)
  base_old = learner.evaluate_roles(base_graphdefs[0], base_graphdefs[1], cfg, base_state.params,
                                    base_state.extras, data)
  np.testing.assert_array_equal(old["ref_logp"], base_old["logp"])
  np.testing.assert_array_equal(old["logp"], old["ref_logp"])

  before = jax.device_get(state.params)
  new_state, metrics, per_mb = run_update(graphdefs, cfg, optimizer, schedule, state, data,
                                          data["rm_score"])
  assert float(metrics["kl"]) == 0.0
  assert float(per_mb["approx_kl"][0]) == 0.0 and float(per_mb["clipfrac"][0]) == 0.0
  assert float(per_mb["approx_kl"][-1]) > 0
  after = jax.device_get(new_state.params)
  trained = []
  for path, old_leaf in jax.tree_util.tree_leaves_with_path(before):
    name = optim.param_path(path)
    new_leaf = after
    for k in path:
      new_leaf = new_leaf[k.key]
    if np.array_equal(old_leaf, new_leaf):
      continue
    trained.append(name)
  # Every B moves off zero (A too: its gradient is nonzero once B is); the value model's head
  # moves; nothing else changes by a bit.
  targets = transformer.LORA_TARGETS
  assert sorted(trained) == sorted([f"{role}/lora/{t}/{x}" for role in ("policy", "value")
                                    for t in targets for x in "ab"]
                                   + ["value/score", "value/score_bias"])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.extras["reward"]),
               jax.device_get(new_state.extras["reward"]))
  # AdamW's moments are the trained leaves' only (score_bias's are scalars, counted out with
  # Adam's step counts).
  trained_count = (lora.adapter_count(before["policy"]) + lora.adapter_count(before["value"])
                   + before["value"]["score"].size)
  moments = sum(int(np.size(x)) for x in jax.tree.leaves(new_state.opt_state) if np.ndim(x))
  assert moments == 2 * trained_count
  # The next iteration measures a KL against the unchanged base.
  data2 = make_rollout(graphdefs, cfg, new_state, *prompts(8, seed=1))
  _, metrics2, _ = run_update(graphdefs, cfg, optimizer, schedule, new_state, data2,
                              data2["rm_score"])
  assert float(metrics2["kl"]) != 0.0


def test_lora_rollout_decodes_merged_weights_as_base_plus_adapters_would():
  cfg = RLConfig(prompt_len=PROMPT_LEN, max_new_tokens=NEW)
  lora_cfg = with_lora(POLICY, 4)
  pgd, abstract, _ = transformer.abstract_model(lora_cfg)
  keys = iter(jax.random.split(jax.random.PRNGKey(7), 2 * len(transformer.LORA_TARGETS)))
  adapters = {t: {x: 0.3 * jax.random.normal(next(keys), a.shape) for x, a in ad.items()}
              for t, ad in abstract[lora.KEY].items()}  # trained-looking: B far from zero
  params = {**util.init_params(POLICY, 0), lora.KEY: adapters}
  prompt, length = jnp.asarray(prompts(8)[0]), jnp.asarray(prompts(8)[1])
  kwargs = dict(eos_id=EOS, pad_id=PAD, greedy=True)
  merged = jax.jit(lambda p: rollout_lib.rollout(pgd, None, cfg, p, None, prompt, length,
                                                 jax.random.PRNGKey(0), **kwargs))(params)
  unmerged = generate_lib.generate(pgd, params, prompt, length, jax.random.PRNGKey(0),
                                   max_new_tokens=NEW, left_padded=True, **kwargs)
  base = generate_lib.generate(transformer.abstract_model(POLICY)[0], util.init_params(POLICY, 0),
                               prompt, length, jax.random.PRNGKey(0), max_new_tokens=NEW,
                               left_padded=True, **kwargs)
  np.testing.assert_array_equal(merged["response"], unmerged.tokens)
  assert not np.array_equal(np.asarray(unmerged.tokens), np.asarray(base.tokens))  # they matter
  # The decode copy the memory plan counts is the base model's shapes.
  mesh = util.mesh_of({"data": 1, "fsdp": 1, "tensor": 1})
  assert (rollout_lib.rollout_memory(lora_cfg, "float32", mesh, 8, 13)["decode weights"]
          == 4 * POLICY.param_count())


def test_grpo_with_trainable_head_only_moves_only_the_head():
  cfg = RLConfig(algorithm="grpo", group_size=4, prompt_len=PROMPT_LEN, max_new_tokens=NEW,
                  epochs=1, num_minibatches=2, kl_coef=0.1)
  graphdefs, _, schedule, state = setup(cfg, lr=3e-3)
  head = ["final_norm/scale", "lm_head"]
  trainable = optim.roles_trainable_fn({"policy": False}, head)
  optimizer = optim.make_optimizer(schedule, weight_decay=0.0, trainable=trainable)
  state = TrainState.create(state.params, optimizer, state.rng, state.extras)
  prompt, length = prompts(2)
  data = make_rollout(graphdefs, cfg, state, np.repeat(prompt, 4, 0), np.repeat(length, 4, 0))
  spread = jnp.array([0.0, 1.0, 0.0, 1.0, 0.2, 0.9, 0.2, 0.2])
  new_state, metrics, per_mb = jax.jit(functools.partial(
      learner.update, graphdefs[0], None, cfg, optimizer, schedule, trainable=trainable))(
          state, data, spread)
  assert float(metrics["kl"]) == 0.0 and float(per_mb["approx_kl"][0]) == 0.0
  before, after = jax.device_get(state.params["policy"]), jax.device_get(new_state.params["policy"])
  assert not np.array_equal(before["lm_head"], after["lm_head"])
  assert not np.array_equal(before["final_norm"]["scale"], after["final_norm"]["scale"])
  for name in ("embed", "layers"):
    jax.tree.map(np.testing.assert_array_equal, before[name], after[name])
  moments = sum(int(np.size(x)) for x in jax.tree.leaves(new_state.opt_state) if np.ndim(x))
  assert moments == 2 * (before["lm_head"].size + before["final_norm"]["scale"].size)
  # PPO's value model trains the same patterns plus its scalar head; a pattern that names no
  # parameter of the policy is an error.
  params = {"policy": before, "value": util.init_params(VALUE, 1)}
  masks = optim.roles_trainable_fn({"policy": False, "value": False}, head)(params)
  trained = lambda mask: sorted(optim.param_path(p) for p, m in
                                jax.tree_util.tree_leaves_with_path(mask) if m)
  assert trained(masks["policy"]) == ["final_norm/scale", "lm_head"]
  assert trained(masks["value"]) == ["final_norm/scale", "score", "score_bias"]
  with pytest.raises(UserError, match="TRAINABLE: 'score' matches no parameter"):
    optim.roles_trainable_fn({"policy": False, "value": False}, ["score"])(params)


def test_role_masks_with_lora_on_the_policy_only():
  # make_stage.value_lora=False: the policy trains its adapters, the value model every weight.
  params = {"policy": transformer.abstract_model(with_lora(POLICY, 4))[1],
            "value": transformer.abstract_model(VALUE)[1]}
  masks = optim.roles_trainable_fn({"policy": True, "value": False}, "all")(params)
  trained = sorted(optim.param_path(p) for p, m in
                   jax.tree_util.tree_leaves_with_path(masks["policy"]) if m)
  assert trained == sorted(f"lora/{t}/{x}" for t in transformer.LORA_TARGETS for x in "ab")
  assert all(jax.tree.leaves(masks["value"]))
  assert optim.roles_trainable_fn({"policy": False, "value": False}, "all") is None


def test_missing_eos_penalty_and_reward_sum():
  cfg = RLConfig(prompt_len=PROMPT_LEN, max_new_tokens=NEW, missing_eos_penalty=-2.5,
                  epochs=1, num_minibatches=1, kl_coef=0.0)
  graphdefs, optimizer, schedule, state = setup(cfg)
  data = make_rollout(graphdefs, cfg, state, *prompts(8))
  data["done"] = jnp.array([True, False] * 4)
  score = jnp.arange(8, dtype=jnp.float32)
  _, metrics, _ = run_update(graphdefs, cfg, optimizer, schedule, state, data, score)
  assert float(metrics["reward_mean"]) == pytest.approx(np.mean(np.arange(8) - 2.5 * (np.arange(8) % 2)))
  assert float(metrics["eos_fraction"]) == 0.5


def test_ptx_coefficient_zero_reproduces_plain_ppo():
  cfg = RLConfig(prompt_len=PROMPT_LEN, max_new_tokens=NEW, epochs=1, num_minibatches=2)
  graphdefs, optimizer, schedule, state = setup(cfg)
  data = make_rollout(graphdefs, cfg, state, *prompts(8))
  lm = util.packed_batch(batch_size=8, seq_len=16, vocab=POLICY.vocab_size)
  with_ptx = {**data, **{f"ptx_{k}": jnp.asarray(v) for k, v in lm.items()}}
  plain, plain_metrics, _ = run_update(graphdefs, cfg, optimizer, schedule, state, data,
                                       data["rm_score"])
  zero, zero_metrics, _ = run_update(graphdefs, cfg, optimizer, schedule, state, with_ptx,
                                     data["rm_score"])
  jax.tree.map(np.testing.assert_array_equal, plain.params, zero.params)
  assert float(plain_metrics["loss"]) == float(zero_metrics["loss"])
  mixed, mixed_metrics, _ = run_update(graphdefs, dataclasses.replace(cfg, ptx_coef=1.0),
                                       optimizer, schedule, state, with_ptx, data["rm_score"])
  assert float(mixed_metrics["ptx_loss"]) > 0
  assert not np.array_equal(np.asarray(mixed.params["policy"]["embed"]),
                            np.asarray(plain.params["policy"]["embed"]))


def test_grpo_groups_of_equal_scores_give_zero_gradient():
  cfg = RLConfig(algorithm="grpo", group_size=4, prompt_len=PROMPT_LEN, max_new_tokens=NEW,
                  epochs=1, num_minibatches=2, kl_coef=0.0)
  learner.validate(cfg)
  graphdefs, optimizer, schedule, state = setup(cfg)
  prompt, length = prompts(2)
  data = make_rollout(graphdefs, cfg, state, np.repeat(prompt, 4, 0), np.repeat(length, 4, 0))
  data["done"] = jnp.ones(8, bool)
  equal = jnp.array([0.3] * 4 + [0.9] * 4)
  _, metrics, per_mb = run_update(graphdefs, cfg, optimizer, schedule, state, data, equal)
  np.testing.assert_array_equal(per_mb["grad_norm"], 0.0)
  assert float(metrics["advantages_mean"]) == 0.0
  spread = jnp.array([0.0, 1.0, 0.0, 1.0, 0.2, 0.2, 0.2, 0.2])
  _, metrics, per_mb = run_update(graphdefs, cfg, optimizer, schedule, state, data, spread)
  assert float(per_mb["grad_norm"][0]) > 0
  assert "value_loss" not in metrics


@pytest.mark.parametrize("algorithm,rank,group", [("ppo", 0, 1), ("grpo", 0, 1), ("ppo", 4, 1),
                                                  ("grpo", 0, 2)],
                         ids=["ppo", "grpo", "ppo-lora", "grpo-shared-prompts"])
def test_update_is_the_same_on_one_device_and_a_2x2x2_mesh(algorithm, rank, group):
  """group 2: each prompt on 2 rows, computed once per group on one device and once per row on
  the mesh (4 batch shards for 4 rows per minibatch: prompt_sharing)."""
  cfg = RLConfig(algorithm=algorithm, group_size=2 if algorithm == "grpo" else 1,
                  prompt_len=PROMPT_LEN, max_new_tokens=NEW, epochs=2, num_minibatches=2)
  graphdefs, optimizer, schedule, state = setup(cfg, lr=3e-3, rank=rank)
  prompt, length = prompts(8 // group)
  data = make_rollout(graphdefs, cfg, state, np.repeat(prompt, group, 0),
                      np.repeat(length, group, 0))
  score = data["rm_score"]
  results = []
  for shape in ({"data": 1, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2}):
    mesh, rules = util.mesh_of(shape), parallel.axis_rules()
    names = {"policy": transformer.abstract_model(with_lora(POLICY, rank))[2]}
    if cfg.algorithm != "grpo":
      names["value"] = transformer.abstract_model(with_lora(VALUE, rank))[2]
    extras_names = {"reward": transformer.abstract_model(VALUE)[2],
                    "kl_ctl": {k: () for k in state.extras["kl_ctl"]}}
    if not rank:
      extras_names["reference"] = names["policy"]
    shardings = state_shardings(mesh, rules, state, names, extras_names)
    rows = jax.tree.map(lambda x: parallel.batch_sharding(mesh, rules, x.ndim), data)
    with parallel.activate(mesh, rules):
      fn = jax.jit(functools.partial(learner.update, graphdefs[0], graphdefs[1], cfg, optimizer,
                                     schedule, trainable=trainable_of(state.params), group=group),
                   in_shardings=(shardings, rows, parallel.replicated(mesh)),
                   out_shardings=(shardings, parallel.replicated(mesh),
                                  parallel.replicated(mesh)))
      new_state, metrics, _ = fn(jax.device_put(state, shardings), jax.device_put(data, rows),
                                 score)
    results.append((jax.tree.map(np.asarray, new_state.params),
                    {k: float(v) for k, v in metrics.items()}))
  (p1, m1), (p8, m8) = results
  for key in m1:
    assert m8[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-6), key
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p1, p8)


# --- learning: a rule-based score rises, KL stays bounded, a larger KL coefficient keeps it lower


TARGET = 7  # the score is the fraction of response tokens equal to TARGET


def train_on_rule(cfg, kl_coef, iterations, lr=3e-3, batch=32):
  cfg = dataclasses.replace(cfg, kl_coef=kl_coef)
  graphdefs, optimizer, schedule, state = setup(cfg, lr=lr, seed=3)
  pgd, vgd, _ = graphdefs
  group = cfg.group_size if cfg.algorithm == "grpo" else 1

  @jax.jit
  def iteration(state, prompt, length):
    data = rollout_lib.rollout(pgd, None, cfg, state.params["policy"], None, prompt, length,
                               jax.random.fold_in(state.rng, 0), eos_id=EOS, pad_id=PAD)
    data.update(prompt=prompt, prompt_length=length)
    hits = jnp.sum((data["response"] == TARGET) * data["mask"], axis=1)
    score = hits / jnp.maximum(jnp.sum(data["mask"], axis=1), 1)
    new_state, metrics, _ = learner.update(pgd, vgd, cfg, optimizer, schedule, state, data, score)
    return new_state, {**metrics, "score": jnp.mean(score)}

  history = []
  for i in range(iterations):
    prompt, length = prompts(batch // group, seed=100 + i)
    state, metrics = iteration(state, jnp.asarray(np.repeat(prompt, group, 0)),
                               jnp.asarray(np.repeat(length, group, 0)))
    history.append({k: float(v) for k, v in metrics.items()})
  return history


@pytest.mark.slow
@pytest.mark.parametrize("algorithm,lr,low_kl", [("ppo", 3e-3, 0.05), ("grpo", 1e-3, 0.01)])
def test_rl_raises_a_rule_based_score_with_bounded_kl(algorithm, lr, low_kl):
  cfg = RLConfig(algorithm=algorithm, group_size=8 if algorithm == "grpo" else 1,
                  prompt_len=PROMPT_LEN, max_new_tokens=NEW, epochs=2, num_minibatches=2,
                  missing_eos_penalty=0.0, vf_coef=0.5)
  low = train_on_rule(cfg, kl_coef=low_kl, iterations=30, lr=lr)
  start = np.mean([h["score"] for h in low[:3]])  # about 1/48: TARGET is one token of 48
  gained = [i for i, h in enumerate(low) if h["score"] >= start + 0.2]
  assert gained, [round(h["score"], 2) for h in low]
  assert low[gained[0]]["kl"] < 8.0, (gained[0], low[gained[0]])
  high = train_on_rule(cfg, kl_coef=0.5, iterations=30, lr=lr)
  assert np.mean([h["kl"] for h in high[-3:]]) < np.mean([h["kl"] for h in low[-3:]])


def test_response_scorer_reads_masked_tokens_up_to_eos(tokenizer_path):
  from lmtrain.data import scorers, tokenizer as tokenizer_lib
  tok = tokenizer_lib.Tokenizer.load(tokenizer_path)
  ids = tok.encode("127")
  n = len(ids)
  tokens = np.array([ids + [tok.eos_id, 9, 9], ids + [9, tok.eos_id, 9]])
  mask = np.array([[1] * (n + 1) + [0, 0], [1] * (n + 2) + [0]])
  scorer = scorers.ResponseScorer("exact_match", [{"answer": "0"}, {"answer": "127"}], tok)
  assert scorer.texts(tokens, mask)[0] == "127"
  # row 0 answers record 1 (right), row 1 has an extra token before its EOS (wrong)
  np.testing.assert_array_equal(scorer(tokens, mask, [1, 1]), [1.0, 0.0])
  np.testing.assert_array_equal(scorer(tokens, mask, [0, 1]), [0.0, 0.0])


def test_prompt_batches_and_zipped_iterator_state_round_trip(tokenizer_path, tmp_path):
  import json
  from lmtrain.data import prompts as prompts_lib, tokenizer as tokenizer_lib
  tok = tokenizer_lib.Tokenizer.load(tokenizer_path)
  path = tmp_path / "prompts.jsonl"
  path.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                          for i in range(20)))

  def make(seed, group_size=1):
    return prompts_lib.make_prompt_iterator([str(path)], tok, prompt_len=48, batch_size=4,
                                            seed=seed, group_size=group_size)

  grouped = next(make(0, group_size=2))
  assert grouped["prompt"].shape == (4, 48)
  np.testing.assert_array_equal(grouped["index"][0::2], grouped["index"][1::2])
  np.testing.assert_array_equal(grouped["prompt"][0], grouped["prompt"][1])
  n = int(grouped["prompt_length"][0])
  assert 2 < n < 48 and np.all(grouped["prompt"][0, :48 - n] == tok.pad_id)  # left-padded
  assert grouped["prompt"][0, 48 - n] == tok.bos_id
  zipped = prompts_lib.ZipIterator(make(0), ptx=make(1))
  next(zipped), next(zipped)
  state = zipped.get_state()
  want = next(zipped)
  assert set(want) == {"prompt", "prompt_length", "index", "ptx_prompt", "ptx_prompt_length",
                       "ptx_index"}
  fresh = prompts_lib.ZipIterator(make(0), ptx=make(1))
  fresh.set_state(state)
  got = next(fresh)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])


# --- the rollout path at scale: decode layout, microbatches, the split checks


def _compiled_decode(fn, mesh):
  rules = parallel.axis_rules()
  _, abstract, names = transformer.abstract_model(POLICY)
  shardings = parallel.tree_shardings(mesh, abstract, names, rules)
  rows = parallel.named_sharding(mesh, ("batch", None), rules, (8, PROMPT_LEN))
  per_row = parallel.named_sharding(mesh, ("batch",), rules, (8,))
  with parallel.activate(mesh, rules):
    return jax.jit(fn, in_shardings=(shardings, rows, per_row)), shardings, rows, per_row


def test_decode_loop_gathers_no_weights_and_greedy_tokens_equal_the_training_layout():
  cfg = RLConfig(prompt_len=PROMPT_LEN, max_new_tokens=NEW)
  pgd, _, _ = transformer.abstract_model(POLICY)
  kwargs = dict(eos_id=EOS, pad_id=PAD, greedy=True)

  def training_layout(params, prompt, length):  # the FSDP-sharded weights, as they are trained
    return generate_lib.sample_sequences(pgd, params, prompt, length, jax.random.PRNGKey(0),
                                         max_new_tokens=NEW, left_padded=True, **kwargs).tokens

  def decode_layout(params, prompt, length):
    return rollout_lib.rollout(pgd, None, cfg, params, None, prompt, length,
                               jax.random.PRNGKey(0), **kwargs)["response"]

  params = util.init_params(POLICY, 0)
  prompt, length = prompts(8)
  mesh = util.mesh_of({"fsdp": 4})
  tokens, gathered = {}, {}
  for name, fn in (("training", training_layout), ("decode", decode_layout)):
    jitted, shardings, rows, per_row = _compiled_decode(fn, mesh)
    with parallel.activate(mesh, parallel.axis_rules()):
      args = (jax.device_put(params, shardings), jax.device_put(prompt, rows),
              jax.device_put(length, per_row))
      gathered[name] = [t for t in bench.while_body_all_gathers(jitted.lower(*args).compile().as_text())
                        if t.startswith("f32")]
      tokens[name] = np.asarray(jitted(*args))
  assert len(gathered["training"]) >= 9  # every weight, again for every token
  assert gathered["decode"] == []
  np.testing.assert_array_equal(tokens["decode"], tokens["training"])
  one_device = generate_lib.generate(pgd, params, prompt, length, jax.random.PRNGKey(0),
                                     max_new_tokens=NEW, left_padded=True, **kwargs).tokens
  np.testing.assert_array_equal(tokens["decode"], one_device)


def test_frozen_and_rollout_matrices_in_the_compute_dtype_change_no_output():
  cfg16 = dataclasses.replace(POLICY, dtype="bfloat16")
  gd, _, names = transformer.abstract_model(cfg16)
  params = util.init_params(POLICY, 0)
  cast = transformer.cast_matrices(params, names, jnp.bfloat16)
  dtypes = {jax.tree_util.keystr(k): v.dtype for k, v in jax.tree_util.tree_leaves_with_path(cast)}
  assert dtypes["['embed']"] == jnp.bfloat16 and dtypes["['layers']['attn']['q']"] == jnp.bfloat16
  assert dtypes["['final_norm']['scale']"] == jnp.float32  # vectors stay as they are
  tokens = jnp.asarray(prompts(4)[0])
  full = transformer.merge(gd, params)(tokens)
  np.testing.assert_array_equal(np.asarray(transformer.merge(gd, cast)(tokens)), np.asarray(full))
  stored = sum(x.nbytes for x in jax.tree.leaves(cast))
  assert stored < 0.52 * sum(x.nbytes for x in jax.tree.leaves(params))


@pytest.mark.parametrize("algorithm,aggregation", [("ppo", "token"), ("grpo", "sequence")])
def test_microbatches_give_the_same_update(algorithm, aggregation):
  cfg = RLConfig(algorithm=algorithm, group_size=2 if algorithm == "grpo" else 1,
                  prompt_len=PROMPT_LEN, max_new_tokens=NEW, epochs=2, num_minibatches=2,
                  loss_aggregation=aggregation, entropy_coef=0.01)
  graphdefs, optimizer, schedule, state = setup(cfg, lr=3e-3)
  data = make_rollout(graphdefs, cfg, state, *prompts(16))
  pgd, vgd, _ = graphdefs
  results = []
  for micro in (1, 4):
    fn = jax.jit(functools.partial(learner.update, pgd, vgd, cfg, optimizer, schedule,
                                   microbatches=micro))
    new_state, metrics, _ = fn(state, data, data["rm_score"])
    results.append((jax.tree.map(np.asarray, new_state.params),
                    {k: float(v) for k, v in metrics.items()}))
  (p1, m1), (p4, m4) = results
  for key in m1:
    assert m4[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-6), key
  # Adam divides by sqrt(v): where a gradient is ~0, rounding moves the step by up to ~lr/100
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), p1, p4)
  changed = jax.tree.map(lambda a, b: float(np.max(np.abs(a - np.asarray(b)))), p1,
                         state.params)
  assert max(jax.tree.leaves(changed)) > 1e-4  # the update is not a no-op


@pytest.mark.parametrize("micro", [1, 2])
def test_one_update_per_rollout_takes_old_logprobs_from_its_own_pass(micro, monkeypatch):
  """GRPO with EPOCHS x NUM_MINIBATCHES = 1 skips the policy's pass before the update
  (learner.on_policy): the same new weights and metrics as with it, at ~4/5 of the FLOPs."""
  cfg = RLConfig(algorithm="grpo", group_size=2, prompt_len=PROMPT_LEN, max_new_tokens=NEW,
                 epochs=1, num_minibatches=1, entropy_coef=0.01, kl_coef=0.1)
  assert learner.on_policy(cfg, learner.get_algorithm("grpo"))
  for other in (dataclasses.replace(cfg, epochs=2), dataclasses.replace(cfg, num_minibatches=2)):
    assert not learner.on_policy(other, learner.get_algorithm("grpo"))
  assert not learner.on_policy(dataclasses.replace(cfg, algorithm="ppo"),
                               learner.get_algorithm("ppo"))
  graphdefs, optimizer, schedule, state = setup(cfg, lr=3e-3)
  # a reference unlike the policy, so that the KL and its loss are not 0
  state = state.replace(extras={**state.extras, "reference": util.init_params(POLICY, 7)})
  data = make_rollout(graphdefs, cfg, state, *prompts(16))
  results = {}
  for fresh in (True, False):
    monkeypatch.setattr(learner, "on_policy", lambda cfg, algorithm, fresh=fresh: fresh)
    fn = jax.jit(functools.partial(learner.update, graphdefs[0], None, cfg, optimizer, schedule,
                                   microbatches=micro))
    compiled = fn.lower(state, data, data["rm_score"]).compile()
    new_state, metrics, _ = compiled(state, data, data["rm_score"])
    results[fresh] = (jax.tree.map(np.asarray, new_state.params),
                      {k: float(v) for k, v in metrics.items()}, compiled.cost_analysis()["flops"])
  (p_fast, m_fast, flops_fast), (p_full, m_full, flops_full) = results[True], results[False]
  assert set(m_fast) == set(m_full)
  assert m_full["kl"] > 1e-3 and m_full["entropy"] > 0.1
  for key in m_full:
    assert m_fast[key] == pytest.approx(m_full[key], rel=1e-5, abs=1e-7), key
  assert m_fast["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
  # Adam divides by sqrt(v): where a gradient is ~0, rounding moves the step by a little more
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), p_fast, p_full)
  # one forward of the policy (of five: reference, policy, the update's forward and backward)
  assert 0.7 < flops_fast / flops_full < 0.9, (flops_fast, flops_full)


def test_prompt_sharing_follows_groups_microbatches_and_the_mesh():
  assert rollout_lib.prompt_sharing(8, 4) == 4  # no mesh: a whole group per prompt pass
  assert rollout_lib.prompt_sharing(6, 4) == 2  # the largest divisor of the group the rows allow
  assert rollout_lib.prompt_sharing(8, 1) == 1
  with parallel.activate(util.mesh_of({"data": 1, "fsdp": 8, "tensor": 1}), parallel.axis_rules()):
    assert rollout_lib.prompt_sharing(16, 8) == 2  # 8 prompt rows still fill the 8 shards
    assert rollout_lib.prompt_sharing(8, 8) == 1  # one row per device: nothing to share
    assert rollout_lib.prompt_sharing(2, 1) == 1  # fewer rows than shards (PPO's minibatches)
    assert rollout_lib.prompt_sharing(4, 4) == 1
  with parallel.activate(util.mesh_of({"data": 2, "fsdp": 2, "tensor": 2}), parallel.axis_rules()):
    assert rollout_lib.prompt_sharing(8, 4) == 2  # 4 batch shards: tensor does not split rows
  # microbatch j takes rows j, j + n, ...: a group of 4 leaves 2 consecutive rows in each of 2
  assert learner.shared_rows(8, 4, 2) == 2
  assert learner.shared_rows(8, 3, 2) == 1
  order = np.asarray(learner.group_permutation(jax.random.PRNGKey(3), 12, 3)).reshape(4, 3)
  np.testing.assert_array_equal(order - order[:, :1], np.tile(np.arange(3), (4, 1)))
  assert sorted(order[:, 0]) == [0, 3, 6, 9] and list(order[:, 0]) != [0, 3, 6, 9]
  np.testing.assert_array_equal(learner.group_permutation(jax.random.PRNGKey(3), 12, 1),
                                jax.random.permutation(jax.random.PRNGKey(3), 12))
  # The RL stage tells its rollout and learner how its prompt batches repeat each prompt.
  graphdefs = (transformer.abstract_model(POLICY)[0], transformer.abstract_model(VALUE)[0], None)
  for kw, group in (({"algorithm": "grpo", "group_size": 4}, 4), ({"algorithm": "ppo"}, 1)):
    step = rl_stage.RLStep(RLConfig(**kw), {"policy": POLICY, "value": VALUE}, graphdefs, None,
                           None, True, 16)
    assert step.group == group


@pytest.mark.parametrize("micro", [1, 2])
def test_grouped_prompts_computed_once_give_the_same_rollout_and_update(micro, monkeypatch):
  """GRPO's samples of one prompt: the rollout's prefill and reward pass and the learner's
  reference and policy passes compute the prompt once per group; the same responses, scores,
  new weights and metrics as computing it on every row, for less work."""
  cfg = RLConfig(algorithm="grpo", group_size=4, prompt_len=PROMPT_LEN, max_new_tokens=NEW,
                 epochs=2, num_minibatches=2, kl_coef=0.1, entropy_coef=0.01)
  graphdefs, optimizer, schedule, state = setup(cfg, lr=3e-3)
  state = state.replace(extras={**state.extras, "reference": util.init_params(POLICY, 7)})
  pgd, _, rgd = graphdefs
  prompt, length = prompts(4)
  prompt, length = jnp.asarray(np.repeat(prompt, 4, 0)), jnp.asarray(np.repeat(length, 4, 0))
  outs = [jax.jit(functools.partial(rollout_lib.rollout, pgd, rgd, cfg, eos_id=EOS, pad_id=PAD,
                                    group=group))(state.params["policy"], state.extras["reward"],
                                                  prompt, length, jax.random.PRNGKey(5))
          for group in (4, 1)]
  np.testing.assert_array_equal(outs[0]["response"], outs[1]["response"])
  np.testing.assert_array_equal(outs[0]["mask"], outs[1]["mask"])
  assert len(set(np.asarray(outs[0]["response"][:4, 0]).tolist())) > 1  # the samples differ
  np.testing.assert_allclose(outs[0]["rm_score"], outs[1]["rm_score"], rtol=1e-5, atol=1e-6)
  data = {**outs[0], "prompt": prompt, "prompt_length": length}
  score = jnp.linspace(0.0, 1.0, 16)
  results = []
  for share in (True, False):
    if not share:  # the same shuffles (by group), every row computing its own prompt
      monkeypatch.setattr(learner, "shared_rows", lambda *args: 1)
    fn = jax.jit(functools.partial(learner.update, pgd, None, cfg, optimizer, schedule,
                                   microbatches=micro, group=4))
    compiled = fn.lower(state, data, score).compile()
    new_state, metrics, _ = compiled(state, data, score)
    results.append((jax.tree.map(np.asarray, new_state.params),
                    {k: float(v) for k, v in metrics.items()}, compiled.cost_analysis()["flops"]))
  (p_shared, m_shared, flops_shared), (p_rows, m_rows, flops_rows) = results
  assert m_rows["kl"] > 1e-3
  for key in m_rows:
    assert m_shared[key] == pytest.approx(m_rows[key], rel=1e-4, abs=1e-6), key
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), p_shared,
               p_rows)
  assert flops_shared < 0.9 * flops_rows, (flops_shared, flops_rows)


def test_minibatch_splits_that_the_mesh_does_not_divide_are_one_line_errors():
  cfg = RLConfig(num_minibatches=2)
  learner.check_minibatches(32, cfg, 2, shards=8)
  for rows, micro, shards, text in (
      (31, 1, 1, "BATCH_SIZE=31 does not divide into NUM_MINIBATCHES=2"),
      (32, 3, 1, "a minibatch of 16 rollouts (BATCH_SIZE=32 / NUM_MINIBATCHES=2) does not "
                 "divide into MICROBATCHES=3"),
      (32, 4, 8, "4 rollouts per microbatch (BATCH_SIZE=32 / NUM_MINIBATCHES=2 / "
                 "MICROBATCHES=4) do not divide over the mesh's 8 batch shards"),
      (8, 1, 8, "4 rollouts per minibatch (BATCH_SIZE=8 / NUM_MINIBATCHES=2) do not divide")):
    with pytest.raises(UserError, match=re.escape(text)):
      learner.check_minibatches(rows, cfg, micro, shards)
  for bad, text in (({"advantage_estimator": "rloo"}, "PPO uses gae"),
                    ({"algorithm": "grpo", "group_size": 2, "advantage_estimator": "gae"},
                     "GRPO takes grpo, dr_grpo, rloo, reinforce_baseline"),
                    ({"loss_aggregation": "mean"}, "LOSS_AGGREGATION='mean'"),
                    ({"kl_clip": 0.0}, "KL_CLIP=0.0"),
                    ({"rollout_dtype": "int8"}, "ROLLOUT_DTYPE='int8'")):
    with pytest.raises(UserError, match=re.escape(text)):
      learner.validate(RLConfig(**bad))


def test_reward_clip_bounds_the_scores_before_the_eos_penalty():
  cfg = RLConfig(prompt_len=PROMPT_LEN, max_new_tokens=NEW, reward_clip=0.5,
                  missing_eos_penalty=-1.0, epochs=1, num_minibatches=1)
  graphdefs, optimizer, schedule, state = setup(cfg)
  data = make_rollout(graphdefs, cfg, state, *prompts(4))
  data["done"] = jnp.array([True, True, False, True])
  _, metrics, _ = run_update(graphdefs, cfg, optimizer, schedule, state, data,
                             jnp.array([3.0, -3.0, 0.2, 0.1]))
  # (0.5 - 0.5 + (0.2 - 1) + 0.1) / 4
  assert float(metrics["reward_mean"]) == pytest.approx(-0.7 / 4)


def test_a_value_learning_rate_or_clip_gives_the_value_model_its_own_optimizer():
  make_schedule = functools.partial(optim.make_schedule, total_steps=10, warmup_steps=2)
  schedule = make_schedule(learning_rate=1e-3)
  graphdefs = (transformer.abstract_model(POLICY)[0], transformer.abstract_model(VALUE)[0], None)
  step_of = lambda **kw: rl_stage.RLStep(RLConfig(**kw), {"policy": POLICY, "value": VALUE},
                                         graphdefs, None, None, True, 8)
  params = {"policy": util.init_params(POLICY, 0), "value": util.init_params(VALUE, 1)}
  # Two steps (Adam's first one is the gradients' sign, whatever the clip), norms above any clip.
  rng = np.random.default_rng(0)
  grads = [jax.tree.map(lambda p: jnp.full_like(p, 3.0), params),
           jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)]

  def two_steps(opt, params, grads):
    state = opt.init(params)
    for g in grads:
      updates, state = opt.update(g, state, params)
    return updates

  joint = step_of().optimizer(schedule, make_schedule)
  own = step_of(value_learning_rate=5e-2, value_clip_norm=0.5).optimizer(schedule, make_schedule)
  updates = two_steps(own, params, grads)
  value_schedule = make_schedule(learning_rate=5e-2)
  for role, opt in (("policy", optim.make_optimizer(schedule, clip_norm=1.0)),
                    ("value", optim.make_optimizer(value_schedule, clip_norm=0.5))):
    alone = two_steps(opt, params[role], [g[role] for g in grads])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), updates[role], alone)
  # Without either setting one optimizer clips the joint gradient: the policy's update differs.
  joint_updates = two_steps(joint, params, grads)
  assert not np.allclose(joint_updates["policy"]["embed"], updates["policy"]["embed"])

  # Either optimizer's moments are laid out like the params they belong to, the rest replicated;
  # for the joint one that is the layout optax.tree_map_params gives.
  mesh, rules = util.mesh_of({"data": 2, "fsdp": 2, "tensor": 2}), parallel.axis_rules()
  names = {"policy": transformer.abstract_model(POLICY)[2],
           "value": transformer.abstract_model(VALUE)[2]}
  param_keys = lambda tree: {jax.tree_util.keystr(p): s
                             for p, s in jax.tree_util.tree_leaves_with_path(tree)}
  for opt in (joint, own):
    state = jax.eval_shape(lambda: TrainState.create(params, opt, jax.random.PRNGKey(0)))
    shardings = state_shardings(mesh, rules, state, names)
    by_param = param_keys(shardings.params)
    moments = 0
    for key, s in param_keys(shardings.opt_state).items():
      owner = [p for p in by_param if key.endswith(p)]
      if ".mu" in key or ".nu" in key:
        moments += 1
        assert owner and s == by_param[owner[0]], key
      else:
        assert not owner and s.is_fully_replicated, key
    assert moments == 2 * len(by_param)
  state = jax.eval_shape(lambda: TrainState.create(params, joint, jax.random.PRNGKey(0)))
  expected = optax.tree_map_params(joint, lambda _, s: s, state.opt_state,
                                   state_shardings(mesh, rules, state, names).params,
                                   transform_non_params=lambda _: parallel.replicated(mesh))
  assert state_shardings(mesh, rules, state, names).opt_state == expected
