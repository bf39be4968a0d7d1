"""`lmtrain plan`: will a run fit, how long will it take, what will it cost, before paying for it.

Per-device memory of the train state is exact: the abstract state a stage would create (trained
params, AdamW's two moments, frozen roles) laid out by the same shardings the loop uses, so a shape
that a mesh axis does not divide is counted replicated, as it would be. Gradients are the trained
params' size. Activations are an estimate from the shapes (remat policy, attention implementation,
logits chunking; see `activation_bytes`); `--measure` compiles the real gradient on this machine's
devices and reads XLA's figure instead. The training loop runs the same check before allocating.

Compute: training FLOPs per token are ModelConfig.flops_per_token (6 x matmul params + causal
attention); time = tokens x FLOPs per token / (chips x peak x MFU).
"""

import dataclasses

import jax
import optax

from lmtrain import parallel
from lmtrain.errors import UserError
from lmtrain.model import lora, transformer
from lmtrain.train import optim, roles
from lmtrain.train import step as step_lib
from lmtrain.train.memory import GIB, measure_activations, memory_plan
from lmtrain.train.metrics import PEAK_FLOPS
from lmtrain.train.state import TrainState, state_shardings

CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022, compute-optimal training


@dataclasses.dataclass(frozen=True)
class Hardware:
  name: str
  peak_flops: float  # dense bf16 per chip
  memory_gib: float  # per chip
  source: str
  cores_per_chip: int = 1  # TPU slice names count TensorCores (v4-8, v5p-8 are 4 chips)


# Peaks from the loop's own table (lmtrain/train/metrics.py, keyed by device kind); V100 is not a
# device the loop meets, so its FP16 tensor-core figure stands here.
HARDWARE = {
    "v4": Hardware("TPU v4", PEAK_FLOPS["TPU v4"], 32, "cloud.google.com/tpu/docs/v4", 2),
    "v5e": Hardware("TPU v5e", PEAK_FLOPS["TPU v5e"], 16, "cloud.google.com/tpu/docs/v5e"),
    "v5p": Hardware("TPU v5p", PEAK_FLOPS["TPU v5p"], 95, "cloud.google.com/tpu/docs/v5p", 2),
    "v6e": Hardware("TPU v6e", PEAK_FLOPS["TPU v6e"], 32, "cloud.google.com/tpu/docs/v6e"),
    "a100": Hardware("NVIDIA A100 80GB", PEAK_FLOPS["NVIDIA A100"], 80,
                     "NVIDIA A100 datasheet (dense BF16)"),
    "h100": Hardware("NVIDIA H100 SXM", PEAK_FLOPS["NVIDIA H100"], 80,
                     "NVIDIA H100 datasheet (dense BF16)"),
    "h200": Hardware("NVIDIA H200 SXM", PEAK_FLOPS["NVIDIA H200"], 141e9 / GIB,
                     "NVIDIA H200 datasheet (141 GB)"),
    "v100": Hardware("NVIDIA V100 SXM2 32GB", 125e12, 32, "NVIDIA V100 datasheet (FP16 tensor)"),
}

# Which roles each stage holds: (role, head, trained). PPO's value model and the reward model are
# the policy's shape with a scalar head.
STAGE_ROLES = {
    "pretrain": [(roles.POLICY, "lm", True)],
    "sft": [(roles.POLICY, "lm", True)],
    "reward": [(roles.REWARD, "scalar", True)],
    "dpo": [(roles.POLICY, "lm", True), (roles.REFERENCE, "lm", False)],
    "ppo": [(roles.POLICY, "lm", True), (roles.VALUE, "scalar", True),
            (roles.REFERENCE, "lm", False), (roles.REWARD, "scalar", False)],
    "grpo": [(roles.POLICY, "lm", True), (roles.REFERENCE, "lm", False),
             (roles.REWARD, "scalar", False)],
}


