"""What watches a run: the one-step-late metrics with the NaN guard, throughput, SIGTERM, Ctrl-C
and preemption, and the hang watchdog. Each is a small object the loop calls at step boundaries."""

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

import jax
import numpy as np

from lmtrain.train import metrics as metrics_lib

SUMMARY_WINDOW = 5  # steps whose metrics a run keeps for its summary (e.g. PPO's mean KL)
SIGNAL_SYNC_EVERY = 10  # steps between the hosts' SIGTERM agreements in multi-process runs
HANG_EXIT_CODE = 4


class LateMetrics:
  """Reads each step's device metrics one step late: reading blocks until the step is done, and by
  then the next step is already dispatched, so the device never waits for the host. A loss that is
  not finite, or a loss magnitude or gradient norm above `limit` (a run blowing up, e.g. against a
  broken reward, before it reaches Inf), raises `diverged(step, what happened)`; the last
  SUMMARY_WINDOW steps' values are kept."""

  def __init__(self, diverged: Callable[[int, str], Exception], window: int = SUMMARY_WINDOW,
               limit: float | None = None):
    self.diverged, self.window, self.limit = diverged, window, limit
    self.pending = None  # (step, device metrics) not read yet
    self.recent: list[dict] = []
    self.last: dict = {}

  def push(self, step: int, device_metrics):
    """Holds this step's metrics; returns the previous step's (step, values), or None."""
    done = self.flush()
    self.pending = (step, device_metrics)
    return done

  def flush(self):
    """(step, values) of the held step, read now, or None."""
    if self.pending is None:
      return None
    step, device_metrics = self.pending
    self.pending = None
    values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    if not math.isfinite(values["loss"]):
      raise self.diverged(step, f"loss became {values['loss']}")
    if self.limit is not None:
      for key, value in (("loss", values["loss"]), ("gradient norm", values.get("grad_norm", 0))):
        if not abs(value) <= self.limit:
          raise self.diverged(step, f"{key} became {value:.3g}, beyond LoopConfig.diverge_at="
                                    f"{self.limit:g}")
    self.last = values
    self.recent = (self.recent + [values])[-self.window:]
    return step, values


class Throughput:
  """Tokens/s, MFU and step time over the steps since the last row (or reset)."""

  def __init__(self, tokens_per_step: int, flops_per_token: float, n_devices: int, peak: float):
    self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
    self.n_devices, self.peak = n_devices, peak
    self.reset()

  def reset(self):
    self.start, self.steps = time.time(), 0

  def count(self):
    self.steps += 1

  def row(self) -> dict:
    step_time = (time.time() - self.start) / max(self.steps, 1)
    tps = self.tokens_per_step / step_time
    self.reset()
    return {"tokens_per_sec": tps,
            "mfu": metrics_lib.mfu(tps, self.flops_per_token, self.n_devices, self.peak),
            "step_time": step_time}


class SigtermFlag:
  """Records SIGTERM or a first Ctrl-C (SIGINT) so the loop can save at the next step boundary
  instead of dying mid-write; a second Ctrl-C aborts at once (KeyboardInterrupt, no save)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.raised = False
    self.signum = signal.SIGTERM
    self._previous = {}

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name

  def __enter__(self):
    try:
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    except ValueError:  # not the main thread (e.g. a test runner thread): no handler
      self._previous = {}
    return self

  def _handle(self, signum, _frame):
    if signum == signal.SIGINT and self.raised and self.signum == signal.SIGINT:
      raise KeyboardInterrupt  # the second Ctrl-C
    if signum == signal.SIGINT:
      sys.stderr.write("\nlmtrain: Ctrl-C: saving a checkpoint at the next step boundary "
                       "(Ctrl-C again to abort without one)\n")
      sys.stderr.flush()
    self.raised, self.signum = True, signum

  def __exit__(self, *_):
    for s, previous in self._previous.items():
      signal.signal(s, previous)

  def should_stop(self, step: int) -> bool:
    try:  # JAX's own preemption notice on TPU, agreed on by all hosts at the same step
      from jax.experimental import multihost_utils
      if multihost_utils.reached_preemption_sync_point(step):
        return True
    except Exception:  # no preemption service outside managed TPU runs
      pass
    if jax.process_count() == 1:
      return self.raised
    # Hosts must stop at the same step, so they agree on their flags; only every few steps, as the
    # collective waits for the step in flight and would otherwise stall dispatch every step.
    if step % SIGNAL_SYNC_EVERY:
      return False
    from jax.experimental import multihost_utils
    return bool(multihost_utils.process_allgather(np.array(self.raised)).any())


class Watchdog:
  """Ends the process when `beat` is not called for `timeout` seconds (a hang, not an error: the
  thread stuck in a collective cannot raise, so this exits from a daemon thread)."""

  def __init__(self, timeout: float | None, what: Callable[[], str]):
    self.timeout, self.what = timeout, what
    self.last = time.monotonic()
    self._done = threading.Event()

  def __enter__(self):
    if self.timeout:
      threading.Thread(target=self._watch, daemon=True, name="lmtrain-watchdog").start()
    return self

  def beat(self):
    self.last = time.monotonic()

  def _watch(self):
    while not self._done.wait(min(1.0, self.timeout / 4)):
      idle = time.monotonic() - self.last
      if idle > self.timeout:
        sys.stderr.write(f"\nlmtrain: error: {self.what()}: no progress for {idle:.0f} s "
                         f"(LoopConfig.hang_timeout_s={self.timeout:g}); a host or collective "
                         f"is hung, exiting; rerun the same command to resume from the last "
                         f"checkpoint\n")
        sys.stderr.flush()
        os._exit(HANG_EXIT_CODE)

  def __exit__(self, *_):
    self._done.set()
