"""The optimiser: an optax chain (clip -> AdamW with a weight-decay mask) and its LR schedule."""

import re

import gin
import jax
import jax.numpy as jnp
import optax

from lmtrain.errors import UserError

NO_DECAY_NAMES = ("scale", "embed")  # norm gains and the embedding table are not decayed


def decay_mask(params):
  """True for the matrices that get weight decay: everything but norm scales and embeddings."""
  def keep(path, _):
    return not any(getattr(k, "key", None) in NO_DECAY_NAMES for k in path)
  return jax.tree_util.tree_map_with_path(keep, params)


@gin.configurable
def make_schedule(learning_rate=gin.REQUIRED, total_steps=gin.REQUIRED, warmup_steps=100,
                  decay="cosine", end_ratio=0.1):
  """Linear warmup to `learning_rate`, then cosine (or linear, or constant) decay to end_ratio x.
  A warmup as long as the run is cut to one step less (said on stdout): the LR then peaks at the end."""
  if int(warmup_steps) >= int(total_steps) and jax.process_index() == 0:
    print(f"note: WARMUP_STEPS={warmup_steps} is not below the {total_steps} steps of the "
          f"schedule: the warmup is cut to {max(int(total_steps) - 1, 0)} steps and the learning "
          f"rate peaks only at the end", flush=True)
  warmup_steps = max(0, min(int(warmup_steps), int(total_steps) - 1))
  decay_steps = max(1, int(total_steps) - warmup_steps)
  end = learning_rate * end_ratio
  if decay == "cosine":
    after = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=end_ratio)
  elif decay == "linear":
    after = optax.linear_schedule(learning_rate, end, decay_steps)
  elif decay == "constant":
    after = optax.constant_schedule(learning_rate)
  else:
    raise UserError(f"make_schedule.decay={decay!r}; choose cosine, linear or constant")
  if not warmup_steps:
    return after
  warm = optax.linear_schedule(learning_rate / warmup_steps, learning_rate, warmup_steps)
  return optax.join_schedules([warm, after], [warmup_steps])


def param_path(path) -> str:
  """A parameter's path as TRAINABLE's patterns see it: `layers/mlp/gate`, `final_norm/scale`."""
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


@gin.configurable
def trainable_setting(trainable="all"):
  """TRAINABLE: 'all', or the patterns of trainable_mask."""
  return trainable


@gin.configurable
def lora_base_dtype_setting(dtype="auto"):
  """LORA_BASE_DTYPE: the dtype a LoRA model's frozen base matrices are held in (StepFactory.
  store_frozen_base): 'auto' (the compute dtype), float32, bfloat16 or float16."""
  return dtype


@gin.configurable
def trainable_layers_setting(last=None):
  """TRAINABLE_LAYERS: None (every layer), or N: the stacked layer weights train in their last N
  layers only (restrict_layers)."""
  return last


def check_trainable_layers(last, num_layers: int):
  """A one-line UserError unless TRAINABLE_LAYERS is None or a whole number in [1, num_layers]."""
  if last is None:
    return
  if isinstance(last, bool) or not isinstance(last, int) or not 1 <= last <= num_layers:
    raise UserError(f"TRAINABLE_LAYERS={last!r} must be None (every layer) or a whole number "
                    f"from 1 to the model's {num_layers} layers")


def _stacked(path) -> bool:
  """Whether a parameter is stacked on a leading layers axis: the blocks' weights and their LoRA
  adapters (lmtrain.model.lora.KEY)."""
  from lmtrain.model import lora
  return getattr(path[0], "key", None) in ("layers", lora.KEY)


def _last_layers(x, last: int):
  """[layers, 1, ...]: True for the last `last` layers of `x`, stacked on its leading axis."""
  layers = x.shape[0]
  return (jnp.arange(layers) >= layers - last).reshape((layers,) + (1,) * (x.ndim - 1))


def restrict_layers(tree, last: int | None):
  """`tree` (gradients or updates, shaped like the params) with every stacked leaf zero in its
  layers before the last `last` (TRAINABLE_LAYERS); None: unchanged. A per-leaf mask cannot
  freeze part of a stacked weight, so the step zeroes those layers' gradient (before the clip and
  the gradient norm) and the optimizer their update (AdamW's decoupled weight decay would move
  them otherwise)."""
  if last is None:
    return tree

  def restrict(path, x):
    return jnp.where(_last_layers(x, last), x, jnp.zeros_like(x)) if _stacked(path) else x
  return jax.tree_util.tree_map_with_path(restrict, tree)


def trained_count(params, mask=None, last: int | None = None) -> int:
  """How many elements of `params` train: every one of the leaves `mask` marks (None: all), and
  of a stacked leaf only its last `last` layers (TRAINABLE_LAYERS)."""
  mask = jax.tree.map(lambda _: True, params) if mask is None else mask
  total = 0
  for (path, x), trained in zip(jax.tree_util.tree_leaves_with_path(params),
                                jax.tree.leaves(mask)):
    if trained:
      total += (x.size // x.shape[0] * last if last is not None and _stacked(path)
                else int(x.size))
  return total


