"""The train state: one pytree that a step maps to the next, and that a checkpoint holds whole."""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from lmtrain import parallel


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


def state_shardings(mesh, rules, abstract_state: TrainState, names, optimizer,
                    extras_names=None) -> TrainState:
  """NamedShardings of a TrainState: params (and their optimizer moments) by their logical names,
  extras by `extras_names` (a tuple of names per leaf, () for a replicated scalar; None: no
  extras), step and rng replicated."""
  param_shardings = parallel.tree_shardings(mesh, abstract_state.params, names, rules)
  opt_shardings = optax.tree_map_params(
      optimizer, lambda _, s: s, abstract_state.opt_state, param_shardings,
      transform_non_params=lambda _: parallel.replicated(mesh))
  extras = parallel.tree_shardings(mesh, abstract_state.extras, extras_names or {}, rules)
  rep = parallel.replicated(mesh)
  return TrainState(step=rep, params=param_shardings, opt_state=opt_shardings, rng=rep,
                    extras=extras)
