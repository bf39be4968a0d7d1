"""The pure train and eval steps shared by every stage.

A stage supplies `loss_fn(model, batch, rng) -> (loss_sum, weight, metric_sums)`: a sum over the tokens
(or pairs, or sequences) of its batch and how many there were. The step divides by the total weight of the
whole global batch, so gradient accumulation over microbatches gives the same update as one big batch.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from lmtrain.model.transformer import merge
from lmtrain.train import roles
from lmtrain.train.state import TrainState

LossFn = Callable  # (model, batch, rng) -> (loss_sum, weight, dict of metric sums)


def _frozen_models(graphdef, extras) -> dict:
  """The frozen models a loss takes besides the trained one (DPO's reference)."""
  if roles.REFERENCE not in extras:
    return {}
  return {roles.REFERENCE: merge(graphdef, jax.lax.stop_gradient(extras[roles.REFERENCE]))}


def split_microbatches(batch, n: int):
  """[B, ...] -> [n, B/n, ...], microbatch j taking rows j, j+n, ... so each stays spread over the
  devices that hold the batch."""
  def split(x):
    return x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def make_train_step(graphdef, loss_fn: LossFn, optimizer, schedule, num_microbatches: int = 1):
  """step(state, batch) -> (state, metrics). Metrics are means over the batch's weight."""

  def summed_loss(params, batch, rng, extras):
    loss_sum, weight, sums = loss_fn(merge(graphdef, params), batch, rng,
                                     **_frozen_models(graphdef, extras))
    return loss_sum, (weight, sums)

  grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

  def step(state: TrainState, batch):
    rng, step_rng = jax.random.split(state.rng)
    if num_microbatches == 1:
      (loss_sum, (weight, sums)), grads = grad_fn(state.params, batch, step_rng, state.extras)
    else:
      micro = split_microbatches(batch, num_microbatches)
      rngs = jax.random.split(step_rng, num_microbatches)
      shapes = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micro), rngs[0],
                              state.extras)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

      def accumulate(acc, xs):
        out = grad_fn(state.params, *xs, state.extras)
        return jax.tree.map(jnp.add, acc, out), None

      ((loss_sum, (weight, sums)), grads), _ = jax.lax.scan(accumulate, zeros, (micro, rngs))
    denom = jnp.maximum(weight, 1e-9)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss_sum / denom,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state.step),
        "weight": weight,
        **{k: v / denom for k, v in sums.items()},
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new_state, metrics

  return step


def make_eval_step(graphdef, loss_fn: LossFn):
  """eval_step(params, batch) -> sums (loss_sum, weight, metric sums), to be added over batches."""

  def eval_step(params, extras, batch):
    loss_sum, weight, sums = loss_fn(merge(graphdef, params), batch, jax.random.PRNGKey(0),
                                     **_frozen_models(graphdef, extras))
    return {"loss_sum": loss_sum, "weight": weight, **sums}

  return eval_step