def patterns_of(trainable) -> list[str]:
  """TRAINABLE as a list of patterns: none for 'all', one for a single string."""
  if trainable == "all":
    return []
  return [trainable] if isinstance(trainable, str) else list(trainable or [])


def trainable_fn(trainable=None, lora: bool = False):
  """None when every parameter trains, else params -> trainable_mask(params, patterns);
  `trainable` defaults to the run's TRAINABLE (trainable_setting). With `lora` (a model with
  adapters) the adapters and a scalar head train (lora.trainable_patterns), plus what TRAINABLE
  names when it is not 'all'."""
  trainable = trainable_setting() if trainable is None else trainable
  if trainable == "all" and not lora:
    return None
  if not lora:
    return lambda params: trainable_mask(params, trainable)
  from lmtrain.model import lora as lora_lib
  extra = patterns_of(trainable)
  return lambda params: trainable_mask(params, lora_lib.trainable_patterns(params) + extra)


def roles_trainable_fn(with_adapters: dict, trainable=None):
  """trainable_fn for a stage that trains several models, params {role: tree} (PPO's policy and
  value): None when every parameter of each trains, else params -> {role: mask}. `with_adapters`:
  {role: whether its model has LoRA adapters}, the policy first. Each model trains what
  trainable_fn gives a one-model stage (its adapters with LoRA, else TRAINABLE's patterns), and
  a model with a scalar head (the value model) always trains that head: a critic must learn the
  returns. The patterns must match a parameter of the first model; the others share its trunk's
  paths and take those that name theirs."""
  trainable = trainable_setting() if trainable is None else trainable
  if trainable == "all" and not any(with_adapters.values()):
    return None
  from lmtrain.model import lora as lora_lib
  patterns = patterns_of(trainable)
  first = next(iter(with_adapters))

  def role_mask(role, tree):
    if with_adapters[role]:
      own = lora_lib.trainable_patterns(tree)
    elif trainable == "all":
      return jax.tree.map(lambda _: True, tree)
    else:
      own = [name for name in lora_lib.SCALAR_HEAD if name in tree]
    return trainable_mask(tree, own + patterns, require_match=role == first)

  return lambda params: {role: role_mask(role, tree) for role, tree in params.items()}


def trainable_mask(params, trainable="all", require_match: bool = True):
  """True for the parameters a stage trains: every one for `'all'` (TRAINABLE's default), else those
  whose path (param_path) fully matches one of the regular expressions in `trainable`, e.g.
  `['final_norm/.*', 'lm_head']` for the head only or `['layers/mlp/.*']` for the MLPs. The others
  are frozen: no gradient, no optimizer state, left bit for bit as loaded. `require_match`: a
  pattern that matches no parameter is an error."""
  if trainable == "all":
    return jax.tree.map(lambda _: True, params)
  patterns = patterns_of(trainable)
  if not patterns:
    raise UserError("TRAINABLE is empty: 'all', or regular expressions over parameter paths")
  compiled = []
  for pattern in patterns:
    try:
      compiled.append(re.compile(str(pattern)))
    except re.error as e:
      raise UserError(f"TRAINABLE: {pattern!r} is not a regular expression ({e})") from None
  flat = jax.tree_util.tree_leaves_with_path(params)
  paths = [param_path(path) for path, _ in flat]
  for pattern, regex in zip(patterns, compiled):
    if require_match and not any(regex.fullmatch(p) for p in paths):
      raise UserError(f"TRAINABLE: {pattern!r} matches no parameter; the parameters are "
                      f"{', '.join(paths)}")
  keep = [any(r.fullmatch(p) for r in compiled) for p in paths]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), keep)


def freeze(params, mask):
  """`params` with the frozen leaves behind stop_gradient: their weight gradients are never
  computed (XLA drops the matmuls), and they read as exact zeros."""
  if all(jax.tree.leaves(mask)):
    return params
  return jax.tree.map(lambda p, m: p if m else jax.lax.stop_gradient(p), params, mask)


@gin.configurable
def make_optimizer(schedule, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0,
                   trainable=None, trainable_layers=None):
  """Clip -> AdamW over the trained parameters. `trainable`: a mask tree (trainable_mask) or a
  function of the params giving one; frozen parameters get no optimizer state and no update.
  `trainable_layers` (TRAINABLE_LAYERS): the stacked leaves are updated in their last N layers
  only; their AdamW moments exist for every layer (the saving is per leaf), and stay zero in the
  frozen layers, whose gradient the step zeroes (restrict_layers)."""
  parts = []
  if clip_norm:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=decay_mask))
  optimizer = optax.chain(*parts)
  if trainable is not None:
    def labels(params):
      mask = trainable(params) if callable(trainable) else trainable
      return jax.tree.map(lambda m: "trained" if m else "frozen", mask)

    optimizer = optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()},
                                      labels)
  if trainable_layers is None:
    return optimizer
  return optax.chain(optimizer, optax.stateless(
      lambda updates, _: restrict_layers(updates, trainable_layers)))
