"""Metrics: metrics.jsonl and TensorBoard from process 0; throughput and MFU accounting.

In a bucket work dir (gs://...) metrics.jsonl is rewritten whole every `SYNC_SECS` and at close (a
bucket object cannot be appended to), and tensorboardX writes the event file there itself, through
google-cloud-storage, re-uploading it at each of its flushes (every `TB_FLUSH_SECS`) and at close.
"""

import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from lmtrain import fileio

# Peak dense bf16 FLOP/s per chip, from the vendors' published figures.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA B200": 2250e12,
}

SYNC_SECS = 30.0  # metrics.jsonl uploads to a bucket at most this often (and at close)
TB_FLUSH_SECS = 60  # TensorBoard event flushes (each re-uploads the event file to a bucket)


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(size: int = 1024, repeats: int = 10) -> float:
  """FLOP/s of a dense fp32 matmul on the local devices, all of them at once: the CPU's 'peak'."""
  devices = jax.local_devices()
  mesh = jax.sharding.Mesh(np.asarray(devices), ("d",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
  a = jax.device_put(jnp.ones((len(devices), size, size), jnp.float32), sharding)
  f = jax.jit(lambda x: jnp.einsum("bij,bjk->bik", x, x), out_shardings=sharding)
  f(a).block_until_ready()
  best = math.inf
  for _ in range(repeats):  # the fastest run: the rate the cores sustain once warm
    start = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 * len(devices) / best


def peak_flops_per_device() -> tuple[float, str]:
  """(peak FLOP/s of one device, where the figure comes from)."""
  device = jax.devices()[0]
  kind = getattr(device, "device_kind", "")
  for name, flops in PEAK_FLOPS.items():
    if kind.startswith(name):
      return flops, f"{kind} peak"
  if device.platform == "cpu":
    return measured_matmul_flops() / len(jax.local_devices()), "measured CPU matmul rate"
  return math.nan, f"unknown device {kind!r}"


def mfu(tokens_per_sec: float, flops_per_token: float, n_devices: int, peak: float) -> float:
  return tokens_per_sec * flops_per_token / (n_devices * peak)


class MetricsWriter:
  """Appends one JSON object per logged step to metrics.jsonl and mirrors scalars to TensorBoard.
  Only process 0 writes; the others keep a no-op writer so call sites need no checks."""

  def __init__(self, stage_dir: str):
    self.active = jax.process_index() == 0
    self._jsonl = self._tb = None
    if self.active:
      self._jsonl = fileio.AppendFile(os.path.join(stage_dir, "metrics.jsonl"), SYNC_SECS)
      from tensorboardX import SummaryWriter  # tensorboardX imports torch-free; keep it lazy anyway
      self._tb = SummaryWriter(os.path.join(stage_dir, "tb"), flush_secs=TB_FLUSH_SECS)

  def write(self, step: int, metrics: dict):
    if not self.active:
      return
    row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
        self._tb.add_scalar(k, v, int(step))

  def close(self):
    if self.active:
      self._jsonl.close()
      self._tb.close()


def _plain(v):
  try:
    return float(v)
  except (TypeError, ValueError):
    return v


def read_metrics(path: str) -> list[dict]:
  return [json.loads(line) for line in fileio.read_text(path).splitlines() if line.strip()]
