"""The one training loop that every stage runs.

Build the mesh and the sharded train state (fresh, from a parent stage, or resumed from this stage's own
latest checkpoint), compile the stage's step once with explicit shardings and donated state, then step,
evaluate, checkpoint, log and watch for NaNs and SIGTERM until `train_steps`.
"""

import dataclasses
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from lmtrain import fileio, parallel
from lmtrain.errors import DivergedError, UserError
from lmtrain.model import transformer
from lmtrain.train import checkpoint as ckpt_lib
from lmtrain.train import metrics as metrics_lib
from lmtrain.train import optim, roles
from lmtrain.train.state import TrainState
from lmtrain.train.step import make_eval_step, make_train_step


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint was saved. The CLI exits 143."""

  exit_code = 143


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoopConfig:
  train_steps: int = gin.REQUIRED
  batch_size: int = gin.REQUIRED  # global, in sequences
  seq_len: int = gin.REQUIRED
  seed: int = 0
  checkpoint_every: int = 1000
  eval_every: int = 0  # 0: only at the end
  eval_steps: int = 8  # batches per evaluation
  log_every: int = 10
  microbatches: int = 1  # gradient accumulation: batch_size must divide by it
  # Stop (with a checkpoint) after this step although the schedule runs to train_steps: a planned
  # interruption, e.g. to resume on another mesh. None: run to train_steps.
  stop_after: int | None = None
  eval_at_start: bool = False  # also evaluate the starting params (e.g. the parent model), as step 0
  # Exit (code 4) when no step, eval or save finishes for this many seconds after compilation: on a
  # pod a hung collective (e.g. a host that died without the coordination service noticing) then
  # ends the job instead of idling every chip; rerunning resumes from the last checkpoint.
  # None: never. Set it well above the longest eval or checkpoint save.
  hang_timeout_s: float | None = None


@dataclasses.dataclass
class Stage:
  """What a stage contributes to the loop; everything else is shared."""
  name: str
  model_config: transformer.ModelConfig
  loss_fn: Callable  # (model, batch, rng) -> (loss_sum, weight, metric sums)
  train_data: Callable[[int, int], Any]  # (process_index, process_count) -> grain iterator
  eval_data: Callable[[int, int], Iterable] | None = None
  # (abstract params with shardings) -> (params, parent lineage dict) when starting from a parent.
  init_from_parent: Callable | None = None
  # Keep a frozen copy of the starting params as extras["reference"] (DPO); the loss then receives
  # `reference=` the reference model. Checkpointed with the state, sharded like the params.
  frozen_reference: bool = False
  eval_metrics: Callable[[dict], dict] = lambda sums: {}
  # (params, mesh, rules) -> dict of further eval metrics, e.g. exact match of generated answers.
  extra_eval: Callable | None = None
  tokenizer_path: str | None = None  # recorded in lineage.json, for `lmtrain sample` and children
  # (params, mesh, rules, stage_dir) -> summary facts, run once after the last step (e.g. the reward
  # model's normalisation, saved beside its checkpoint).
  finalize: Callable | None = None
  summary: dict = dataclasses.field(default_factory=dict)  # extra facts for the closing table
  # Stages that load several models or run their own step (PPO, GRPO) override these:
  # () -> (abstract tree, logical names) of what the stage starts from (init_from_parent fills
  # it); default: one model_config model.
  abstract_params: Callable | None = None
  # (starting tree) -> (trained params, extras), traced; default: the tree is the params, and
  # extras {"reference": a copy} if frozen_reference.
  split_loaded: Callable | None = None
  # (names of the starting tree) -> (names of the params, names of the extras: a tuple per leaf,
  # () for a replicated scalar).
  split_names: Callable | None = None
  updates_per_step: int = 1  # optimizer updates per loop step (PPO minibatches x epochs)
  # (StepContext) -> object with compile(state, first_batch) -> step(state, batch) ->
  # (state, metrics). Default: the shared make_train_step over loss_fn.
  make_step: Callable | None = None
  tokens_per_step: int | None = None  # default batch_size x seq_len
  flops_per_token: float | None = None  # default the model's training FLOPs per token
  # Train metrics whose mean over the last SUMMARY_WINDOW steps goes into the summary (PPO's kl).
  summary_keys: tuple = ()


SUMMARY_WINDOW = 5


@dataclasses.dataclass(frozen=True)
class StepContext:
  """What a stage's own step builder gets from the loop."""
  mesh: Any
  rules: Any
  shardings: Any  # TrainState of NamedShardings
  optimizer: Any
  schedule: Any
  cfg: LoopConfig


