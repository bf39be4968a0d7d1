"""The train state a run starts from: resumed from the stage's own latest checkpoint, or built from
its parent's (or fresh) models, laid out on the mesh by the step factory's logical names."""

import dataclasses
import functools
import os
from typing import Any

import jax

from lmtrain import parallel
from lmtrain.errors import UserError
from lmtrain.train import checkpoint as ckpt_lib, optim
from lmtrain.train.state import TrainState, filled, pruned, state_shardings


def check_batch(batch_size: int, microbatches: int, mesh):
  """One-line errors for a batch that does not split into microbatches and over the mesh."""
  if batch_size % microbatches:
    raise UserError(f"BATCH_SIZE={batch_size} does not divide into "
                    f"LoopConfig.microbatches={microbatches}")
  shards = parallel.batch_shard_count(mesh)
  if (batch_size // microbatches) % shards:
    raise UserError(f"BATCH_SIZE={batch_size} (per microbatch {batch_size // microbatches})"
                    f" is not divisible by the data x fsdp mesh size {shards}")


@dataclasses.dataclass
class Start:
  state: TrainState
  shardings: TrainState  # of NamedShardings
  optimizer: Any
  schedule: Any
  resumed_from: int | None  # the step of the checkpoint resumed, None for a new run
  parent: dict | None  # the parent's lineage entry, for a new chained run
  # {"params", "extras"}: True for what a checkpoint leaves out (StepFactory.checkpoint_omits);
  # None: it holds the whole state.
  checkpoint_omits: Any = None

  def saved(self, state: TrainState) -> TrainState:
    """What a checkpoint of `state` holds: it without what checkpoint_omits marks."""
    return saved_part(state, self.checkpoint_omits)


def saved_part(state: TrainState, omit) -> TrainState:
  if omit is None:
    return state
  return state.replace(params=pruned(state.params, omit["params"]),
                       extras=pruned(state.extras, omit["extras"]))


def _holds_base(checkpointer, abstract_state) -> bool:
  """Whether the latest checkpoint holds every param (a LoRA run's checkpoint written before they
  left the frozen base out): it is restored whole, and the next save leaves the base out."""
  try:
    saved = ckpt_lib.saved_params(checkpointer.directory, checkpointer.latest_step())
  except (OSError, ValueError):  # unreadable: restore_newest_good says so, or falls back
    return False
  have = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(saved)}
  return all(jax.tree_util.keystr(p) in have
             for p, _ in jax.tree_util.tree_leaves_with_path(abstract_state.params))


def start_state(step_factory, init_from_parent, train_steps: int, seed: int, mesh, rules,
                checkpointer, train_iter, preflight=None) -> Start:
  """Restores the latest checkpoint (and the data iterator's position) when there is one; else
  `init_from_parent(abstract models with shardings, pinned=None) -> (models, parent)` or the
  factory's fresh init, then the factory's init, both jitted straight into their shardings. A
  checkpoint without its frozen base (checkpoint_omits) is restored over the models loaded as at
  the start: init_from_parent with `pinned`, the parent entry lineage.json recorded then.
  `preflight(abstract state, shardings)` runs before anything is allocated (the memory check)."""
  abstract_loaded, loaded_names = step_factory.models()
  param_names, extras_names = step_factory.state_names(loaded_names)
  make_schedule = functools.partial(optim.make_schedule,
                                    total_steps=train_steps * step_factory.updates_per_step)
  schedule = make_schedule()
  optimizer = step_factory.optimizer(schedule, make_schedule)

  def create(loaded, rng):
    return step_factory.store_frozen_base(step_factory.init(loaded, optimizer, rng), param_names)

  abstract_state = jax.eval_shape(create, abstract_loaded, jax.random.PRNGKey(0))
  shardings = state_shardings(mesh, rules, abstract_state, param_names, extras_names)
  if preflight is not None:
    preflight(abstract_state, shardings)
  rng = jax.random.PRNGKey(seed)
  omit = step_factory.checkpoint_omits(abstract_state)
  loaded_shardings = parallel.tree_shardings(mesh, abstract_loaded, loaded_names, rules)

  def load(pinned=None):
    if init_from_parent is not None:
      return init_from_parent(parallel.with_shardings(abstract_loaded, loaded_shardings),
                              pinned=pinned)
    loaded = jax.jit(step_factory.init_fresh, out_shardings=loaded_shardings)(
        jax.random.fold_in(rng, 1))
    return loaded, None

  with mesh:
    if checkpointer.latest_step() is not None:  # a damaged latest one falls back to the next
      if omit is None or _holds_base(checkpointer, abstract_state):
        state, _ = checkpointer.restore_newest_good(
            parallel.with_shardings(abstract_state, shardings), train_iter)
        return Start(state, shardings, optimizer, schedule, int(state.step), None, omit)
      # The checkpoint holds the trained part; the frozen base comes from the checkpoint this run
      # started from (lineage.json's parent, at its step), loaded as then.
      state, _ = checkpointer.restore_newest_good(parallel.with_shardings(
          saved_part(abstract_state, omit), saved_part(shardings, omit)), train_iter)
      stage_dir = os.path.dirname(checkpointer.directory.rstrip("/"))
      loaded, _ = load(pinned=ckpt_lib.read_lineage(stage_dir).get("parent"))
      params, extras = jax.jit(
          lambda models, key: (lambda s: (s.params, s.extras))(create(models, key)),
          out_shardings=(shardings.params, shardings.extras))(loaded, rng)
      state = state.replace(params=filled(state.params, params),
                            extras=filled(state.extras, extras))
      return Start(state, shardings, optimizer, schedule, int(state.step), None, omit)
    loaded, parent = load()
    state = jax.jit(create, out_shardings=shardings)(loaded, rng)
  return Start(state, shardings, optimizer, schedule, None, parent, omit)
