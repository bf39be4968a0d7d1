"""`lmtrain bench`: training throughput, MFU, memory and compile-time figures for a model preset.

Measured with the same sharded train step the stages run, on synthetic packed batches. With
`--generate`, new tokens/s of KV-cache sampling instead, against recomputing the whole sequence for each
new token. Compare figures from one run (the machine is noisy); nothing here is a pass/fail test.
"""

import dataclasses
import json
import re
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

BENCH_PRESETS = ("bench_tiny", "bench_small", "tiny", "demo", "small", "125m", "1b", "llama2_7b",
                 "llama3_8b")


def add_arguments(p):
  p.add_argument("--model", default="bench_tiny", help=f"preset: {', '.join(BENCH_PRESETS)}")
  p.add_argument("--seq_len", type=int, default=None, help="default: 256 (bench_tiny), else 512")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--steps", type=int, default=10, help="timed steps after one warm-up step")
  p.add_argument("--dtype", default="float32", help="compute dtype: float32, bfloat16, or auto (bf16 on TPU/GPU)")
  p.add_argument("--remat", default=None, help="none | full | save_dots (default: the preset's)")
  p.add_argument("--no_scan_layers", action="store_true",
                 help="run the layers unrolled (ModelConfig.scan_layers=False)")
  p.add_argument("--attention_impl", default=None,
                 help="xla | cudnn | chunked | causal_blocks | splash | auto "
                 "(default: the preset's)")
  p.add_argument("--mesh", default="{'data': 1, 'fsdp': -1, 'tensor': 1}",
                 help="mesh shape over data/fsdp/tensor")
  p.add_argument("--compile_layers", default="4,32",
                 help="also time compilation of this model at these depths ('' to skip)")
  p.add_argument("--lora_rank", type=int, default=0,
                 help="> 0: LoRA adapters of this rank on all seven projections, the base frozen")
  p.add_argument("--trainable", default="all",
                 help="'all', or comma-separated regexes over parameter paths (TRAINABLE), e.g. "
                      "final_norm/scale,lm_head")
  p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
  p.add_argument("--generate", action="store_true",
                 help="measure generation (KV cache vs full recomputation) instead of training")
  p.add_argument("--prompt_len", type=int, default=64, help="with --generate: prompt tokens")
  p.add_argument("--new_tokens", type=int, default=128, help="with --generate: tokens generated")


def while_body_all_gathers(hlo: str) -> list[str]:
  """Result types (e.g. 'f32[256,768]') of the all-gathers in a compiled HLO text's while-loop
  bodies and everything they call: for a decode loop, the weights gathered again per token."""
  comps, current = {}, None
  for line in hlo.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header:
      current = header.group(1)
      comps[current] = []
    elif current:
      comps[current].append(line)
  callees = {name: set(re.findall(r"(?:body|condition|to_apply|calls)=%?([\w.\-]+)",
                                  "\n".join(lines))) for name, lines in comps.items()}
  todo = [b for lines in comps.values() for line in lines
          for b in re.findall(r"body=%?([\w.\-]+)", line)]
  seen = set()
  while todo:
    name = todo.pop()
    if name in comps and name not in seen:
      seen.add(name)
      todo.extend(callees[name])
  return [re.search(r"= (\S+) all-gather\(", line).group(1)
          for name in seen for line in comps[name] if " all-gather(" in line]


def _model_config(preset, **overrides):
  from lmtrain import config
  cfg = config.preset_config(preset)
  return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def _batch(batch_size, seq_len, vocab):
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, vocab, (batch_size, seq_len + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "segment_ids": np.ones((batch_size, seq_len), np.int32),
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)),
          "loss_mask": np.ones((batch_size, seq_len), np.float32)}


def _setup(cfg, mesh, batch_size, seq_len, trainable="all"):
  """Sharded state, batch and the lowered train step for `cfg` on `mesh`, training what
  `trainable` (TRAINABLE's patterns) and, with LoRA, the adapters name; also the abstract state."""
  import optax
  from lmtrain import parallel
  from lmtrain.model import transformer
  from lmtrain.stages.pretrain import lm_loss
  from lmtrain.train import optim
  from lmtrain.train.state import state_shardings
  from lmtrain.train.state import TrainState
  from lmtrain.train.step import make_train_step
  rules = parallel.axis_rules()
  graphdef, abstract_params, names = transformer.abstract_model(cfg)
  schedule = optax.constant_schedule(1e-4)
  mask = optim.trainable_fn(trainable, lora=cfg.lora_rank > 0)
  optimizer = optim.make_optimizer(schedule, trainable=mask)
  abstract_state = jax.eval_shape(
      lambda p: TrainState.create(p, optimizer, jax.random.PRNGKey(0)), abstract_params)
  shardings = state_shardings(mesh, rules, abstract_state, names)
  batch_sharding = parallel.batch_sharding(mesh, rules)
  step = make_train_step(graphdef, lm_loss, optimizer, schedule, trainable=mask)
  with mesh, parallel.activate(mesh, rules):
    jitted = jax.jit(step, in_shardings=(shardings, batch_sharding),
                     out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
    abstract_sharded = parallel.with_shardings(abstract_state, shardings)
    batch = _batch(batch_size, seq_len, cfg.vocab_size)
    abstract_batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding), batch)
    start = time.perf_counter()
    lowered = jitted.lower(abstract_sharded, abstract_batch)
    compiled = lowered.compile()
    compile_time = time.perf_counter() - start
  return compiled, compile_time, shardings, batch_sharding, optimizer, batch, abstract_state, mask


