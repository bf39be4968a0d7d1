"""The optimiser: an optax chain (clip -> AdamW with a weight-decay mask) and its LR schedule."""

import gin
import jax
import optax

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
    from lmtrain.errors import UserError
    raise UserError(f"make_schedule.decay={decay!r}; choose cosine, linear or constant")
  if not warmup_steps:
    return after
  warm = optax.linear_schedule(learning_rate / warmup_steps, learning_rate, warmup_steps)
  return optax.join_schedules([warm, after], [warmup_steps])


@gin.configurable
def make_optimizer(schedule, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0):
  parts = []
  if clip_norm:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts)
