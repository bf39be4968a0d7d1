"""Decoder-only transformer of the LLaMA family in Flax NNX.

RMSNorm, rotary position embeddings (half-rotated layout; optionally with linear or Llama 3.1-style
frequency scaling), SwiGLU MLP, grouped-query attention, tied or untied embeddings, no biases. The
blocks are stacked on a leading `layers` axis and run with `lax.scan`, so compile time does not grow
with depth (`scan_layers=False` unrolls it). Every parameter names its logical axes; the
activations at block boundaries get sharding constraints (no-ops without a mesh).

For generation, `prefill` runs a prompt through the scanned layers and returns its keys/values as a
KV cache of one buffer per layer, and `decode` continues the sequences one step at a time with
the layers unrolled (see lmtrain/model/generate.py). `hidden_shared` runs rows that begin with the
same prompt (GRPO's samples of it) with that prompt computed once.
"""

import dataclasses
import functools
import math
from typing import NamedTuple

import gin
import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lmtrain import parallel
from lmtrain.errors import UserError
from lmtrain.model import attention

# Variables get their sharding from our own rules (lmtrain.parallel), not at creation.
nnx.use_eager_sharding(False)

ROPE_SCALINGS = ("none", "linear", "llama3")

# Activations named with checkpoint_name in Attention, for the policies that keep some of them.
_QKV = ("query", "key", "value")
REMAT_POLICIES = {
    "none": None,
    # Keep only each block's input (the scan carry): everything else is recomputed.
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Keep the rotated queries, keys and values: the backward recomputes the MLP and the attention
    # core but not the projections.
    "save_qkv": jax.checkpoint_policies.save_only_these_names(*_QKV),
    # Also keep the attention core's output, so the output projection needs no recompute either.
    "save_attention": jax.checkpoint_policies.save_only_these_names(*_QKV, "attention_out"),
    # save_attention's tensors moved to host memory (pinned_host) and back for the backward:
    # device memory relief on TPU/GPU at the cost of transfers.
    "offload_attention": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[*_QKV, "attention_out"],
        offload_src="device", offload_dst="pinned_host"),
}


