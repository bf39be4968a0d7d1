"""Losses and eval metrics that several stages share, in the loss contract of lmtrain/train/step.py."""

import math

import jax.numpy as jnp
import optax


def lm_loss(model, batch, rng):
  """Summed token cross-entropy where loss_mask is 1, and the number of such tokens."""
  del rng  # no dropout
  logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  weight = batch["loss_mask"]
  return jnp.sum(ce * weight), jnp.sum(weight), {}


def perplexity_metrics(totals: dict) -> dict:
  loss = totals["loss_sum"] / max(totals["weight"], 1e-9)
  return {"eval_perplexity": math.exp(min(loss, 80.0))}


def mean_metrics(*names: str):
  """eval_metrics for stages whose metric sums are weighted by the batch's weight: eval_<name>
  is each sum over the total weight."""
  def metrics(totals: dict) -> dict:
    return {f"eval_{k}": totals[k] / max(totals["weight"], 1e-9) for k in names}
  return metrics
