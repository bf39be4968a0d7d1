"""RL rollout benchmark: rollouts/s, new tokens/s and RL iterations/s, with the decode loop's
parameter all-gathers counted in its compiled HLO.

    python benchmarks/rollout_bench.py                      # bench_tiny, 1 CPU device
    python benchmarks/rollout_bench.py --devices 4 --mesh "{'fsdp': 4}"

The shape of the TRL comparison in the README: 8 rollouts of 32 new tokens after 224-token prompts
(every row generates all 32: no EOS), a reward model of the policy's shape scoring each. Two rollout
layouts, timed in one run:
  training: today's weights as they are trained (FSDP-sharded), so the decode loop gathers every
    layer's weights again for every generated token;
  decode: lmtrain.rl.rollout.rollout, the policy laid out for inference once per rollout
    (rl.rollout.decode_layout: ROLLOUT_DTYPE, whole along the batch axes).
Then whole iterations (rollout, reward, the learner's update) of GRPO (8 samples of one prompt,
1 epoch, 1 minibatch: the prompt's prefill and its passes through the reference, reward model and
policy computed once for its group as far as the mesh allows, rl.rollout.prompt_sharing; TRL's
shape) and PPO (8 prompts, value model, 2 epochs x 2 minibatches). Figures are printed, never
asserted.
"""

import argparse
import os
import sys
import time


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="bench_tiny")
  parser.add_argument("--devices", type=int, default=1, help="fake CPU devices (CPU only)")
  parser.add_argument("--mesh", default="{'fsdp': -1}", help="mesh shape over data/fsdp/tensor")
  parser.add_argument("--rollouts", type=int, default=8)
  parser.add_argument("--prompt_len", type=int, default=224)
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up")
  parser.add_argument("--dtype", default="float32", help="compute dtype (auto: bf16 on TPU/GPU)")
  args = parser.parse_args()
  if args.devices > 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
  run(args)


def _timed(fn, repeats):
  """(first call's seconds (compile + run), mean seconds of the next `repeats` calls)."""
  import jax
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn())
  return first, (time.perf_counter() - start) / repeats