# The weights LoRA can adapt (ModelConfig.lora_targets): the attention and MLP projections.
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 32000
  d_model: int = 512
  num_layers: int = 8
  num_heads: int = 8
  num_kv_heads: int | None = None  # None: same as num_heads (no grouping)
  head_dim: int | None = None  # None: d_model // num_heads
  mlp_dim: int = 1536
  rope_theta: float = 10000.0
  # RoPE frequency scaling (see rope_frequencies): none | linear (every frequency / factor) | llama3
  # (Llama 3.1: low frequencies / factor, high ones kept, a smooth ramp between the two bands).
  rope_scaling: str = "none"
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original_max_len / this are scaled
  rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original_max_len / this are kept
  rope_original_max_len: int = 8192  # llama3: the context length the model was pre-trained with
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  remat: str = "none"  # a key of REMAT_POLICIES: none | full | save_dots | save_qkv | ...
  # True: the layers run as one lax.scan over their stacked weights (compile time flat in depth).
  # False: the same loop unrolled, so XLA sees every layer (no stacked buffers of saved
  # activations to fill and slice; faster on CPU for small models, compile time grows with
  # depth). MaxText's scan_layers. Decoding always unrolls (Transformer.decode).
  scan_layers: bool = True
  # Compute dtype; parameters (and optimizer state) stay float32. auto: bfloat16 on TPU/GPU, float32
  # on CPU (tests compare numbers at fp32 precision).
  dtype: str = "auto"
  # xla | cudnn | chunked | causal_blocks | splash | auto (lmtrain.model.attention): auto is splash
  # on TPU, cuDNN on GPU in 16-bit compute, else chunked from attention_chunked_from tokens on,
  # else causal_blocks on CPU and xla on GPU.
  attention_impl: str = "xla"
  attention_block: int = 512  # chunked and splash: query and key block length
  attention_chunked_from: int = 2048
  # lm: next-token logits. scalar: one score per position (reward model, PPO value model), no LM head.
  head: str = "lm"
  # Scalar head only (reward models): keep the LM head too, and a learned weight (initially 1) that
  # adds weight x the mean log-prob of the response under the trunk's own next-token predictions to
  # the score (lmtrain.rl.core.reward_scores). The EOS head alone must learn to compare the answer
  # with the prompt; the trunk's likelihood already does.
  lm_score: bool = False
  # Training losses project to the vocabulary this many positions at a time, so that the
  # [B, T, vocab] fp32 logits never exist (lmtrain.losses.token_cross_entropy); 0: all at once.
  logits_chunk: int = 0
  # LoRA (lmtrain/model/lora.py): rank of the low-rank adapters beside each weight named in
  # lora_targets (q, k, v, o, gate, up, down); their product x A B is scaled by lora_alpha / rank.
  # 0: no adapters.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple = LORA_TARGETS
  # The rate of the dropout on each adapter's input (x -> dropout(x) A B, as PEFT does), applied
  # only where a training step passes a dropout key (Transformer.hidden); 0: none.
  lora_dropout: float = 0.0

  def __post_init__(self):  # read back from model.json, a list
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def head_size(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def compute_dtype(self):
    if self.dtype == "auto":
      return jnp.dtype(jnp.bfloat16 if jax.default_backend() in ("tpu", "gpu") else jnp.float32)
    return jnp.dtype(self.dtype)

  def validate(self) -> "ModelConfig":
    if self.num_heads % self.kv_heads:
      raise UserError(f"ModelConfig: num_heads={self.num_heads} is not a multiple of "
                      f"num_kv_heads={self.kv_heads}")
    if self.remat not in REMAT_POLICIES:
      raise UserError(f"ModelConfig.remat={self.remat!r}; choose one of {sorted(REMAT_POLICIES)}")
    if self.attention_impl not in attention.IMPLEMENTATIONS:
      raise UserError(f"ModelConfig.attention_impl={self.attention_impl!r}; choose one of "
                      f"{', '.join(attention.IMPLEMENTATIONS)}")
    if self.attention_block < 1 or self.attention_chunked_from < 1:
      raise UserError(f"ModelConfig.attention_block={self.attention_block} and "
                      f"attention_chunked_from={self.attention_chunked_from} must be positive")
    if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
      raise UserError(f"ModelConfig.dtype={self.dtype!r}; choose auto, float32, bfloat16 or float16")
    if self.head not in ("lm", "scalar"):
      raise UserError(f"ModelConfig.head={self.head!r}; choose lm or scalar")
    if self.lm_score and self.head != "scalar":
      raise UserError("ModelConfig.lm_score=True needs head='scalar' (it is part of a reward "
                      "score)")
    if self.logits_chunk < 0:
      raise UserError(f"ModelConfig.logits_chunk={self.logits_chunk} must be 0 (off) or positive")
    if not isinstance(self.scan_layers, bool):
      raise UserError(f"ModelConfig.scan_layers={self.scan_layers!r} must be True or False")
    if self.lora_rank < 0:
      raise UserError(f"LORA_RANK={self.lora_rank} must be 0 (no adapters) or positive")
    if self.lora_rank:
      bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
      if bad or not self.lora_targets or len(set(self.lora_targets)) < len(self.lora_targets):
        raise UserError(f"LORA_TARGETS={list(self.lora_targets)}: choose one or more (each once) "
                        f"of {', '.join(LORA_TARGETS)}")
      if not self.lora_alpha > 0:
        raise UserError(f"LORA_ALPHA={self.lora_alpha} must be positive")
    if not 0 <= self.lora_dropout < 1:
      raise UserError(f"LORA_DROPOUT={self.lora_dropout} must be at least 0 and below 1")
    if self.head_size % 2:
      raise UserError(f"ModelConfig: head size {self.head_size} must be even for rotary embeddings")
    if self.rope_scaling not in ROPE_SCALINGS:
      raise UserError(f"ModelConfig.rope_scaling={self.rope_scaling!r}; choose one of "
                      f"{', '.join(ROPE_SCALINGS)}")
    if self.rope_scaling != "none" and not self.rope_scaling_factor > 0:
      raise UserError(f"ModelConfig.rope_scaling_factor={self.rope_scaling_factor} must be "
                      f"positive")
    if self.rope_scaling == "llama3" and not (
        0 < self.rope_low_freq_factor < self.rope_high_freq_factor
        and self.rope_original_max_len > 0):
      raise UserError(f"ModelConfig: llama3 rope scaling needs 0 < rope_low_freq_factor "
                      f"({self.rope_low_freq_factor}) < rope_high_freq_factor "
                      f"({self.rope_high_freq_factor}) and rope_original_max_len "
                      f"({self.rope_original_max_len}) > 0")
    return self

  def architecture(self) -> dict:
    """The fields that give the params their meaning; the rest (remat, dtype, attention kernel,
    logits chunking) only say how the same function is computed, and the adapters' dropout only
    how it is trained."""
    execution = {"remat", "scan_layers", "dtype", "attention_impl", "attention_block",
                 "attention_chunked_from", "logits_chunk", "lora_dropout"}
    arch = {k: v for k, v in dataclasses.asdict(self).items() if k not in execution}
    if not self.lora_rank:  # the same model as one written before LoRA existed
      for k in ("lora_rank", "lora_alpha", "lora_targets"):
        arch.pop(k)
    return arch

  @property
  def lora_scale(self) -> float:
    return self.lora_alpha / self.lora_rank

  def lora_shapes(self) -> dict:
    """{target: (input dims, output dims, their logical axes)} of the adapted weights of one layer."""
    d, h, n, k, m = self.d_model, self.head_size, self.num_heads, self.kv_heads, self.mlp_dim
    shapes = {
        "q": ((d,), (n, h), ("embed",), ("heads", "head_dim")),
        "k": ((d,), (k, h), ("embed",), ("kv_heads", "head_dim")),
        "v": ((d,), (k, h), ("embed",), ("kv_heads", "head_dim")),
        "o": ((n, h), (d,), ("heads", "head_dim"), ("embed",)),
        "gate": ((d,), (m,), ("embed",), ("mlp",)),
        "up": ((d,), (m,), ("embed",), ("mlp",)),
        "down": ((m,), (d,), ("mlp",), ("embed",)),
    }
    return {t: shapes[t] for t in self.lora_targets} if self.lora_rank else {}

  def param_count(self) -> int:
    """Exact parameter count, from the shapes (no allocation)."""
    d, h, n, k = self.d_model, self.head_size, self.num_heads, self.kv_heads
    per_layer = d * n * h * 2 + d * k * h * 2 + 3 * d * self.mlp_dim + 2 * d
    lm_head = (self.head == "lm" or self.lm_score) and not self.tie_embeddings
    embeddings = self.vocab_size * d * (2 if lm_head else 1)
    score_head = (d + 1 + int(self.lm_score)) if self.head == "scalar" else 0
    adapters = self.num_layers * sum(self.lora_rank * (math.prod(i) + math.prod(o))
                                     for i, o, _, _ in self.lora_shapes().values())
    return self.num_layers * per_layer + embeddings + d + score_head + adapters

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (non-embedding matmul params + output head) plus causal
    attention. The output head is the vocab projection when the model computes logits (an LM, or a
    reward model with lm_score), else the scalar head's d."""
    d, h, n, k = self.d_model, self.head_size, self.num_heads, self.kv_heads
    matmul_params = self.num_layers * (d * n * h * 2 + d * k * h * 2 + 3 * d * self.mlp_dim)
    matmul_params += self.vocab_size * d if self.head == "lm" or self.lm_score else d
    # QK^T and AV: 2 matmuls x 2 flops x seq x heads x head_dim, halved by the causal mask, x3 for bwd.
    attention = 3 * 2 * 2 * self.num_layers * n * h * seq_len / 2
    return 6 * matmul_params + attention


@gin.configurable
def model_config(preset: str = gin.REQUIRED, overrides: dict | None = None, lora_rank: int = 0,
                 lora_alpha: float = 16.0, lora_targets=LORA_TARGETS,
                 lora_dropout: float = 0.0) -> ModelConfig:
  """The `MODEL` preset (gin scope `preset_<name>` of ModelConfig, gin_configs/models/) plus overrides,
  with LoRA adapters of `lora_rank` (LORA_RANK; 0: none) on `lora_targets`, their inputs dropped
  out at `lora_dropout` in training steps."""
  known = sorted(PRESET_NAMES)
  if preset not in known:
    import difflib
    close = difflib.get_close_matches(preset, known, n=3)
    raise UserError(f"MODEL={preset!r} is not a preset; did you mean {close or known}?")
  # A scope of its own (not nested in a stage scope), so the preset bindings always apply.
  with gin.config_scope(None), gin.config_scope(f"preset_{preset}"):
    cfg = ModelConfig()
  if overrides:
    bad = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    if bad:
      raise UserError(f"model_config.overrides: unknown ModelConfig fields {sorted(bad)}")
    cfg = dataclasses.replace(cfg, **overrides)
  if lora_dropout and not lora_rank:
    raise UserError(f"LORA_DROPOUT={lora_dropout} needs LORA_RANK > 0: it drops out the "
                    f"adapters' inputs")
  if lora_rank:
    cfg = dataclasses.replace(cfg, lora_rank=lora_rank, lora_alpha=lora_alpha,
                              lora_targets=tuple(lora_targets), lora_dropout=lora_dropout)
  return cfg.validate()


# Logical axes of one layer's KV cache (Transformer.prefill / decode): heads before slots, the
# layout the decode step's attention reads without a transpose.
CACHE_AXES = ("batch", "act_kv_heads", "length", None)

PRESET_NAMES = ("tiny", "demo", "small", "125m", "1b", "llama2_7b", "llama3_8b", "llama3_1_8b",
                "bench_tiny", "bench_small")


def _dense_init(fan_in: int, scale: float = 1.0):
  return nnx.initializers.normal(stddev=scale / fan_in**0.5)


def dense(x, w, in_dims: int = 1):
  """x[..., *in] @ w[*in, *out] as one 2-D matmul: XLA's CPU backward of a 3-D einsum against a
  weight is ~40% slower than the flattened form, and on TPU/GPU the two are the same."""
  lead, contract = x.shape[:x.ndim - in_dims], w.shape[:in_dims]
  out = w.shape[in_dims:]
  y = x.reshape(-1, math.prod(contract)) @ w.reshape(math.prod(contract), -1)
  return y.reshape(*lead, *out)


def _param(rngs, init, shape, names):
  return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=names)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=("embed",))

  def __call__(self, x):
    def norm(x, scale):
      x32 = x.astype(jnp.float32)
      normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
      return (normed * scale).astype(x.dtype)

    # The backward recomputes the norm from its input (elementwise work) rather than keeping its
    # fp32 intermediates: less memory and, with the layers scanned, fewer stacked buffers to fill.
    return jax.checkpoint(norm)(x, self.scale[...])