def state_shardings(mesh, rules, abstract_state: TrainState, names, optimizer,
                     extras_names=None):
  """NamedShardings of a TrainState: params (and their optimizer moments) by their logical names;
  extras by `extras_names`, or the reference like the params and anything else replicated."""
  param_shardings = parallel.tree_shardings(mesh, abstract_state.params, names, rules)
  opt_shardings = optax.tree_map_params(
      optimizer, lambda _, s: s, abstract_state.opt_state, param_shardings,
      transform_non_params=lambda _: parallel.replicated(mesh))
  rep = parallel.replicated(mesh)
  if extras_names is not None:
    extras = parallel.tree_shardings(mesh, abstract_state.extras, extras_names, rules)
  else:
    extras = {k: param_shardings if k == roles.REFERENCE else jax.tree.map(lambda _: rep, v)
              for k, v in abstract_state.extras.items()}
  return TrainState(step=rep, params=param_shardings, opt_state=opt_shardings, rng=rep,
                    extras=extras)


SIGNAL_SYNC_EVERY = 10  # steps between the hosts' SIGTERM agreements in multi-process runs


class _SigtermFlag:
  """Records SIGTERM so the loop can save at the next step boundary instead of dying mid-write."""

  def __init__(self):
    self.raised = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a test runner thread): no handler
      self._previous = None
    return self

  def _handle(self, *_):
    self.raised = True

  def __exit__(self, *_):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

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


HANG_EXIT_CODE = 4


class _Watchdog:
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


def _close(iterator):
  """Stops a grain iterator's prefetch threads now rather than at interpreter exit."""
  close = getattr(iterator, "close", None)
  if close is not None:
    close()


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


def _make_stage_dir(workdir: str, stage: str) -> str:
  stage_dir = os.path.join(workdir, stage)
  try:
    fileio.makedirs(stage_dir)
    # One probe per process: hosts sharing a work dir would otherwise delete each other's.
    probe = os.path.join(stage_dir, f".write_test.{socket.gethostname()}.{os.getpid()}")
    fileio.write_text(probe, "")
    fileio.remove(probe)
  except OSError as e:
    raise UserError(f"--workdir {workdir}: cannot write there ({e.strerror})") from None
  except fileio.StorageError as e:  # a bucket: missing, no permission, no credentials, no client
    raise UserError(f"--workdir {workdir}: cannot write there ({e.reason})") from None
  return stage_dir


def train(stage: Stage, workdir: str, cfg: LoopConfig, config_text: str = "") -> dict:
  """Runs (or resumes) `stage` in `workdir/<stage.name>` and returns its summary."""
  # From the start, so a SIGTERM during set-up or compilation also ends in a checkpoint.
  with _SigtermFlag() as sigterm:
    return _train(stage, workdir, cfg, config_text, sigterm)


