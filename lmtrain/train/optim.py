"""The optimiser: an optax chain (clip -> AdamW with a weight-decay mask) and its LR schedule."""

import re

import gin
import jax
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
  extra = [] if trainable == "all" else ([trainable] if isinstance(trainable, str)
                                         else list(trainable))
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
  patterns = [] if trainable == "all" else ([trainable] if isinstance(trainable, str)
                                            else list(trainable))
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
  patterns = [trainable] if isinstance(trainable, str) else list(trainable or [])
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
                   trainable=None):
  """Clip -> AdamW over the trained parameters. `trainable`: a mask tree (trainable_mask) or a
  function of the params giving one; frozen parameters get no optimizer state and no update."""
  parts = []
  if clip_norm:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=decay_mask))
  chain = optax.chain(*parts)
  if trainable is None:
    return chain

  def labels(params):
    mask = trainable(params) if callable(trainable) else trainable
    return jax.tree.map(lambda m: "trained" if m else "frozen", mask)

  return optax.multi_transform({"trained": chain, "frozen": optax.set_to_zero()}, labels)