def compile_seconds(cfg, mesh, batch_size, seq_len, trainable="all") -> float:
  return _setup(cfg, mesh, batch_size, seq_len, trainable)[1]


def _peak_memory(compiled) -> tuple[float, str]:
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"], "device peak_bytes_in_use"
  analysis = compiled.memory_analysis()
  if analysis is not None:
    total = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
             + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
    return total, "XLA buffer assignment (arguments + outputs + temporaries)"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"


def measure(cfg, mesh, batch_size, seq_len, steps, trainable="all") -> dict:
  from lmtrain.model import transformer
  from lmtrain.train import metrics as metrics_lib
  from lmtrain.train import optim
  from lmtrain.train.state import TrainState
  compiled, compile_time, shardings, batch_sharding, optimizer, batch, abstract, mask = _setup(
      cfg, mesh, batch_size, seq_len, trainable)
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  with mesh:
    params = jax.jit(transformer.init_fn(cfg), out_shardings=shardings.params)(
        jax.random.PRNGKey(0))
    state = jax.jit(lambda p: TrainState.create(p, optimizer, jax.random.PRNGKey(0)),
                    out_shardings=shardings)(params)
    device_batch = jax.device_put(batch, batch_sharding)
    state, m = compiled(state, device_batch)  # warm-up
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      state, m = compiled(state, device_batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - start)
  step_time = statistics.median(times)
  tokens_per_sec = batch_size * seq_len / step_time
  flops_per_token = cfg.flops_per_token(seq_len)
  peak, peak_source = metrics_lib.peak_flops_per_device()
  memory, memory_source = _peak_memory(compiled)
  return {
      "params": cfg.param_count(),
      "trained_params": optim.trained_count(
          abstract.params, None if mask is None else mask(abstract.params)),
      "optimizer_state_bytes": nbytes(abstract.opt_state),
      "tokens_per_sec": tokens_per_sec,
      "step_time_s": step_time,
      "model_flops_per_token": flops_per_token,
      "mfu": metrics_lib.mfu(tokens_per_sec, flops_per_token, mesh.size, peak),
      "peak_flops_per_device": peak,
      "peak_flops_source": peak_source,
      "peak_memory_per_device_bytes": memory / (1 if "device" in memory_source else mesh.size),
      "peak_memory_source": memory_source,
      "compile_time_s": compile_time,
      "final_loss": float(m["loss"]),
  }


# The recomputing baseline's cost per token is fixed by its buffer, not by how many steps run, so it is
# timed over at most this many steps (a full run of bench_small takes minutes on CPU).
BASELINE_STEPS = 32


def _recompute_sampler(graphdef):
  """Greedy decoding by a full forward over the whole [B, prompt + new] buffer for each new token."""
  from lmtrain.model import transformer

  def run(params, buf, lengths, steps):
    model = transformer.merge(graphdef, params)

    def step(i, buf):
      # Causal attention: the unfilled tail of the buffer cannot affect the positions read here.
      hidden = model.hidden(buf)
      last = jnp.take_along_axis(hidden, (lengths + i - 1)[:, None, None], axis=1)
      token = jnp.argmax(model.logits(last)[:, 0], axis=-1).astype(buf.dtype)
      return buf.at[jnp.arange(buf.shape[0]), lengths + i].set(token)

    return jax.lax.fori_loop(0, steps, step, buf)

  return run