def cpu_hardware() -> Hardware:
  """This machine's CPU: the measured matmul rate as its peak, physical memory as its memory."""
  import os
  from lmtrain.train import metrics
  memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
  return Hardware("CPU (this machine)", metrics.measured_matmul_flops() / len(jax.devices()),
                  memory, "measured fp32 matmul rate; physical memory")


def chips_of_slice(name: str) -> tuple[str, int]:
  """'v5p-8' -> ('v5p', 4): TPU slice names count TensorCores on v4/v5p, chips on v5e/v6e."""
  kind, _, count = name.partition("-")
  tpus = [k for k, h in HARDWARE.items() if h.name.startswith("TPU")]
  if kind not in tpus or not count.isdigit():
    raise UserError(f"--slice {name!r}: expected KIND-N with KIND one of {', '.join(tpus)}, "
                    f"e.g. v5p-8")
  hardware = HARDWARE[kind]
  return kind, max(1, int(count) // hardware.cores_per_chip)


def shape_for_params(n: float, vocab: int = 32000) -> transformer.ModelConfig:
  """A LLaMA-style shape of about n parameters: width 128 x depth (GPT-3's ratio), heads of 128,
  SwiGLU MLP of 8/3 width (12 d^2 per layer), untied embeddings of `vocab`."""
  d = max(128, round((128 * n / 12) ** (1 / 3) / 128) * 128)
  layers = max(1, round((n - 2 * vocab * d) / (12 * d * d)))
  mlp = max(256, round(8 * d / 3 / 256) * 256)
  return transformer.ModelConfig(vocab_size=vocab, d_model=d, num_layers=layers,
                                 num_heads=d // 128, mlp_dim=mlp)


def stage_state(stage: str, cfg: transformer.ModelConfig, mesh, rules, frozen_dtype="auto",
                lora_base_dtype="auto"):
  """(abstract train state, its shardings) of `stage` for model `cfg` on `mesh`, as the stage
  would create it (AdamW over the trained roles; frozen roles in extras, their matrices in
  `frozen_dtype` for PPO/GRPO, as FROZEN_DTYPE stores them). With LoRA (cfg.lora_rank), the
  trained models have adapters and AdamW covers those (and a scalar head) only, the frozen ones
  none, and DPO's and PPO/GRPO's reference is the policy's base itself (no copy); PPO's value
  model has adapters too (make_stage.value_lora's default), and the trained models' frozen base
  matrices are held in `lora_base_dtype` (LORA_BASE_DTYPE)."""
  if stage not in STAGE_ROLES:
    raise UserError(f"--stage {stage!r}; choose one of {', '.join(STAGE_ROLES)}")
  trees, names, trained = {}, {}, []
  for role, head, is_trained in STAGE_ROLES[stage]:
    if cfg.lora_rank and role == roles.REFERENCE:
      continue
    model = cfg if is_trained else lora.base_config(cfg)
    _, trees[role], names[role] = transformer.abstract_model(
        dataclasses.replace(model, head=head, lm_score=False))
    if is_trained:
      trained.append(role)
  frozen = [r for r in trees if r not in trained]
  if stage in ("ppo", "grpo"):
    dtype = transformer.resolve_dtype(frozen_dtype, cfg)
    for r in frozen:
      trees[r] = jax.eval_shape(
          lambda tree, r=r: transformer.cast_matrices(tree, names[r], dtype), trees[r])

  def params_of(tree):  # loss stages train one params tree; PPO/GRPO a dict of roles
    return tree[trained[0]] if stage not in ("ppo", "grpo") else {r: tree[r] for r in trained}

  trainable = stage_trainable(stage, cfg)
  optimizer = optim.make_optimizer(optax.constant_schedule(0.0),  # the state's shapes only
                                   trainable=trainable)

  def create(trees):
    state = TrainState.create(params_of(trees), optimizer, jax.random.PRNGKey(0),
                              {r: trees[r] for r in frozen})
    if not cfg.lora_rank:
      return state
    base = step_lib.frozen_base(state.params, trainable(state.params))
    return state.replace(params=transformer.cast_matrices(
        state.params, params_of(names), transformer.resolve_dtype(lora_base_dtype, cfg),
        only=base))

  abstract_state = jax.eval_shape(create, trees)
  shardings = state_shardings(mesh, rules, abstract_state, params_of(names),
                              {r: names[r] for r in frozen})
  return abstract_state, shardings


def stage_trainable(stage: str, cfg: transformer.ModelConfig):
  """The mask function of what `stage` trains with TRAINABLE='all' (optim.trainable_fn; for
  PPO/GRPO's {policy, value}, optim.roles_trainable_fn), or None when every weight trains."""
  if stage in ("ppo", "grpo"):
    trained = [role for role, _, is_trained in STAGE_ROLES[stage] if is_trained]
    return optim.roles_trainable_fn({role: cfg.lora_rank > 0 for role in trained}, "all")
  return optim.trainable_fn("all", lora=cfg.lora_rank > 0)


def compute_plan(cfg, seq_len: int, tokens: float, chips: int, hardware: Hardware, mfu: float,
                 sustained_flops: float | None = None, price: float | None = None) -> dict:
  flops_per_token = cfg.flops_per_token(seq_len)
  total = flops_per_token * tokens
  rate = sustained_flops if sustained_flops else hardware.peak_flops * mfu
  seconds = total / (chips * rate)
  chip_hours = seconds / 3600 * chips
  return {"flops_per_token": flops_per_token, "six_n_per_token": 6 * cfg.param_count(),
          "tokens": tokens, "total_flops": total, "flops_per_chip_per_s": rate,
          "seconds": seconds, "days": seconds / 86400, "chip_hours": chip_hours,
          "chip_years": chip_hours / (24 * 365.25),
          "cost": None if price is None else chip_hours * price,
          "chinchilla_tokens": CHINCHILLA_TOKENS_PER_PARAM * cfg.param_count()}


def _number(text: str, flag: str) -> float:
  """'7e9', '175B', '300B', '1.4T', '6.7M' -> float."""
  suffixes = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}
  text = text.strip().lower().replace("_", "").replace(",", "")
  try:
    if text and text[-1] in suffixes:
      return float(text[:-1]) * suffixes[text[-1]]
    return float(text)
  except ValueError:
    raise UserError(f"{flag} {text!r} is not a number (e.g. 7e9, 175B, 1.4T)") from None


def add_arguments(p):
  what = p.add_mutually_exclusive_group()
  what.add_argument("--model", default=None,
                    help=f"a preset ({', '.join(transformer.PRESET_NAMES)})")
  what.add_argument("--params", default=None, help="a LLaMA-style shape of about N parameters")
  p.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                 help="a ModelConfig field, e.g. remat=full or attention_impl=chunked")
  p.add_argument("--stage", default="pretrain", help=", ".join(STAGE_ROLES))
  p.add_argument("--seq_len", type=int, default=2048)
  p.add_argument("--batch_size", type=int, default=None,
                 help="global batch in sequences (default: one per data x fsdp shard)")
  p.add_argument("--microbatches", type=int, default=1)
  p.add_argument("--rollouts", type=int, default=None, help="ppo/grpo: rows of the KV cache "
                 "(default: the batch); prompt + response length is --seq_len")
  for flag, what in (("--frozen_dtype", "ppo/grpo: the reference's and reward model's stored "
                                       "matrices"),
                     ("--rollout_dtype", "ppo/grpo: the policy's decode copy"),
                     ("--lora_base_dtype", "with --lora_rank: the trained models' frozen base "
                                           "matrices (LORA_BASE_DTYPE)")):
    p.add_argument(flag, default="auto", help=f"{what}: auto (the compute dtype), float32 or "
                   "bfloat16")
  where = p.add_mutually_exclusive_group()
  where.add_argument("--slice", default=None, help="a TPU slice, e.g. v5p-8 (4 chips), v5e-256")
  where.add_argument("--hardware", default=None, help=", ".join([*HARDWARE, "cpu"]))
  p.add_argument("--chips", type=int, default=None, help="with --hardware: how many chips")
  p.add_argument("--mesh", default=None,
                 help="mesh shape, e.g. \"{'data': 1, 'fsdp': -1, 'tensor': 4}\" (default: "
                      "all chips on fsdp)")
  p.add_argument("--tokens", default=None, help="token budget (default: Chinchilla, 20 per param)")
  p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to assume")
  p.add_argument("--sustained_tflops", type=float, default=None,
                 help="per-chip sustained TFLOP/s instead of peak x MFU")
  p.add_argument("--price_per_chip_hour", type=float, default=None,
                 help="your price; none is assumed")
  p.add_argument("--measure", action="store_true",
                 help="compile the gradient here for the activation figure (LM stages)")
  p.add_argument("--json", action="store_true", help="print one JSON object")