def run(args):
  import ast
  import dataclasses

  import jax
  import jax.numpy as jnp
  import numpy as np

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from lmtrain import bench, config, parallel
  from lmtrain.model import generate as generate_lib
  from lmtrain.model import transformer
  from lmtrain.rl import core, learner, rollout as rollout_lib
  from lmtrain.rl.config import RLConfig
  from lmtrain.train import optim
  from lmtrain.train.state import TrainState, state_shardings

  policy_cfg = dataclasses.replace(config.preset_config(args.model), dtype=args.dtype)
  value_cfg = dataclasses.replace(policy_cfg, head="scalar")
  mesh = parallel.make_mesh(ast.literal_eval(args.mesh))
  rules = parallel.axis_rules()
  rows, width, new = args.rollouts, args.prompt_len, args.new_tokens
  print(f"{args.model}: {policy_cfg.param_count():,} parameters, {jax.devices()[0].platform} "
        f"x {jax.device_count()}, mesh {dict(mesh.shape)}, {rows} rollouts of {new} new tokens "
        f"after {width}-token prompts, dtype {policy_cfg.compute_dtype.name}")

  pgd, p_abs, p_names = transformer.abstract_model(policy_cfg)
  vgd, v_abs, v_names = transformer.abstract_model(value_cfg)
  p_shard = parallel.tree_shardings(mesh, p_abs, p_names, rules)
  v_shard = parallel.tree_shardings(mesh, v_abs, v_names, rules)
  policy = jax.jit(transformer.init_fn(policy_cfg), out_shardings=p_shard)(jax.random.PRNGKey(0))
  reward = jax.jit(transformer.init_fn(value_cfg), out_shardings=v_shard)(jax.random.PRNGKey(1))
  rng = np.random.default_rng(0)
  prompt_np = rng.integers(4, policy_cfg.vocab_size, (rows, width)).astype(np.int32)
  row_sharding = parallel.named_sharding(mesh, ("batch", None), rules, prompt_np.shape)
  len_sharding = parallel.named_sharding(mesh, ("batch",), rules, (rows,))
  prompt = jax.device_put(prompt_np, row_sharding)
  length = jax.device_put(np.full(rows, width, np.int32), len_sharding)
  cfg = RLConfig(prompt_len=width, max_new_tokens=new)
  sample = dict(eos_id=-1, pad_id=0)  # no EOS: every row generates all `new` tokens

  def training_layout(policy, reward, prompt, length):
    out = generate_lib.sample_sequences(pgd, policy, prompt, length, jax.random.PRNGKey(2),
                                        max_new_tokens=new, left_padded=True, **sample)
    if reward is None:
      return out.tokens
    mask = out.mask.astype(jnp.float32)
    return rollout_lib.sequence_reward(transformer.merge(vgd, reward), prompt, length,
                                       out.tokens, mask)

  def decode_layout(policy, reward, prompt, length):
    out = rollout_lib.rollout(pgd, None if reward is None else vgd, cfg, policy, reward, prompt,
                              length, jax.random.PRNGKey(2), **sample)
    return out["response"] if reward is None else out["rm_score"]

  results = {}
  for name, fn in (("training", training_layout), ("decode", decode_layout)):
    with parallel.activate(mesh, rules):
      jitted = jax.jit(fn, in_shardings=(p_shard, v_shard, row_sharding, len_sharding))
      compiled = jitted.lower(policy, reward, prompt, length).compile()
      # The count without the reward model, whose own layer scan (once per rollout, in the
      # training layout) is a while loop too.
      sampling = jax.jit(lambda p, x, n, fn=fn: fn(p, None, x, n),
                         in_shardings=(p_shard, row_sharding, len_sharding))
      gathers = bench.while_body_all_gathers(
          sampling.lower(policy, prompt, length).compile().as_text())
    floats = [g for g in gathers if g.startswith(("f32", "bf16", "f16"))]
    first, seconds = _timed(lambda c=compiled: c(policy, reward, prompt, length), args.repeats)
    results[name] = seconds
    print(f"  rollout, {name} layout: {rows / seconds:8.2f} rollouts/s, "
          f"{rows * new / seconds:9.1f} new tokens/s, {seconds:.3f} s per rollout (first call "
          f"{first:.2f} s with compile); all-gathers in the decode loop: {len(floats)} of floats "
          f"(weights), {len(gathers) - len(floats)} of integers/flags ({sorted(set(gathers) - set(floats))[:3]})")
  print(f"  decode vs training layout: {results['training'] / results['decode']:.2f}x")

  for algorithm, group, epochs, minibatches in (("grpo", rows, 1, 1), ("ppo", 1, 2, 2)):
    rl_cfg = RLConfig(algorithm=algorithm, prompt_len=width, max_new_tokens=new,
                      group_size=group, epochs=epochs, num_minibatches=minibatches)
    schedule = optim.make_schedule(learning_rate=1e-5, total_steps=100, warmup_steps=0)
    optimizer = optim.make_optimizer(schedule)
    params = {"policy": policy}
    names = {"policy": p_names}
    if algorithm == "ppo":
      params["value"], names["value"] = jax.tree.map(jnp.copy, reward), v_names
    kl = core.kl_controller_init(rl_cfg.kl_coef, rl_cfg.kl_target, rl_cfg.kl_horizon)
    extras = {"reference": policy, "reward": reward, "kl_ctl": jax.tree.map(jnp.asarray, kl)}
    extras_names = {"reference": p_names, "reward": v_names, "kl_ctl": {k: () for k in kl}}
    state = jax.jit(lambda p, e: TrainState.create(p, optimizer, jax.random.PRNGKey(3), e))(
        params, extras)
    shardings = state_shardings(mesh, rules, state, names, extras_names)
    state = jax.device_put(state, shardings)
    # GRPO: one prompt's `rows` samples (TRL's shape); PPO: a sample of each of `rows` prompts.
    group_prompt = jax.device_put(np.repeat(prompt_np[:1], rows, axis=0), row_sharding)
    prompts = group_prompt if algorithm == "grpo" else prompt
    with parallel.activate(mesh, rules):
      share = rollout_lib.prompt_sharing(rows, group)

    def iteration(state, prompt, length, rl_cfg=rl_cfg, optimizer=optimizer, schedule=schedule,
                  algorithm=algorithm):
      out = rollout_lib.rollout(pgd, vgd, rl_cfg, state.params["policy"], state.extras["reward"],
                                prompt, length, jax.random.PRNGKey(4), group=group, **sample)
      data = {**out, "prompt": prompt, "prompt_length": length}
      new_state, metrics, _ = learner.update(pgd, vgd if algorithm == "ppo" else None, rl_cfg,
                                             optimizer, schedule, state, data, out["rm_score"],
                                             group=group)
      return new_state, metrics["loss"]

    with parallel.activate(mesh, rules):
      step = jax.jit(iteration, in_shardings=(shardings, row_sharding, len_sharding),
                     out_shardings=(shardings, parallel.replicated(mesh)))
      compiled = step.lower(state, prompts, length).compile()
    holder = {"state": state}

    def one(compiled=compiled, prompts=prompts):
      holder["state"], loss = compiled(holder["state"], prompts, length)
      return loss

    first, seconds = _timed(one, args.repeats)
    print(f"  {algorithm} iteration ({epochs} epoch(s) x {minibatches} minibatch(es), prompt "
          f"computed once per {share} row(s)): "
          f"{1 / seconds:6.3f} iterations/s = {rows / seconds:7.2f} rollouts/s, {seconds:.3f} s "
          f"each (first call {first:.2f} s with compile)")


if __name__ == "__main__":
  main()