def _timed(fn, *args, repeats: int = 3) -> float:
  """Median seconds of fn(*args) after one warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure_generate(cfg, mesh, batch_size, prompt_len, new_tokens) -> dict:
  """New tokens/s of greedy KV-cache generation and of the full-recomputation baseline."""
  from lmtrain import parallel
  from lmtrain.model import generate, transformer
  rules = parallel.axis_rules()
  graphdef, abstract_params, names = transformer.abstract_model(cfg)
  param_shardings = parallel.tree_shardings(mesh, abstract_params, names, rules)
  rows = parallel.named_sharding(mesh, ("batch", None), rules, (batch_size, prompt_len))
  prompts = np.random.default_rng(0).integers(4, cfg.vocab_size, (batch_size, prompt_len),
                                              dtype=np.int32)
  lengths = np.full((batch_size,), prompt_len, np.int32)
  rng = jax.random.PRNGKey(0)
  with mesh:
    params = jax.jit(transformer.init_fn(cfg), out_shardings=param_shardings)(rng)
    start = time.perf_counter()
    # eos_id -1 never matches, so every run generates all new_tokens.
    sampler = generate.make_generate(mesh, rules, cfg, batch_size, prompt_len,
                                     max_new_tokens=new_tokens, greedy=True, eos_id=-1)
    cache_compile = time.perf_counter() - start
    cache_time = _timed(sampler, params, prompts, lengths, rng)

    buf = np.zeros((batch_size, prompt_len + new_tokens), np.int32)
    buf[:, :prompt_len] = prompts
    steps = min(new_tokens, BASELINE_STEPS)
    with parallel.activate(mesh, rules):
      baseline = jax.jit(_recompute_sampler(graphdef), in_shardings=(
          param_shardings, rows, parallel.named_sharding(mesh, ("batch",), rules, (batch_size,)),
          parallel.replicated(mesh)), out_shardings=rows)
      start = time.perf_counter()
      baseline = baseline.lower(params, buf, lengths, np.int32(steps)).compile()
      baseline_compile = time.perf_counter() - start
    baseline_time = _timed(baseline, params, buf, lengths, np.int32(steps))
  cache_rate = batch_size * new_tokens / cache_time
  baseline_rate = batch_size * steps / baseline_time
  return {
      "params": cfg.param_count(),
      "kv_cache_new_tokens_per_sec": cache_rate,
      "kv_cache_generate_time_s": cache_time,
      "kv_cache_compile_time_s": cache_compile,
      "recompute_new_tokens_per_sec": baseline_rate,
      "recompute_timed_steps": steps,
      "recompute_compile_time_s": baseline_compile,
      "kv_cache_speedup": cache_rate / baseline_rate,
  }


def _print(result, as_json: bool):
  if as_json:
    print(json.dumps(result))
    return
  for key, value in result.items():
    if isinstance(value, float):
      shown = f"{value:.2%}" if key == "mfu" else f"{value:,.4g}" if value < 1e4 else f"{value:,.0f}"
    else:
      shown = f"{value:,}" if isinstance(value, int) else str(value)
    print(f"{key:<34} {shown}")


def run(args):
  import ast
  from lmtrain import parallel
  from lmtrain.errors import UserError
  if args.model not in BENCH_PRESETS:
    raise UserError(f"--model {args.model}: choose one of {', '.join(BENCH_PRESETS)}")
  seq_len = args.seq_len or (256 if args.model == "bench_tiny" else 512)
  cfg = _model_config(args.model, dtype=args.dtype, remat=args.remat,
                      attention_impl=args.attention_impl, lora_rank=args.lora_rank or None,
                      scan_layers=False if args.no_scan_layers else None)
  trainable = args.trainable if args.trainable == "all" else [
      pattern.strip() for pattern in args.trainable.split(",") if pattern.strip()]
  mesh = parallel.make_mesh(ast.literal_eval(args.mesh))
  if args.generate:
    result = {"model": args.model, "batch_size": args.batch_size, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "dtype": args.dtype,
              "devices": f"{mesh.size} x {jax.devices()[0].device_kind}",
              **measure_generate(cfg, mesh, args.batch_size, args.prompt_len, args.new_tokens)}
    _print(result, args.json)
    return result
  result = {"model": args.model, "seq_len": seq_len, "batch_size": args.batch_size,
            "dtype": args.dtype, "devices": f"{mesh.size} x {jax.devices()[0].device_kind}",
            **({"lora_rank": args.lora_rank} if args.lora_rank else {}),
            **({"trainable": args.trainable} if args.trainable != "all" else {}),
            **({"scan_layers": False} if args.no_scan_layers else {}),
            **measure(cfg, mesh, args.batch_size, seq_len, args.steps, trainable)}
  for layers in [int(x) for x in args.compile_layers.split(",") if x.strip()]:
    deep = dataclasses.replace(cfg, num_layers=layers)
    result[f"compile_time_{layers}_layers_s"] = compile_seconds(deep, mesh, args.batch_size, seq_len,
                                                                trainable)
  _print(result, args.json)
  return result