def _model(args) -> transformer.ModelConfig:
  import ast
  if args.params:
    cfg = shape_for_params(_number(args.params, "--params"))
  else:
    from lmtrain import config
    cfg = config.preset_config(args.model or "1b")
  overrides = {}
  for item in args.override:
    field, eq, value = item.partition("=")
    if not eq or field not in {f.name for f in dataclasses.fields(cfg)}:
      raise UserError(f"--override {item!r}: expected FIELD=VALUE with a ModelConfig field")
    try:
      overrides[field] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[field] = value
  return dataclasses.replace(cfg, **overrides).validate()


def plan(args) -> dict:
  import ast
  cfg = _model(args)
  if args.slice:
    kind, chips = chips_of_slice(args.slice)
    hardware = HARDWARE[kind]
  else:
    kind = args.hardware or "cpu"
    if kind != "cpu" and kind not in HARDWARE:
      raise UserError(f"--hardware {kind!r}; choose one of {', '.join([*HARDWARE, 'cpu'])}")
    hardware = cpu_hardware() if kind == "cpu" else HARDWARE[kind]
    chips = args.chips or (len(jax.devices()) if kind == "cpu" else 1)
  if kind != "cpu" and cfg.dtype == "auto":
    cfg = dataclasses.replace(cfg, dtype="bfloat16")  # what `auto` is on an accelerator
  try:
    shape = ast.literal_eval(args.mesh) if args.mesh else {"fsdp": -1}
  except (ValueError, SyntaxError):
    raise UserError(f"--mesh {args.mesh!r} is not a dict like {{'fsdp': -1}}") from None
  mesh = parallel.abstract_mesh(shape, chips)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  batch = args.batch_size or shards
  if batch % (args.microbatches * shards):
    raise UserError(f"--batch_size {batch} does not split into {args.microbatches} microbatches "
                    f"over {shards} data x fsdp shards")
  local = batch // shards // args.microbatches
  abstract_state, shardings = stage_state(args.stage, cfg, mesh, parallel.axis_rules(),
                                          args.frozen_dtype, args.lora_base_dtype)
  memory = memory_plan(abstract_state, shardings, cfg, local, args.seq_len, mesh,
                       hardware.memory_gib, stage_trainable(args.stage, cfg))
  if args.stage in ("ppo", "grpo"):  # the decode copy of the policy and the KV cache
    from lmtrain.rl.rollout import rollout_memory
    memory.parts.update(rollout_memory(cfg, args.rollout_dtype, mesh, args.rollouts or batch,
                                       args.seq_len))
  if args.measure:
    memory.activations, memory.activations_measured = measure_activations(
        cfg, local, args.seq_len), True
  tokens = (_number(args.tokens, "--tokens") if args.tokens
            else CHINCHILLA_TOKENS_PER_PARAM * cfg.param_count())
  sustained = args.sustained_tflops * 1e12 if args.sustained_tflops else None
  compute = compute_plan(cfg, args.seq_len, tokens, chips, hardware, args.mfu, sustained,
                         args.price_per_chip_hour)
  return {
      "model": {"params": cfg.param_count(), "d_model": cfg.d_model, "layers": cfg.num_layers,
                "heads": cfg.num_heads, "kv_heads": cfg.kv_heads, "mlp_dim": cfg.mlp_dim,
                "vocab": cfg.vocab_size, "remat": cfg.remat, "dtype": str(cfg.compute_dtype),
                "attention": cfg.attention_impl},
      "stage": args.stage, "seq_len": args.seq_len, "global_batch": batch,
      "microbatches": args.microbatches,
      "hardware": {"name": hardware.name, "chips": chips, "memory_gib": hardware.memory_gib,
                   "peak_flops": hardware.peak_flops, "source": hardware.source},
      "mesh": dict(mesh.shape),
      "memory_per_device_bytes": {**memory.parts, "activations": memory.activations,
                                  "total": memory.total},
      "activations": "measured (XLA, this machine)" if memory.activations_measured else "estimated",
      "fits": memory.fits, "compute": compute,
  }


