"""Shared test helpers: a tiny model, synthetic packed batches, sharded steps on a chosen mesh, and
the CLI in a subprocess."""

import os
import subprocess
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

from lmtrain import parallel
from lmtrain.losses import lm_loss
from lmtrain.model import transformer
from lmtrain.train import optim
from lmtrain.train.state import state_shardings
from lmtrain.train.state import TrainState
from lmtrain.train.step import make_train_step

TINY = transformer.ModelConfig(vocab_size=128, d_model=64, num_layers=2, num_heads=4,
                               num_kv_heads=2, mlp_dim=128)


def packed_batch(batch_size=8, seq_len=32, vocab=128, seed=0, docs_per_row=3):
  """Rows holding several documents each (segment ids 1..k, positions restarting) and some padding."""
  rng = np.random.default_rng(seed)
  out = {k: np.zeros((batch_size, seq_len), np.int32) for k in
         ("inputs", "targets", "segment_ids", "positions")}
  for r in range(batch_size):
    cuts = np.sort(rng.choice(np.arange(2, seq_len - 2), size=docs_per_row, replace=False))
    start = 0
    for s, end in enumerate(cuts, start=1):
      n = end - start
      out["inputs"][r, start:end] = rng.integers(4, vocab, n)
      out["targets"][r, start:end] = rng.integers(4, vocab, n)
      out["segment_ids"][r, start:end] = s
      out["positions"][r, start:end] = np.arange(n)
      start = end
  out["loss_mask"] = (out["segment_ids"] > 0).astype(np.float32)
  return out


def init_params(cfg=TINY, seed=0):
  return jax.jit(transformer.init_fn(cfg))(jax.random.PRNGKey(seed))


def mesh_of(shape: dict):
  n = int(np.prod(list(shape.values())))
  return parallel.make_mesh(shape, devices=jax.devices()[:n])


def sharded_setup(mesh, cfg=TINY, lr=1e-2, microbatches=1, eps=1e-8, loss_fn=lm_loss,
                  batch_example=None):
  """(jitted step, state shardings, batch sharding, optimizer) for `cfg` and `loss_fn` on `mesh`.
  Batches are [B, T] arrays unless `batch_example` gives their keys and ranks."""
  rules = parallel.axis_rules()
  graphdef, abstract_params, names = transformer.abstract_model(cfg)
  schedule = optax.constant_schedule(lr)
  optimizer = optim.make_optimizer(schedule, weight_decay=0.1, clip_norm=1.0, eps=eps)
  abstract_state = jax.eval_shape(
      lambda p: TrainState.create(p, optimizer, jax.random.PRNGKey(0)), abstract_params)
  shardings = state_shardings(mesh, rules, abstract_state, names)
  step = make_train_step(graphdef, loss_fn, optimizer, schedule, microbatches)
  batch_sharding = (parallel.batch_sharding(mesh, rules) if batch_example is None else
                    {k: parallel.batch_sharding(mesh, rules, np.ndim(v))
                     for k, v in batch_example.items()})
  with parallel.activate(mesh, rules):
    jitted = jax.jit(step, in_shardings=(shardings, batch_sharding),
                     out_shardings=(shardings, parallel.replicated(mesh)))
  return jitted, shardings, batch_sharding, optimizer, graphdef, names


ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
       "JAX_PLATFORMS": "cpu"}


def lmtrain(*args, check=True, **kwargs):
  proc = subprocess.run([sys.executable, "-m", "lmtrain.cli", *args], env=ENV,
                        capture_output=True, text=True, timeout=300, **kwargs)
  if check and proc.returncode != 0:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
  return proc


def saved_state(workdir, step):
  path = os.path.join(workdir, "pretrain", "checkpoints", str(step), "state")
  return ocp.StandardCheckpointer().restore(path)