def rope_frequencies(cfg: ModelConfig):
  """[head_size / 2] float32 rotation frequencies (radians per position) of the pairs (i, i + H/2).

  Unscaled: theta^(-i / (H/2)). "linear" divides every one by the factor (positions interpolated).
  "llama3" (Llama 3.1) divides those whose wavelength 2 pi / f exceeds original_max_len /
  low_freq_factor by the factor, keeps those whose wavelength is under original_max_len /
  high_freq_factor, and blends the two in between with the weight
  s = (original_max_len / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor):
  f * (s + (1 - s) / factor).
  """
  half = cfg.head_size // 2
  freqs = cfg.rope_theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  if cfg.rope_scaling == "linear":
    return freqs / cfg.rope_scaling_factor
  if cfg.rope_scaling == "llama3":
    factor, original = cfg.rope_scaling_factor, cfg.rope_original_max_len
    wavelength = 2 * math.pi / freqs
    smooth = ((original / wavelength - cfg.rope_low_freq_factor)
              / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor))
    blended = freqs * (smooth + (1 - smooth) / factor)
    return jnp.where(wavelength < original / cfg.rope_high_freq_factor, freqs,
                     jnp.where(wavelength > original / cfg.rope_low_freq_factor, freqs / factor,
                               blended))
  return freqs


