"""The train state: one pytree that a step maps to the next, and that a checkpoint holds whole."""

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates done
  params: Any  # pure dict of arrays (see lmtrain.model.transformer.split_params)
  opt_state: Any
  rng: jax.Array  # uint32[2] raw key, so it saves and restores like any array
  extras: Any = struct.field(default_factory=dict)  # stage state, e.g. a KL controller

  @classmethod
  def create(cls, params, optimizer, rng, extras=None):
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
               rng=rng, extras=extras or {})