def _size(n: float) -> str:
  return f"{n / GIB:>10.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:>10.2f} MiB"


def _duration(seconds: float) -> str:
  for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("hours", 3600),
                     ("minutes", 60)):
    if seconds >= size:
      return f"{seconds / size:,.1f} {unit}"
  return f"{seconds:.0f} s"


def render(result: dict) -> str:
  m, hw, c = result["model"], result["hardware"], result["compute"]
  mem = result["memory_per_device_bytes"]
  lines = [
      f"model      {m['params']:,} parameters (d {m['d_model']}, {m['layers']} layers, "
      f"{m['heads']}/{m['kv_heads']} heads, MLP {m['mlp_dim']}, vocab {m['vocab']}; "
      f"{m['dtype']}, remat {m['remat']}, attention {m['attention']})",
      f"run        {result['stage']}, seq {result['seq_len']}, global batch "
      f"{result['global_batch']} ({result['global_batch'] * result['seq_len']:,} tokens)"
      f", {result['microbatches']} microbatch(es)",
      f"hardware   {hw['chips']} x {hw['name']} ({hw['memory_gib']:.0f} GiB, "
      f"{hw['peak_flops'] / 1e12:.3g} TFLOP/s peak; {hw['source']}); mesh "
      + " x ".join(f"{k} {v}" for k, v in result["mesh"].items()),
      "memory per device:"]
  how = {"activations": result["activations"], "total": ""}
  for name, value in mem.items():
    lines.append(f"  {name:<18} {_size(value)}  {how.get(name, 'exact (shapes, shardings)')}")
  verdict = {True: "fits", False: "DOES NOT FIT", None: "device memory unknown"}[result["fits"]]
  lines.append(f"  -> {verdict} in {hw['memory_gib']:.1f} GiB "
               f"({mem['total'] / GIB / hw['memory_gib']:.0%})")
  lines += [
      "compute:",
      f"  training FLOPs per token {c['flops_per_token']:.3e} (6 x matmul params + attention at "
      f"seq {result['seq_len']}; 6N over all params: {c['six_n_per_token']:.3e})",
      f"  tokens {c['tokens']:.3e} (Chinchilla-optimal for this size: "
      f"{c['chinchilla_tokens']:.3e}, 20 per parameter)",
      f"  total {c['total_flops']:.3e} FLOPs at {c['flops_per_chip_per_s'] / 1e12:.3g} TFLOP/s "
      f"per chip: {_duration(c['seconds'])} on {hw['chips']} chip(s) = "
      f"{c['chip_hours']:,.0f} chip-hours ({c['chip_years']:,.1f} chip-years)",
      "  cost " + ("pass --price_per_chip_hour" if c["cost"] is None
                   else f"at your price: {c['cost']:,.0f}")]
  return "\n".join(lines)


def run(args):
  import json
  result = plan(args)
  print(json.dumps(result, indent=1) if args.json else render(result))
