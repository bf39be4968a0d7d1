"""Evaluation: the held-out loss over a stage's eval batches and the stage's own measures, run at
EVAL_EVERY and after the last step (and at step 0 with eval_at_start)."""

import dataclasses
from collections.abc import Callable, Iterable

import jax
import numpy as np

from lmtrain import parallel


def _no_metrics(totals: dict) -> dict:
  del totals
  return {}


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """What a stage evaluates.

  data: (process_index, process_count) -> this host's held-out batches; the loss over them is
    eval_loss (with `loss_fn`, the stage's loss, on its model).
  metrics: (summed totals: loss_sum, weight, the loss's metric sums) -> further eval_* metrics.
  measure: (params, extras, mesh, rules) -> dict of eval_* metrics of its own (e.g. generated
    answers, scored); run when the batches gave a loss, or when there are no batches.
  """
  data: Callable[[int, int], Iterable] | None = None
  loss_fn: Callable | None = None
  metrics: Callable[[dict], dict] = _no_metrics
  measure: Callable | None = None


def host_eval_batches(batches: Iterable, limit: int, template: dict):
  """This host's eval batches, as many on every host, so that none waits alone in a collective.

  With one process: up to `limit` batches. With several, the hosts agree before each batch whether
  any of them still has one. Where batches carry a loss_mask, a host that ran out goes on with a
  copy of `template` (its own last batch, else its train batch's shapes) at weight 0 until every
  host is done; other batches stop at the first host that ran out.
  """
  iterator = iter(batches)
  for _ in range(limit):
    local = next(iterator, None)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      have = multihost_utils.process_allgather(np.array(local is not None))
      if not have.any():
        return
      if local is None or not have.all():
        if "loss_mask" not in template:
          return
        if local is None:
          local = jax.tree.map(np.zeros_like, template)
    if local is None:
      return
    template = local
    yield local


def close_iterator(iterator):
  """Stops a grain iterator's prefetch threads now rather than at interpreter exit."""
  close = getattr(iterator, "close", None)
  if close is not None:
    close()


class Evaluator:
  """An Evaluation compiled for the run: `evaluator(state) -> dict` of eval metrics ({} when
  there is nothing to evaluate)."""

  def __init__(self, evaluation: Evaluation | None, step_factory, ctx, first_local: dict,
               first_global: dict, eval_steps: int):
    self.evaluation = evaluation or Evaluation()
    self.ctx, self.eval_steps = ctx, eval_steps
    # A host whose eval data ran out feeds batches shaped like its train batches, all weight 0.
    self.template = jax.tree.map(np.zeros_like, first_local)
    self.compiled = None
    if self.evaluation.data is not None:
      batch_sharding = jax.tree.map(lambda x: x.sharding, first_global)
      self.compiled = jax.jit(
          step_factory.eval_step(self.evaluation.loss_fn),
          in_shardings=(ctx.shardings.params, ctx.shardings.extras, batch_sharding),
          out_shardings=parallel.replicated(ctx.mesh))

  def __call__(self, state) -> dict:
    evaluation, mesh, rules = self.evaluation, self.ctx.mesh, self.ctx.rules
    out = {}
    if evaluation.data is not None:
      totals = {}
      batches = evaluation.data(jax.process_index(), jax.process_count())
      try:
        for local in host_eval_batches(batches, self.eval_steps, self.template):
          sums = self.compiled(state.params, state.extras,
                               parallel.global_batch(local, mesh, rules))
          totals = {k: totals.get(k, 0.0) + float(v) for k, v in sums.items()}
      finally:
        close_iterator(batches)
      if totals:
        out = {"eval_loss": totals["loss_sum"] / max(totals["weight"], 1e-9),
               **evaluation.metrics(totals)}
    if evaluation.measure is not None and (out or evaluation.data is None):
      out.update(evaluation.measure(state.params, state.extras, mesh, rules))
    return out
