"""LoRA: low-rank adapters beside the frozen weights of a parent model, and what is done with them.

With ModelConfig.lora_rank = r > 0 (LORA_RANK), every weight W named in lora_targets (LORA_TARGETS:
q, k, v, o, gate, up, down) gets an adapter, A [*in, r] and B [r, *out], and the layer computes
x W + (alpha / r) (x A) B (lmtrain.model.transformer.Adapter). B starts at zero, so a fresh adapter
leaves the model exactly as loaded. With lora_dropout = p > 0 (LORA_DROPOUT) a training step of a
loss stage (SFT, reward, DPO) computes dropout(x) A B instead, the step's key passed to the model
(Transformer.hidden's dropout_rng); evaluation and sampling pass none. The adapters are one
tree of their own beside the base weights, `params["lora"][target]["a" | "b"]`, stacked on the
layers axis like the blocks and sharded by the same logical axes as their weight (the rank axis
whole). The stage trains them (and a new scalar head), and the rest stays frozen
(trainable_patterns; lmtrain.train.optim).

What the adapters mean for the rest of the system:
- the base model is the same params without `lora` (without_adapters, base_config): DPO's and
  PPO/GRPO's reference is that, with no second copy of the weights;
- merged(params, scale) folds them into the weights (W + scale A B): a child stage starts from its
  parent's merged weights with fresh adapters of its own, and `lmtrain convert to-hf` writes
  merged weights, and the RL rollouts decode with them.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

KEY = "lora"

# Where each target's weight lives in the params tree.
_WEIGHTS = {"q": ("layers", "attn", "q"), "k": ("layers", "attn", "k"),
            "v": ("layers", "attn", "v"), "o": ("layers", "attn", "o"),
            "gate": ("layers", "mlp", "gate"), "up": ("layers", "mlp", "up"),
            "down": ("layers", "mlp", "down")}

# Heads a LoRA stage trains besides the adapters when the model has them: the reward model's
# (and the value model's) scalar head, new to the stage.
SCALAR_HEAD = ("score", "score_bias", "lm_score_weight")


def has_adapters(params) -> bool:
  return isinstance(params, dict) and KEY in params


def base_config(cfg):
  """The model without adapters (the base the adapters sit on), so without their dropout."""
  return dataclasses.replace(cfg, lora_rank=0, lora_dropout=0.0)


def without_adapters(params):
  return {k: v for k, v in params.items() if k != KEY}


def trainable_patterns(params) -> list[str]:
  """TRAINABLE patterns (lmtrain.train.optim.trainable_mask) of what a LoRA stage trains by
  default: every adapter, and the scalar head where the model has one."""
  return [f"{KEY}/.*"] + [name for name in SCALAR_HEAD if name in params]


def delta(adapter, weight_shape, scale: float):
  """scale x A B of one adapter, shaped like its weight [layers, *in, *out] (float32)."""
  a, b = adapter["a"].astype(jnp.float32), adapter["b"].astype(jnp.float32)
  layers, rank = a.shape[0], a.shape[-1]
  product = jnp.matmul(a.reshape(layers, -1, rank), b.reshape(layers, rank, -1))
  return (scale * product).reshape(weight_shape)


def merged(params, scale: float):
  """The params with every adapter folded into its weight (W + scale A B) and no `lora` tree: the
  same function as base + adapters, to float32 rounding."""
  out = without_adapters(params)
  out["layers"] = {part: dict(weights) for part, weights in params["layers"].items()}
  for target, adapter in params[KEY].items():
    _, part, name = _WEIGHTS[target]
    weight = out["layers"][part][name]
    out["layers"][part][name] = (weight.astype(jnp.float32)
                                 + delta(adapter, weight.shape, scale)).astype(weight.dtype)
  return out


def fresh_adapters(abstract_adapters, rng):
  """New adapters of the given shapes: A normal with std 1 / sqrt(fan in), B zeros (as
  transformer.Adapter makes them)."""
  leaves = sorted(abstract_adapters)
  keys = dict(zip(leaves, jax.random.split(rng, len(leaves))))
  out = {}
  for target in leaves:
    a, b = abstract_adapters[target]["a"], abstract_adapters[target]["b"]
    fan_in = math.prod(a.shape[1:-1])
    out[target] = {"a": jax.random.normal(keys[target], a.shape, a.dtype) / fan_in**0.5,
                   "b": jnp.zeros(b.shape, b.dtype)}
  return out


def placed_fresh_adapters(abstract_adapters, rng):
  """fresh_adapters, made on the devices and with the shardings of `abstract_adapters`."""
  return jax.jit(fresh_adapters,
                 out_shardings=jax.tree.map(lambda a: a.sharding, abstract_adapters))(
                     abstract_adapters, rng)


def adapter_count(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params.get(KEY, {})))