def _train(stage, workdir, cfg, config_text, sigterm) -> dict:
  wall_start = time.time()
  stage_dir = _make_stage_dir(workdir, stage.name)
  if cfg.batch_size % cfg.microbatches:
    raise UserError(f"BATCH_SIZE={cfg.batch_size} does not divide into "
                    f"LoopConfig.microbatches={cfg.microbatches}")
  mesh, rules = parallel.make_mesh(), parallel.axis_rules()
  n_batch_shards = parallel.batch_shard_count(mesh)
  if (cfg.batch_size // cfg.microbatches) % n_batch_shards:
    raise UserError(f"BATCH_SIZE={cfg.batch_size} (per microbatch {cfg.batch_size // cfg.microbatches})"
                    f" is not divisible by the data x fsdp mesh size {n_batch_shards}")

  graphdef, abstract_loaded, loaded_names = transformer.abstract_model(stage.model_config)
  if stage.abstract_params is not None:
    abstract_loaded, loaded_names = stage.abstract_params()
  param_names, extras_names = loaded_names, None
  if stage.split_names is not None:
    param_names, extras_names = stage.split_names(loaded_names)
  schedule = optim.make_schedule(total_steps=cfg.train_steps * stage.updates_per_step)
  optimizer = optim.make_optimizer(schedule)

  def create_state(loaded, rng):
    if stage.split_loaded is not None:
      params, extras = stage.split_loaded(loaded)
    else:
      params = loaded
      extras = ({roles.REFERENCE: jax.tree.map(jnp.copy, params)} if stage.frozen_reference
                else {})
    return TrainState.create(params, optimizer, rng, extras)

  abstract_state = jax.eval_shape(create_state, abstract_loaded, jax.random.PRNGKey(0))
  shardings = state_shardings(mesh, rules, abstract_state, param_names, optimizer, extras_names)
  abstract_sharded = parallel.with_shardings(abstract_state, shardings)

  checkpointer = ckpt_lib.Checkpointer(os.path.join(stage_dir, "checkpoints"))
  train_iter = stage.train_data(jax.process_index(), jax.process_count())
  rng = jax.random.PRNGKey(cfg.seed)
  parent = None
  with mesh:
    if checkpointer.latest_step() is not None:
      state = checkpointer.restore(abstract_sharded, train_iter)
      resumed_from = int(state.step)
    else:
      resumed_from = None
      loaded_shardings = parallel.tree_shardings(mesh, abstract_loaded, loaded_names, rules)
      if stage.init_from_parent is not None:
        loaded, parent = stage.init_from_parent(
            parallel.with_shardings(abstract_loaded, loaded_shardings))
      else:
        init_fn = transformer.init_fn(stage.model_config)
        loaded = jax.jit(init_fn, out_shardings=loaded_shardings)(jax.random.fold_in(rng, 1))
      state = jax.jit(create_state, out_shardings=shardings)(loaded, rng)
  if jax.process_index() == 0:
    fileio.write_text(os.path.join(stage_dir, "config.gin"),
                      config_text or gin.operative_config_str())
    fileio.write_json(os.path.join(stage_dir, "model.json"), dataclasses.asdict(stage.model_config))
    if resumed_from is None:
      ckpt_lib.write_lineage(stage_dir, stage.name, config_text, parent,
                             tokenizer=stage.tokenizer_path)

  writer = metrics_lib.MetricsWriter(stage_dir)
  flops_per_token = stage.flops_per_token or stage.model_config.flops_per_token(cfg.seq_len)
  peak, peak_source = metrics_lib.peak_flops_per_device()
  tokens_per_step = stage.tokens_per_step or cfg.batch_size * cfg.seq_len
  summary = {"stage": stage.name, "checkpoint": checkpointer.directory, **stage.summary}

  def evaluate(params) -> dict:
    out = {}
    if stage.eval_data is not None:
      totals = {}
      batches = stage.eval_data(jax.process_index(), jax.process_count())
      try:
        for local in host_eval_batches(batches, cfg.eval_steps, eval_template):
          sums = compiled_eval(params, state.extras, parallel.global_batch(local, mesh, rules))
          totals = {k: totals.get(k, 0.0) + float(v) for k, v in sums.items()}
      finally:
        _close(batches)
      if totals:
        out = {"eval_loss": totals["loss_sum"] / max(totals["weight"], 1e-9),
               **stage.eval_metrics(totals)}
    if stage.extra_eval is not None and (out or stage.eval_data is None):
      out.update(stage.extra_eval(params, mesh, rules, extras=state.extras))
    return out

  step = int(state.step)
  if step >= cfg.train_steps:
    summary.update(steps=step, note="already complete", wall_time=time.time() - wall_start)
    checkpointer.close()
    writer.close()
    _close(train_iter)
    return summary

  with mesh, parallel.activate(mesh, rules):
    first_local = next(train_iter)
    # A host whose eval data ran out feeds batches shaped like its train batches, all weight 0.
    eval_template = jax.tree.map(np.zeros_like, first_local)
    first = parallel.global_batch(first_local, mesh, rules)
    compile_start = time.time()
    # Every batch leaf is split over its leading (batch) axis, whatever its rank.
    batch_sharding = jax.tree.map(lambda x: x.sharding, first)
    if stage.make_step is not None:
      compiled = stage.make_step(StepContext(mesh, rules, shardings, optimizer, schedule,
                                             cfg)).compile(state, first)
    else:
      step_fn = make_train_step(graphdef, stage.loss_fn, optimizer, schedule, cfg.microbatches)
      compiled = jax.jit(step_fn, in_shardings=(shardings, batch_sharding),
                         out_shardings=(shardings, parallel.replicated(mesh)),
                         donate_argnums=0).lower(state, first).compile()
    if stage.eval_data is not None:
      compiled_eval = jax.jit(make_eval_step(graphdef, stage.loss_fn),
                              in_shardings=(shardings.params, shardings.extras, batch_sharding),
                              out_shardings=parallel.replicated(mesh))
    compile_time = time.time() - compile_start
    summary["compile_time"] = compile_time

    bar = tqdm(total=cfg.train_steps, initial=step, desc=stage.name, unit="step",
               disable=jax.process_index() != 0, dynamic_ncols=True, mininterval=1.0)
    pending = None  # (step, metrics) of the previous step, read one step late to keep dispatch async
    last_saved = resumed_from
    batch = first
    interval_start, interval_steps = time.time(), 0
    last_metrics = {}
    recent = []  # the last SUMMARY_WINDOW steps' metrics

    def finish_pending():
      nonlocal pending, interval_start, interval_steps, last_metrics
      if pending is None:
        return
      done_step, device_metrics = pending
      pending = None
      values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
      if not math.isfinite(values["loss"]):
        raise DivergedError(
            f"{stage.name}: loss became {values['loss']} at step {done_step}; last good checkpoint: "
            f"step {last_saved if last_saved is not None else 'none'} in {checkpointer.directory}")
      interval_steps += 1
      last_metrics = values
      recent.append(values)
      del recent[:-SUMMARY_WINDOW]
      if done_step % cfg.log_every == 0 or done_step == cfg.train_steps:
        elapsed = time.time() - interval_start
        step_time = elapsed / max(interval_steps, 1)
        tps = tokens_per_step / step_time
        row = {"loss": values["loss"], "learning_rate": values["learning_rate"],
               "grad_norm": values["grad_norm"], "tokens_per_sec": tps,
               "mfu": metrics_lib.mfu(tps, flops_per_token, jax.device_count(), peak),
               "step_time": step_time,
               **{k: v for k, v in values.items() if k not in ("loss", "learning_rate",
                                                               "grad_norm", "weight")}}
        writer.write(done_step, row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{row['mfu']:.1%}")
        interval_start, interval_steps = time.time(), 0

    def save(at_step):
      nonlocal last_saved
      finish_pending()  # never save a state whose loss was not checked
      checkpointer.save(at_step, state, train_iter)
      last_saved = at_step

    end = min(cfg.train_steps, cfg.stop_after or cfg.train_steps)
    if cfg.eval_at_start and resumed_from is None:
      start_eval = evaluate(state.params)
      if start_eval:
        writer.write(step, start_eval)
        summary.update({f"initial_{k}": v for k, v in start_eval.items()})
      interval_start = time.time()
    watchdog = _Watchdog(cfg.hang_timeout_s,
                         lambda: f"{stage.name}: step {step} (last checkpoint: step {last_saved})")
    try:
      with watchdog:
        while step < end:
          state, device_metrics = compiled(state, batch)
          step += 1
          finish_pending()
          watchdog.beat()
          pending = (step, device_metrics)
          bar.update(1)
          if cfg.eval_every and step % cfg.eval_every == 0 and step < end:
            finish_pending()
            eval_row = evaluate(state.params)
            watchdog.beat()
            if eval_row:
              writer.write(step, eval_row)
            interval_start, interval_steps = time.time(), 0  # keep eval time out of tokens/s
          stop = sigterm.should_stop(step)
          if step % cfg.checkpoint_every == 0 or step == end or stop:
            save(step)
            watchdog.beat()
          if stop:
            checkpointer.wait()
            raise Preempted(f"{stage.name}: SIGTERM: saved checkpoint at step {step}; "
                            f"rerun the same command to resume")
          if step < end:  # only after any save: the saved iterator state must not include it
            batch = parallel.global_batch(next(train_iter), mesh, rules)
        finish_pending()
      final_eval = evaluate(state.params)
      if final_eval:
        writer.write(step, final_eval)
      if stage.finalize is not None and step == cfg.train_steps:
        summary.update(stage.finalize(state.params, mesh, rules, stage_dir))
    finally:
      bar.close()
      checkpointer.close()
      writer.close()
      _close(train_iter)

  summary.update({k: float(np.mean([r[k] for r in recent])) for k in stage.summary_keys
                  if recent and all(k in r for r in recent)})
  summary.update(steps=step, loss=last_metrics.get("loss"), wall_time=time.time() - wall_start,
                 peak_flops_source=peak_source, **final_eval)
  return summary
