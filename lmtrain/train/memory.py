"""Memory of a run per device, before anything is allocated: the train state exactly (from its
abstract shapes and the shardings the loop lays it out with, so a dimension that a mesh axis does
not divide counts as replicated, as it is), gradients as the trained params, and the activations
as an estimate from the shapes (`activation_bytes`). The loop checks it before allocating;
`lmtrain plan` prints it for any slice.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from lmtrain.errors import UserError
from lmtrain.losses import lm_loss
from lmtrain.model import attention, transformer

GIB = 2**30


def tree_bytes(abstract_tree, sharding_tree) -> int:
  """Bytes per device of a tree laid out by `sharding_tree` (its largest shard of each leaf)."""
  def one(x, sharding):
    return math.prod(sharding.shard_shape(x.shape)) * x.dtype.itemsize
  return sum(jax.tree.leaves(jax.tree.map(one, abstract_tree, sharding_tree)))


def state_bytes(abstract_state, shardings, trainable=None) -> dict:
  """Exact per-device bytes of a train state's parts (the largest shard of each leaf).
  `trainable`: params -> mask of the trained ones (TRAINABLE, LoRA); the others count as frozen
  and have no gradients."""
  params = tree_bytes(abstract_state.params, shardings.params)
  frozen = tree_bytes(abstract_state.extras, shardings.extras)
  if trainable is not None:
    mask = trainable(abstract_state.params)
    held = tree_bytes(*[jax.tree.map(lambda x, m: None if m else x, tree, mask)
                        for tree in (abstract_state.params, shardings.params)])
    params, frozen = params - held, frozen + held
  return {"trained params": params, "gradients": params,
          "optimizer state": tree_bytes(abstract_state.opt_state, shardings.opt_state),
          "frozen models": frozen}


def activation_bytes(cfg: transformer.ModelConfig, local_batch: int, seq_len: int,
                     tensor: int = 1) -> int:
  """Estimated peak activation bytes per device for one forward + backward of `local_batch`
  sequences: what the remat policy keeps per layer for every layer, one layer's working set
  during its recompute and backward, and the logits. Head- and MLP-sized tensors are split over
  the tensor axis."""
  b, t, d, n_layers = local_batch, seq_len, cfg.d_model, cfg.num_layers
  c = cfg.compute_dtype.itemsize
  heads = cfg.num_heads * cfg.head_size / tensor
  kv = cfg.kv_heads * cfg.head_size / tensor
  mlp = cfg.mlp_dim / tensor
  qkv = b * t * (heads + 2 * kv) * c
  impl = attention.resolve(cfg.attention_impl, t, cfg.compute_dtype, cfg.attention_chunked_from)
  # xla holds a query's scores against every key, the fused and blockwise paths one block.
  # causal_blocks computes about half of xla's scores and keeps only those for the backward;
  # counted as xla, an upper bound (XLA's peak for bench_small's step: 3.45 against 4.24 GB).
  keys = t if impl in ("xla", "causal_blocks") else min(t, cfg.attention_block)
  scores = b * cfg.num_heads / tensor * t * keys * 4  # fp32 logits of one block row (or all)
  layer = b * t * (4 * d + 2 * heads + 3 * mlp) * c + qkv + 2 * scores  # live during a block
  kept = {  # per layer, saved for the backward
      # The MLP keeps its two projections and recomputes silu(gate) * up (transformer.MLP).
      "none": layer - b * t * mlp * c,
      "full": 0,
      "save_dots": qkv + b * t * (heads + d + 2 * mlp + d) * c,
      "save_qkv": qkv,
      "save_attention": qkv + b * t * heads * c,
      "offload_attention": 0,
  }[cfg.remat]
  carry = b * t * d * c  # each block's input (the scan carry)
  vocab = cfg.vocab_size / tensor if cfg.head == "lm" or cfg.lm_score else 1
  logit_rows = min(t, cfg.logits_chunk) if cfg.logits_chunk else t
  logits = 2 * b * logit_rows * vocab * 4  # fp32 logits and their gradient
  return int(n_layers * (kept + carry) + layer + logits)


@dataclasses.dataclass
class MemoryPlan:
  parts: dict  # name -> bytes per device
  activations: int
  activations_measured: bool
  device_gib: float | None

  @property
  def total(self) -> int:
    return sum(self.parts.values()) + self.activations

  @property
  def fits(self) -> bool | None:
    return None if self.device_gib is None else self.total <= self.device_gib * GIB

  def summary(self) -> str:
    """'params 1.2 GiB + ... = total' in one line."""
    items = [f"{k} {v / GIB:.2f}" for k, v in self.parts.items() if v]
    how = "measured" if self.activations_measured else "estimated"
    items.append(f"activations {self.activations / GIB:.2f} ({how})")
    return " + ".join(items) + f" = {self.total / GIB:.2f} GiB"


def device_memory_gib() -> float | None:
  """Memory of one local device as the runtime reports it (TPU/GPU); None where it does not."""
  stats = getattr(jax.local_devices()[0], "memory_stats", lambda: None)()
  return stats["bytes_limit"] / GIB if stats and "bytes_limit" in stats else None


def memory_plan(abstract_state, shardings, cfg, local_batch, seq_len, mesh,
                device_gib=None, trainable=None) -> MemoryPlan:
  tensor = mesh.shape.get("tensor", 1)
  return MemoryPlan(state_bytes(abstract_state, shardings, trainable),
                    activation_bytes(cfg, local_batch, seq_len, tensor), False, device_gib)


def check_fits(plan: MemoryPlan, stage: str, device_kind: str):
  """The loop's pre-flight check: a one-line error when the plan does not fit."""
  if plan.fits is False:
    raise UserError(
        f"{stage}: needs about {plan.total / GIB:.2f} GiB per device but a {device_kind} has "
        f"{plan.device_gib:.3g} GiB ({plan.summary()}); shard over more devices (MESH_SHAPE), "
        f"lower BATCH_SIZE or SEQ_LEN, raise LoopConfig.microbatches or use ModelConfig.remat; "
        f"`lmtrain plan` shows the breakdown; LoopConfig.check_memory=False runs anyway")


def kv_cache_bytes(cfg: transformer.ModelConfig, rollouts: int, length: int, mesh) -> int:
  """Per-device bytes of the rollout KV cache: layers x rollouts x length x kv heads x head dim,
  keys and values, in the compute dtype, split over the batch and tensor axes."""
  shards = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
  tensor = mesh.shape.get("tensor", 1) if cfg.kv_heads % mesh.shape.get("tensor", 1) == 0 else 1
  total = (2 * cfg.num_layers * rollouts * length * cfg.kv_heads * cfg.head_size
           * cfg.compute_dtype.itemsize)
  return int(total / (min(shards, rollouts) * tensor))


def measure_activations(cfg, local_batch: int, seq_len: int) -> int:
  """XLA's temporary bytes for the LM-loss gradient of `local_batch` sequences on one local
  device (the backend here), compiled from shapes only."""
  graphdef, abstract_params, _ = transformer.abstract_model(cfg)
  ids = jax.ShapeDtypeStruct((local_batch, seq_len), jnp.int32)
  batch = {"inputs": ids, "targets": ids, "segment_ids": ids, "positions": ids,
           "loss_mask": jax.ShapeDtypeStruct((local_batch, seq_len), jnp.float32)}

  def loss(params, batch):
    total, weight, _ = lm_loss(transformer.merge(graphdef, params), batch, None)
    return total / weight

  compiled = jax.jit(jax.grad(loss)).lower(abstract_params, batch).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)
