"""The train state: one pytree that a step maps to the next, and that a checkpoint holds whole."""

from typing import Any

import jax
import jax.numpy as jnp
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


def state_shardings(mesh, rules, abstract_state: TrainState, names,
                    extras_names=None) -> TrainState:
  """NamedShardings of a TrainState: params (and their optimizer moments) by their logical names,
  extras by `extras_names` (a tuple of names per leaf, () for a replicated scalar; None: no
  extras), step and rng replicated."""
  param_shardings = parallel.tree_shardings(mesh, abstract_state.params, names, rules)
  opt_shardings = opt_state_shardings(abstract_state.opt_state, abstract_state.params,
                                      param_shardings, parallel.replicated(mesh))
  extras = parallel.tree_shardings(mesh, abstract_state.extras, extras_names or {}, rules)
  rep = parallel.replicated(mesh)
  return TrainState(step=rep, params=param_shardings, opt_state=opt_shardings, rng=rep,
                    extras=extras)


def opt_state_shardings(opt_state, params, param_shardings, other):
  """Shardings of an optax state: a leaf whose key path ends with a parameter's path (a moment
  such as `...mu['policy']['embed']`) and has its shape is laid out like that parameter; anything
  else (counts, scalars) gets `other`. Any transform's state works, masked and multi_transform
  ones included (whose masked-out leaves are absent), which optax.tree_map_params cannot map."""
  flat = jax.tree_util.tree_leaves_with_path(params)
  by_path = {tuple(path): (leaf.shape, sharding)
             for (path, leaf), sharding in zip(flat, jax.tree.leaves(param_shardings))}

  def pick(path, leaf):
    for start in range(len(path)):
      hit = by_path.get(tuple(path[start:]))
      if hit is not None and hit[0] == leaf.shape:
        return hit[1]
    return other

  return jax.tree_util.tree_map_with_path(pick, opt_state)


def pruned(tree, omit):
  """`tree` (nested dicts) without the leaves `omit` marks True, and without the dicts left empty:
  what a checkpoint holds of params that leave their frozen base out."""
  if not isinstance(tree, dict):
    return None if omit else tree
  out = {}
  for key, value in tree.items():
    kept = pruned(value, omit[key])
    if kept is not None and not (isinstance(kept, dict) and not kept):
      out[key] = kept
  return out


def filled(part, whole):
  """`whole` with every leaf that `part` (a pruned tree of it) holds taken from `part`."""
  if not isinstance(whole, dict):
    return whole if part is None else part
  return {key: filled(part.get(key) if isinstance(part, dict) else None, value)
          for key, value in whole.items()}