class Rotation(NamedTuple):
  """The rotary embedding at given positions: sin and cos [B, T, 1, H/2] float32 of each
  position times each frequency (rope_frequencies), made once per forward (Rotation.at) and
  applied to every layer's queries and keys. Half-rotated layout: pairs are (i, i + H/2)."""
  sin: jax.Array
  cos: jax.Array

  @classmethod
  def at(cls, positions, cfg: "ModelConfig") -> "Rotation":
    def tables(positions):
      angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(cfg)
      return cls(jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :])

    if jax.default_backend() != "cpu" or positions.shape[-1] == 1:
      return tables(positions)
    # XLA:CPU fuses elementwise producers into each consumer, so plain sin/cos would be
    # recomputed inside every use, once per head and element of every layer's queries and keys,
    # forward and backward (32 sin/cos fusions for bench_tiny's 4 unrolled layers; ~4% of its
    # step). A loop is never fused into its users: made by a one-trip loop whose trip count
    # comes from the positions (a training batch's, so XLA cannot inline it), the tables are
    # computed once. (A decode step's tables are a few numbers; other backends keep plain ops.)
    trips = 1 + jnp.minimum(jnp.abs(positions.ravel()[0]), 0)
    empty = cls(*(jnp.zeros(positions.shape + (1, cfg.head_size // 2), jnp.float32),) * 2)
    return jax.lax.fori_loop(0, trips, lambda _, __: tables(positions), empty)

  def __call__(self, x):
    """x [B, T, N, H] rotated, in x's dtype (computed in float32)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * self.cos - x2 * self.sin, x2 * self.cos + x1 * self.sin],
                           axis=-1).astype(x.dtype)


def project(x, weight, adapters, name: str, dt, in_dims: int = 1):
  """x @ weight in the compute dtype, plus the LoRA adapter's x A B x (alpha / rank) when
  `adapters` (a layer's LayerLora) has one for `name`."""
  y = dense(x, weight[...].astype(dt), in_dims)
  if adapters is not None and name in adapters.targets:
    y = y + adapters(name, x, dt)
  return y


def dropout(x, rate: float, rng):
  """Inverted dropout: each element zeroed with probability `rate` and the others divided by
  1 - rate, so that the expectation is x."""
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


class Adapter(nnx.Module):
  """A low-rank update beside a weight of input dims I and output dims O: A [*I, r] (random) and
  B [r, *O] (zeros, so a fresh adapter changes nothing), each sharded like the weight along its
  own dims and whole along the rank."""

  def __init__(self, shapes, rank: int, scale: float, rngs: nnx.Rngs):
    in_shape, out_shape, in_axes, out_axes = shapes
    self.scale = scale
    self.a = _param(rngs, _dense_init(math.prod(in_shape)), (*in_shape, rank), (*in_axes, None))
    self.b = nnx.Param(jnp.zeros((rank, *out_shape), jnp.float32), out_sharding=(None, *out_axes))

  def __call__(self, x, dt):
    low = dense(x, self.a[...].astype(dt), in_dims=self.a.ndim - 1)
    return dense(low, self.b[...].astype(dt)) * jnp.asarray(self.scale, dt)


class LayerAdapters(nnx.Module):
  """One layer's adapters, an Adapter per LoRA target (ModelConfig.lora_shapes)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.targets = tuple(cfg.lora_shapes())
    for name, shapes in cfg.lora_shapes().items():
      setattr(self, name, Adapter(shapes, cfg.lora_rank, cfg.lora_scale, rngs))


@dataclasses.dataclass(frozen=True)
class LayerLora:
  """A layer's adapters as its projections add them. With `dropout_rng` (a training step's key
  for this layer; ModelConfig.lora_dropout > 0) each adapter's input first goes through dropout
  at `rate`, a mask of its own per target; without one the adapters are applied as they are."""
  adapters: LayerAdapters
  rate: float = 0.0
  dropout_rng: jax.Array | None = None

  @property
  def targets(self):
    return self.adapters.targets

  def __call__(self, name: str, x, dt):
    if self.dropout_rng is not None:
      x = dropout(x, self.rate, jax.random.fold_in(self.dropout_rng, LORA_TARGETS.index(name)))
    return getattr(self.adapters, name)(x, dt)


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size
    self.cfg = cfg
    self.q = _param(rngs, _dense_init(d), (d, n, h), ("embed", "heads", "head_dim"))
    self.k = _param(rngs, _dense_init(d), (d, k, h), ("embed", "kv_heads", "head_dim"))
    self.v = _param(rngs, _dense_init(d), (d, k, h), ("embed", "kv_heads", "head_dim"))
    out_scale = 1.0 / (2 * cfg.num_layers) ** 0.5
    self.o = _param(rngs, _dense_init(n * h, out_scale), (n, h, d), ("heads", "head_dim", "embed"))

  def __call__(self, x, rope, vis, adapters=None):
    return self.attend(*self.project(x, rope, adapters), vis, adapters=adapters)

  def project(self, x, rope: Rotation, adapters=None):
    """Queries [B, T, N, H] and keys [B, T, K, H] rotated by `rope`, and values [B, T, K, H]."""
    cfg, dt = self.cfg, self.cfg.compute_dtype
    q = project(x, self.q, adapters, "q", dt)
    k = project(x, self.k, adapters, "k", dt)
    v = project(x, self.v, adapters, "v", dt)
    q = parallel.constrain(q, ("batch", "length", "act_heads", None))
    k = parallel.constrain(k, ("batch", "length", "act_kv_heads", None))
    q, k = rope(q), rope(k)
    return (checkpoint_name(q, "query"), checkpoint_name(k, "key"), checkpoint_name(v, "value"))

  def attend(self, q, k, v, vis, adapters=None, continuation: bool = False):
    """Attention of q over k, v as `vis` allows, then the output projection. `continuation`:
    the queries are the later part of the keys' sequences (Transformer.hidden_shared), not the
    square causal case: splash, whose mask is causal by index, gives way to chunked (causal_blocks
    reads the continuation's queries as the last of the keys' sequence)."""
    cfg, dt = self.cfg, self.cfg.compute_dtype
    impl = attention.resolve(cfg.attention_impl, k.shape[1], dt, cfg.attention_chunked_from)
    if continuation and impl == "splash":
      impl = "chunked"
    out = attention.attend(q, k, v, vis, impl, cfg.attention_block)
    out = checkpoint_name(parallel.constrain(out, ("batch", "length", "act_heads", None)),
                          "attention_out")
    return project(out, self.o, adapters, "o", dt, in_dims=2)

  def shared(self, x_prefix, x, prefix_rope, rope, prefix_vis, vis, repeats: int,
             adapters=None):
    """(attention outputs of the prefixes [U, P, D], of their continuations [U * repeats, T, D]):
    each prefix attends to itself, and each continuation row to its prefix's keys and values
    (repeated for the `repeats` rows that share it) followed by its own, as `vis` allows."""
    qp, kp, vp = self.project(x_prefix, prefix_rope, adapters)
    q, k, v = self.project(x, rope, adapters)
    k, v = after_shared(kp, k, repeats), after_shared(vp, v, repeats)
    return (self.attend(qp, kp, vp, prefix_vis, adapters),
            self.attend(q, k, v, vis, adapters, continuation=True))

  def prefill(self, x, rope, vis, cache_len: int, adapters=None):
    """Attention over the chunk itself (`attend`, any implementation), and the chunk's keys and
    values as this layer's KV cache of `cache_len` slots (slot s holds position s)."""
    q, k, v = self.project(x, rope, adapters)
    cache = {"k": _cache_layout(k, cache_len), "v": _cache_layout(v, cache_len)}
    return self.attend(q, k, v, vis, adapters=adapters), cache

  def decode(self, x, positions, rope, layer_cache, adapters=None):
    """Writes the tokens' keys/values into cache slots positions[b] and attends over the cache
    (attention.cached_attention); `rope` is the rotation at `positions`."""
    cfg, dt = self.cfg, self.cfg.compute_dtype
    q, k, v = self.project(x, rope, adapters)
    write = jax.vmap(lambda c, u, i: jax.lax.dynamic_update_slice_in_dim(c, u, i, axis=1))
    layer_cache = {
        name: parallel.constrain(
            write(layer_cache[name], jnp.swapaxes(new, 1, 2).astype(layer_cache[name].dtype),
                  positions[:, 0]), CACHE_AXES)
        for name, new in (("k", k), ("v", v))}
    out = attention.cached_attention(q, layer_cache["k"], layer_cache["v"], positions)
    out = parallel.constrain(out, ("batch", "length", "act_heads", None))
    return project(out, self.o, adapters, "o", dt, in_dims=2), layer_cache


def repeat_rows(x, repeats: int, names=None):
  """[U, ...] -> [U * repeats, ...], row u filling rows u * repeats .. (u + 1) * repeats - 1;
  split over the batch axes as x is (or as the logical `names` say), so each device repeats its
  own rows."""
  if repeats == 1:
    return x
  out = jnp.broadcast_to(x[:, None], (x.shape[0], repeats) + x.shape[1:])
  out = out.reshape((-1,) + x.shape[1:])
  return parallel.constrain(out, names or ("batch",) + (None,) * (x.ndim - 1))


def after_shared(shared, own, repeats: int):
  """Each row's shared beginning [U, P, ...] (repeat_rows) followed by its own part
  [U * repeats, T, ...] along the length axis: [U * repeats, P + T, ...]."""
  return jnp.concatenate([repeat_rows(shared, repeats), own], axis=1)


def first_of_groups(x, size: int):
  """[U * size, ...] -> [U, ...]: the first row of each group of `size` consecutive rows (the
  inverse of repeat_rows on rows that repeat)."""
  if size == 1:
    return x
  out = x.reshape((x.shape[0] // size, size) + x.shape[1:])[:, 0]
  return parallel.constrain(out, ("batch",) + (None,) * (x.ndim - 1))


def _cache_layout(x, cache_len: int):
  """A chunk's keys or values [B, T, K, H] as a layer's KV cache [B, K, cache_len, H], the chunk
  in slots 0..T-1 and zeros after."""
  x = jnp.pad(x, [(0, 0), (0, cache_len - x.shape[1]), (0, 0), (0, 0)])
  return parallel.constrain(jnp.swapaxes(x, 1, 2), CACHE_AXES)


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, m = cfg.d_model, cfg.mlp_dim
    self.dtype = cfg.compute_dtype
    self.gate = _param(rngs, _dense_init(d), (d, m), ("embed", "mlp"))
    self.up = _param(rngs, _dense_init(d), (d, m), ("embed", "mlp"))
    self.down = _param(rngs, _dense_init(m, 1.0 / (2 * cfg.num_layers) ** 0.5), (m, d),
                       ("mlp", "embed"))

  def __call__(self, x, adapters=None):
    dt = self.dtype

    def down(gate, up):
      hidden = parallel.constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
      return project(hidden, self.down, adapters, "down", dt)

    gate, up = project(x, self.gate, adapters, "gate", dt), project(x, self.up, adapters, "up", dt)
    # Only the two projections are kept for the backward, which recomputes silu(gate) * up, an
    # elementwise step, rather than keeping its three [B, T, mlp] intermediates (bench_tiny:
    # 17% less peak memory, 5% faster scanned; the matmuls are never recomputed).
    return jax.checkpoint(down)(gate, up)


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, rope, vis, adapters=None):
    x = x + self.attn(self.attn_norm(x), rope, vis, adapters)
    return self._mlp(x, adapters)

  def shared(self, x_prefix, x, prefix_rope, rope, prefix_vis, vis, repeats: int,
             adapters=None):
    attn_prefix, attn = self.attn.shared(self.attn_norm(x_prefix), self.attn_norm(x),
                                         prefix_rope, rope, prefix_vis, vis, repeats, adapters)
    return self._mlp(x_prefix + attn_prefix, adapters), self._mlp(x + attn, adapters)

  def prefill(self, x, rope, vis, cache_len: int, adapters=None):
    attn, cache = self.attn.prefill(self.attn_norm(x), rope, vis, cache_len, adapters)
    return self._mlp(x + attn, adapters), cache

  def decode(self, x, positions, rope, layer_cache, adapters=None):
    attn, layer_cache = self.attn.decode(self.attn_norm(x), positions, rope, layer_cache,
                                         adapters)
    return self._mlp(x + attn, adapters), layer_cache

  def _mlp(self, x, adapters):
    x = x + self.mlp(self.mlp_norm(x), adapters)
    return parallel.constrain(x, ("batch", "length", "act_embed"))


class Transformer(nnx.Module):
  """tokens [B, T] -> logits [B, T, vocab] (float32), or the final hidden states."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg.validate()
    self.embed = _param(rngs, _dense_init(cfg.d_model), (cfg.vocab_size, cfg.d_model),
                        ("vocab", "embed"))

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(r):
      return Block(cfg, r)

    self.layers = make_blocks(rngs)
    if cfg.lora_rank:
      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make_adapters(r):
        return LayerAdapters(cfg, r)

      # A tree of its own beside the base weights: `lora/q/a` [layers, d_model, rank], ...
      self.lora = make_adapters(rngs)
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs)
    if cfg.head == "scalar":
      self.score = _param(rngs, _dense_init(cfg.d_model), (cfg.d_model,), ("embed",))
      self.score_bias = nnx.Param(jnp.zeros((), jnp.float32), out_sharding=())
      if cfg.lm_score:
        self.lm_score_weight = nnx.Param(jnp.ones((), jnp.float32), out_sharding=())
    if (cfg.head == "lm" or cfg.lm_score) and not cfg.tie_embeddings:
      self.lm_head = _param(rngs, _dense_init(cfg.d_model), (cfg.d_model, cfg.vocab_size),
                            ("embed", "vocab"))

  def hidden(self, tokens, positions=None, segment_ids=None, dropout_rng=None):
    """Final hidden states [B, T, D]. `dropout_rng`: a training step's key, for the adapters'
    input dropout (ModelConfig.lora_dropout); None (evaluation, sampling): no dropout."""
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    vis = attention.Visibility(segment_ids, segment_ids, positions, positions)
    rope = Rotation.at(positions, self.cfg)
    x = self._run_layers(lambda block, x, adapters: block(x, rope, vis, adapters),
                         self._embed(tokens), dropout_rng)
    return self.final_norm(x)

  def hidden_shared(self, prefix_tokens, prefix_positions, prefix_segments, tokens, positions,
                    segment_ids, repeats: int, dropout_rng=None):
    """`hidden` of rows that share their beginning with the `repeats` rows around them (the G
    responses to one prompt), computing that beginning once: row r is prefix_tokens[r //
    repeats] [P] followed by tokens[r] [T]. Positions and segment ids as `hidden` takes them,
    split the same way; each continuation token sees its prefix's tokens and its own earlier ones
    by the usual rule (attention.Visibility). Returns (final hidden states of the prefixes
    [U, P, D], of the continuations [U * repeats, T, D]): hidden() of the whole rows, computed with
    1/repeats of the prefix's work (forward and backward). The dropout key, if any, gives the rows
    that share a prefix the same adapter dropout on it."""
    prefix_vis = attention.Visibility(prefix_segments, prefix_segments, prefix_positions,
                                      prefix_positions)
    vis = attention.Visibility(segment_ids, after_shared(prefix_segments, segment_ids, repeats),
                               positions, after_shared(prefix_positions, positions, repeats))

    prefix_rope, rope = Rotation.at(prefix_positions, self.cfg), Rotation.at(positions, self.cfg)

    def layer(block, carry, adapters):
      return block.shared(*carry, prefix_rope, rope, prefix_vis, vis, repeats, adapters)

    x_prefix, x = self._run_layers(layer, (self._embed(prefix_tokens), self._embed(tokens)),
                                   dropout_rng)
    return self.final_norm(x_prefix), self.final_norm(x)

  def _run_layers(self, layer, x, dropout_rng=None):
    """The layers in order on the activations x (any tree): layer(block, x, adapters) -> x, in a
    scan over the stacked weights (unrolled without scan_layers), each layer rematerialised by
    the config's policy."""
    cfg = self.cfg
    merge_layer, layer_state = self._layer_stack(dropout_rng)

    def body(carry, state):
      block, adapters = merge_layer(state)
      return layer(block, carry, adapters), None

    if cfg.remat != "none":
      body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
    x, _ = jax.lax.scan(body, x, layer_state, unroll=not cfg.scan_layers)
    return x

  def _layer_stack(self, dropout_rng=None):
    """(merge(one layer's state) -> (Block, LayerLora or None), the states stacked on the
    layers axis) for a scan over the layers. With `dropout_rng` and a dropout rate, each layer's
    state carries a dropout key of its own."""
    graphdef, state = nnx.split(self.layers)
    if not hasattr(self, "lora"):
      return (lambda s: (nnx.merge(graphdef, s), None)), state
    lora_def, lora_state = nnx.split(self.lora)
    rate = self.cfg.lora_dropout
    stacked = (state, lora_state)
    if dropout_rng is not None and rate:
      stacked += (jax.random.split(dropout_rng, self.cfg.num_layers),)

    def merge_layer(s):
      key = s[2] if len(s) > 2 else None
      return nnx.merge(graphdef, s[0]), LayerLora(nnx.merge(lora_def, s[1]), rate, key)

    return merge_layer, stacked

  def _embed(self, tokens):
    # Rows looked up where the table lives (parallel.lookup): the token ids travel, not the table.
    x = parallel.lookup(self.embed[...], tokens, ("vocab", "embed")).astype(self.cfg.compute_dtype)
    return parallel.constrain(x, ("batch", "length", "act_embed"))

  def prefill(self, tokens, cache_len: int):
    """Final hidden states [B, T, D] of `tokens` [B, T] at positions 0..T-1, all in one segment (a
    right-padded prompt: each real token sees only the real ones before it), and the KV cache
    they leave for `decode`: a tuple of one {"k", "v"} [B, kv_heads, cache_len, head_dim] per
    layer, slot s holding position s. The chunk's attention is the training one (any
    `attention_impl`), over its own keys only; the slots after it are zeros.
    """
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    segments = jnp.ones_like(tokens)
    vis = attention.Visibility(segments, segments, positions, positions)
    rope = Rotation.at(positions, self.cfg)
    x = self._embed(tokens)
    merge_layer, layer_state = self._layer_stack()

    def body(carry, state):
      block, adapters = merge_layer(state)
      return block.prefill(carry, rope, vis, cache_len, adapters)

    x, stacked = jax.lax.scan(body, x, layer_state, unroll=not self.cfg.scan_layers)
    cache = tuple(jax.tree.map(lambda c, i=i: c[i], stacked) for i in range(self.cfg.num_layers))
    return self.final_norm(x), cache

  def decode_layers(self):
    """Each layer's weights (and adapters) as a tuple of static slices of the stacked ones, for
    `decode(layers=...)`."""
    _, layer_state = self._layer_stack()
    return tuple(jax.tree.map(lambda a, i=i: a[i], layer_state)
                 for i in range(self.cfg.num_layers))

  def decode(self, tokens, cache, start, layers=None):
    """Final hidden states [B, T, D] of `tokens` [B, T] continuing the sequences held in `cache`
    (from `prefill` or an earlier `decode`) at positions start[b], start[b]+1, ...: their keys and
    values go into those slots and each attends to every slot up to its own position. A slot
    past the prompt's real tokens holds junk from the padding until a decode step writes it, and
    no query reaches it before then. Returns (hidden, updated cache).

    The layers run as a Python loop over static slices of the stacked weights and a cache of
    one buffer per layer, not a scan: XLA then updates each layer's cache in place and reads
    each weight where it lies, where a scan over the stacked cache copies every layer's slice
    out and back on every generated token (MaxText decodes with scan_layers off for the same
    reason). Compile time grows with depth on this path only.
    """
    positions = start[:, None] + jnp.arange(tokens.shape[1])
    rope = Rotation.at(positions, self.cfg)
    x = self._embed(tokens)
    merge_layer, _ = self._layer_stack()
    updated = []
    for state, layer_cache in zip(layers or self.decode_layers(), cache):
      block, adapters = merge_layer(state)
      x, layer_cache = block.decode(x, positions, rope, layer_cache, adapters)
      updated.append(layer_cache)
    return self.final_norm(x), tuple(updated)

  def head_matrix(self):
    """The output projection [D, vocab] in the compute dtype (the embedding table's transpose when
    they are tied)."""
    dt = self.cfg.compute_dtype
    if self.cfg.tie_embeddings:
      return self.embed[...].astype(dt).T
    return self.lm_head[...].astype(dt)

  def logits(self, hidden):
    logits = dense(hidden, self.head_matrix()).astype(jnp.float32)
    return parallel.constrain(logits, ("batch", "length", "act_vocab"))

  def scores(self, hidden):
    """[B, T] float32: the scalar head at every position (read one where the caller needs it)."""
    return (hidden.astype(jnp.float32) @ self.score[...]) + self.score_bias[...]

  def __call__(self, tokens, positions=None, segment_ids=None, dropout_rng=None):
    return self.logits(self.hidden(tokens, positions, segment_ids, dropout_rng))


def abstract_model(cfg: ModelConfig):
  """(graphdef, abstract params as a pure dict, logical axis names as a matching pure dict)."""
  model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
  return split_params(model)


def split_params(model):
  graphdef, state = nnx.split(model)
  names = jax.tree.map(lambda v: tuple(v.out_sharding), state,
                       is_leaf=lambda v: isinstance(v, nnx.Variable))
  return graphdef, nnx.to_pure_dict(state), nnx.to_pure_dict(names)


# Logical axes that mark a weight matrix (a vector, e.g. a norm scale or the score head, has none).
_MATRIX_AXES = frozenset({"vocab", "heads", "kv_heads", "mlp"})


def resolve_dtype(dtype: str, cfg: ModelConfig):
  """A storage dtype setting: 'auto' is the model's compute dtype (bfloat16 on TPU/GPU, float32
  on CPU), else float32 | bfloat16 | float16."""
  return cfg.compute_dtype if dtype == "auto" else jnp.dtype(dtype)


def cast_matrices(params, names, dtype, only=None):
  """`params` with their weight matrices in `dtype` and every vector (norm scales, the scalar
  head) left as it is; `only`: a tree of bools like `params`, the matrices to cast (None: all).
  The layers cast each matrix to the compute dtype where they use it, so matrices stored in the
  compute dtype give bit-identical outputs with half the bytes."""
  only = jax.tree.map(lambda _: True, params) if only is None else only
  def cast(x, axes, chosen):
    return x.astype(dtype) if chosen and _MATRIX_AXES & set(axes) else x
  return jax.tree.map(cast, params, names, only, is_leaf=parallel.is_axis_names)


def merge(graphdef, params):
  """The model for a pure-dict of params (inside a traced step)."""
  return nnx.merge(graphdef, nnx.State(params))


@functools.lru_cache(maxsize=None)
def init_fn(cfg: ModelConfig):
  """rng -> fresh params (a pure dict) of `cfg`, to be jitted with the params' shardings."""
  def init(rng):
    return nnx.to_pure_dict(nnx.split(Transformer(cfg, nnx.Rngs(params=rng)))[1])
  return init
