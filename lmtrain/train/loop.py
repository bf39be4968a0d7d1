"""The one training loop that every stage runs.

A stage gives its step factory (how its state is made and stepped), its data, how it starts from its
parent, what it evaluates and its hooks (lmtrain/train/step.py, evaluation.py). The loop builds the
mesh and the sharded train state (fresh, from the parent, or resumed from the stage's own latest
checkpoint; start.py), compiles the step once, then steps: metrics read one step late with the NaN
guard, evaluation and hooks at their periods, checkpoints, SIGTERM and the hang watchdog
(monitor.py), until `train_steps`.
"""

import dataclasses
import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import gin
import jax
from tqdm import tqdm

from lmtrain import fileio, parallel
from lmtrain.errors import DivergedError, Preempted, UserError
from lmtrain.train import checkpoint as ckpt_lib
from lmtrain.train import memory as memory_lib
from lmtrain.train import metrics as metrics_lib
from lmtrain.train import optim
from lmtrain.train.evaluation import Evaluation, Evaluator, close_iterator
from lmtrain.train.lock import StageLock
from lmtrain.train.monitor import LateMetrics, SigtermFlag, Throughput, Watchdog
from lmtrain.train.start import start_state
from lmtrain.train.step import StepContext, StepFactory


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoopConfig:
  train_steps: int = gin.REQUIRED
  batch_size: int = gin.REQUIRED  # global, in sequences
  seq_len: int = gin.REQUIRED
  seed: int = 0
  checkpoint_every: int = 1000  # 0: only at the end (and on SIGTERM/SIGINT)
  eval_every: int = 0  # 0: only at the end
  eval_steps: int = 8  # batches per evaluation
  log_every: int = 10  # 0: only the schedule's last step
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
  # Before allocating, refuse (one line) a run whose train state and estimated activations exceed
  # one device's memory (lmtrain/train/memory.py, as `lmtrain plan` reports it). device_memory_gib: the figure to check against where the
  # runtime reports none (CPU), or a smaller budget; None: the device's own.
  check_memory: bool = True
  device_memory_gib: float | None = None
  # A loss magnitude or gradient norm above this ends the run like a NaN loss (exit 3, the last good
  # checkpoint kept): a run blowing up (say against a degenerate reward) before it overflows. None: off.
  diverge_at: float | None = 1e8


@dataclasses.dataclass(frozen=True)
class HookInfo:
  """What a hook sees: the step just done and the state after it."""
  step: int
  state: Any
  mesh: Any
  rules: Any
  stage_dir: str
  recent: list  # metrics of the last few finished steps (monitor.SUMMARY_WINDOW)
  finished: bool  # the step is the schedule's last (train_steps)
  evaluation: dict = dataclasses.field(default_factory=dict)  # at the end: the final evaluation


@dataclasses.dataclass(frozen=True)
class Hook:
  """fn(HookInfo) -> dict or None, run after every `every`-th step (0: not during training) and,
  with at_end, once after the run's last step. During training a returned dict is logged as a
  metrics row at that step; at the end it joins the run's summary."""
  fn: Callable[[HookInfo], dict | None]
  every: int = 0
  at_end: bool = False


@dataclasses.dataclass
class Stage:
  """What a stage contributes to the loop; everything else is shared."""
  name: str
  step: StepFactory  # its state and step; step.model_config is the trained model
  train_data: Callable[[int, int], Any]  # (process_index, process_count) -> grain iterator
  evaluation: Evaluation | None = None
  # (abstract models with shardings, pinned=None) -> (models, parent lineage entry), for a chained
  # stage; `pinned`: the entry of the run's start, to load the same checkpoint on a resume.
  init_from_parent: Callable | None = None
  hooks: Sequence[Hook] = ()
  tokenizer_path: str | None = None  # recorded in lineage.json, for `lmtrain sample` and children
  # The training data as configured (TRAIN_DATA): a resumed run must read the same (lineage.json).
  data_sources: Any = None
  # For the start-up block: documents and tokens (pretraining), or examples, their unit and how many
  # a step reads; a stage's training iterator may fill it in when the loop opens it.
  data_info: dict = dataclasses.field(default_factory=dict)
  summary: dict = dataclasses.field(default_factory=dict)  # extra facts for the closing table


def _epochs(x: float) -> str:
  """Two decimals, or two significant digits below 0.01 (a short run on a large corpus)."""
  return f"{x:.2f}" if x >= 0.01 or x == 0 else f"{x:.2g}"


def _millions(n: int) -> str:
  return f"{n / 1e6:,.2f}M" if n >= 1e5 else f"{n:,}"


def param_counts(step: StepFactory, state) -> tuple[int, int]:
  """(trained, frozen) parameters of a train state: the frozen models in its extras, and what
  TRAINABLE, TRAINABLE_LAYERS or LoRA leave out of the params."""
  trained = sum(int(x.size) for x in jax.tree.leaves(state.params))
  frozen = sum(int(x.size) for x in jax.tree.leaves(state.extras)
               if x.ndim >= 1 and jax.numpy.issubdtype(x.dtype, jax.numpy.floating))
  trainable = step.trainable()
  counted = optim.trained_count(state.params,
                                None if trainable is None else trainable(state.params),
                                step.trainable_layers())
  return counted, frozen + trained - counted


def startup_lines(stage: Stage, cfg: LoopConfig, state, mesh, start) -> list[str]:
  """What the run is, said once before the first step: where it starts, the parameters (trained
  and frozen), the mesh and devices, the batch in tokens, the data and the epochs the run reads."""
  if start.resumed_from is not None:
    origin = f"resuming from step {start.resumed_from} of {cfg.train_steps}"
  elif start.parent:
    origin = (f"starting from {start.parent['stage']}@{start.parent['step']} "
              f"({start.parent['path']}), {cfg.train_steps} steps")
  else:
    origin = f"starting from fresh weights, {cfg.train_steps} steps"
  trained, frozen = param_counts(stage.step, state)
  axes = " x ".join(f"{name} {n}" for name, n in mesh.shape.items())
  device = jax.devices()[0]
  rows = stage.step.rows_per_example
  tokens_per_step = cfg.batch_size * rows * cfg.seq_len
  lines = [f"{stage.name}: {origin}",
           f"  parameters  {_millions(trained + frozen)} ({_millions(trained)} trained"
           + (f", {_millions(frozen)} frozen)" if frozen else ")"),
           f"  mesh        {axes} on {jax.device_count()} {device.platform} device(s) "
           f"({device.device_kind}), {jax.process_count()} process(es)",
           f"  batch       {cfg.batch_size} x {f'{rows} sequences x ' if rows > 1 else ''}"
           f"{cfg.seq_len} = {tokens_per_step:,} tokens per step"
           + (f", in {cfg.microbatches} microbatches" if cfg.microbatches > 1 else "")]
  info = stage.data_info
  if info.get("tokens"):
    epochs = tokens_per_step * cfg.train_steps / info["tokens"]
    lines.append(f"  data        {info['documents']:,} documents, {info['tokens']:,} tokens; the "
                 f"run reads {tokens_per_step * cfg.train_steps:,} tokens ({_epochs(epochs)} epochs)")
  elif info.get("examples"):
    line = f"  data        {info['examples']:,} {info['unit']}"
    if info.get("per_step"):
      read = info["per_step"] * cfg.train_steps
      line += f"; the run reads {read:,} ({_epochs(read / info['examples'])} epochs)"
    else:
      line += ", packed several to a row"
    lines.append(line)
  if stage.tokenizer_path:
    made = info.get("tokenizer_made")
    lines.append(f"  tokenizer   {stage.tokenizer_path}" + (f" ({made})" if made else ""))
  return lines


def make_stage_dir(workdir: str, stage: str) -> str:
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


def write_config(stage_dir: str, text: str, resumed_from: int | None):
  """DIR/STAGE/config.gin: the configuration of the run that trains now. A resumed run with another
  configuration first keeps the one it replaces as config.<step>.gin, the step it resumed at, and
  says which lines changed (a new LEARNING_RATE or TRAIN_STEPS, say)."""
  path = os.path.join(stage_dir, "config.gin")
  if resumed_from is not None and fileio.exists(path):
    before = fileio.read_text(path)
    if before != text:
      kept = os.path.join(stage_dir, f"config.{resumed_from}.gin")
      fileio.write_text(kept, before)
      old_lines, new_lines = _bindings(before), _bindings(text)
      changed = [f"-{l}" for l in old_lines if l not in new_lines] + [
          f"+{l}" for l in new_lines if l not in old_lines]
      print(f"note: resuming at step {resumed_from} with a changed config ({'; '.join(changed[:6])}"
            f"{'; ...' if len(changed) > 6 else ''}); the previous one is kept as {kept}",
            flush=True)
  fileio.write_text(path, text)


def _bindings(text: str) -> list[str]:
  return [line.strip() for line in text.splitlines()
          if line.strip() and not line.lstrip().startswith("#")]


# What a resumed run must keep to continue exactly: the names say which setting to restore.
def resume_keys(stage: Stage, cfg: LoopConfig, workdir: str) -> dict:
  """Paths inside the work dir (the demo data) are kept relative to it, so a copied or moved work
  dir resumes."""
  from lmtrain.data import prepare
  sources = json.loads(json.dumps(stage.data_sources).replace(
      json.dumps(fileio.absolute(workdir) + "/")[1:-1], "DIR/"))
  keys = {"TRAIN_DATA": sources, "BATCH_SIZE": cfg.batch_size,
          "SEQ_LEN": cfg.seq_len, "MODEL": stage.step.model_config.architecture(),
          "TRAINABLE": optim.trainable_setting(),
          "TRAINABLE_LAYERS": optim.trainable_layers_setting()}
  if stage.step.model_config.lora_rank:
    keys["LORA_BASE_DTYPE"] = optim.lora_base_dtype_setting()
  if stage.tokenizer_path:
    keys["TOKENIZER"] = prepare.tokenizer_sha256(stage.tokenizer_path)
  return keys


def check_resume(stage_dir: str, keys: dict, allow_change: bool) -> dict:
  """Before a resume restores anything: the settings that break exactness (resume_keys) must be
  those of the run that wrote the checkpoints, unless allowed (then recorded in lineage.json)."""
  changes = ckpt_lib.resume_changes(stage_dir, keys)
  # Another optimizer state or mask: the checkpoints cannot be restored, or not continued exactly.
  masks = {k: changes[k] for k in ("TRAINABLE", "TRAINABLE_LAYERS") if k in changes}
  if masks:
    raise UserError(f"{stage_dir}: resuming with another {ckpt_lib.describe_changes(masks)}; "
                    f"the checkpoints hold the optimizer state of the parameters trained before; "
                    f"use a new --workdir (INIT_FROM this one to start from its weights)")
  if changes and not allow_change:
    raise UserError(
        f"{stage_dir}: resuming with other settings than the checkpoints were trained with: "
        f"{ckpt_lib.describe_changes(changes)}; a resumed run would not continue exactly; use a "
        f"new --workdir, or pass --allow_config_change to go on (recorded in lineage.json)")
  if changes and jax.process_index() == 0:
    print(f"warning: resuming with a changed {', '.join(changes)} (--allow_config_change): "
          f"{ckpt_lib.describe_changes(changes)}", flush=True)
  return changes


def train(stage: Stage, workdir: str, cfg: LoopConfig, config_text: str = "",
          allow_config_change: bool = False) -> dict:
  """Runs (or resumes) `stage` in `workdir/<stage.name>` and returns its summary.
  allow_config_change: resume although the data, batch, sequence length, model or tokenizer
  differ from the checkpoints' (check_resume)."""
  # From the start, so a SIGTERM during set-up or compilation also ends in a checkpoint.
  wall_start = time.time()
  with SigtermFlag() as sigterm:
    stage_dir = make_stage_dir(workdir, stage.name)
    with StageLock(stage_dir, held=jax.process_index() == 0):  # one run per stage directory
      return _train(stage, stage_dir, cfg, config_text, sigterm, wall_start, allow_config_change)


def _train(stage: Stage, stage_dir: str, cfg: LoopConfig, config_text: str, sigterm,
           wall_start: float, allow_config_change: bool) -> dict:
  mesh, rules = parallel.make_mesh(), parallel.axis_rules()
  stage.step.check_batch(cfg.batch_size, cfg.microbatches, mesh)

  # The state: resumed, or from the parent (or fresh), and the run's files.
  checkpointer = ckpt_lib.Checkpointer(os.path.join(stage_dir, "checkpoints"))
  keys = resume_keys(stage, cfg, os.path.dirname(stage_dir))
  try:
    changes = (check_resume(stage_dir, keys, allow_config_change)
               if checkpointer.latest_step() is not None else {})
  except UserError:
    checkpointer.close()
    raise
  train_iter = stage.train_data(jax.process_index(), jax.process_count())

  def preflight(abstract_state, shardings):  # before anything is allocated
    device_gib = cfg.device_memory_gib or memory_lib.device_memory_gib()
    extra, (rows, length) = stage.step.memory(mesh, cfg.batch_size, cfg.seq_len, cfg.microbatches)
    memory = memory_lib.memory_plan(abstract_state, shardings, stage.step.model_config, rows,
                                    length, mesh, device_gib, stage.step.trainable())
    memory.parts.update(extra)
    if jax.process_index() == 0:
      print(f"{stage.name}: memory per device: {memory.summary()}", flush=True)
    if cfg.check_memory and device_gib is not None:
      memory_lib.check_fits(memory, stage.name, jax.devices()[0].device_kind)

  start = start_state(stage.step, stage.init_from_parent, cfg.train_steps, cfg.seed, mesh, rules,
                      checkpointer, train_iter, preflight)
  state = start.state
  summary = {"stage": stage.name, "checkpoint": checkpointer.directory, **stage.summary}
  # What the run trains and what AdamW holds for it (all devices together).
  summary["trained_params"] = param_counts(stage.step, state)[0]
  summary["optimizer_state_bytes"] = sum(int(x.size) * x.dtype.itemsize
                                         for x in jax.tree.leaves(state.opt_state))
  step = int(state.step)
  if step >= cfg.train_steps:  # a no-op call leaves the run's files as they are
    summary.update(steps=step, note="already complete", wall_time=time.time() - wall_start)
    checkpointer.close()
    close_iterator(train_iter)
    return summary
  if jax.process_index() == 0:
    write_config(stage_dir, config_text or gin.operative_config_str(), start.resumed_from)
    fileio.write_json(os.path.join(stage_dir, "model.json"),
                      dataclasses.asdict(stage.step.model_config))
    if start.resumed_from is None:
      ckpt_lib.write_lineage(stage_dir, stage.name, config_text, start.parent,
                             tokenizer=stage.tokenizer_path, train_steps=cfg.train_steps,
                             resume_keys=keys)
    else:
      history = ckpt_lib.read_lineage(stage_dir).get("config_changes", [])
      if changes:
        history.append({"step": start.resumed_from,
                        "changed": {k: {"from": a, "to": b} for k, (a, b) in changes.items()}})
      ckpt_lib.update_lineage(stage_dir, train_steps=cfg.train_steps, resume_keys=keys,
                              config_changes=history)
  writer = metrics_lib.MetricsWriter(stage_dir)

  if jax.process_index() == 0:
    print("\n".join(startup_lines(stage, cfg, state, mesh, start)), flush=True)
  tokens_per_step, flops_per_token = stage.step.work(cfg.batch_size, cfg.seq_len)
  peak, peak_source = metrics_lib.peak_flops_per_device()
  throughput = Throughput(tokens_per_step, flops_per_token, jax.device_count(), peak)
  last_saved = start.resumed_from
  late = LateMetrics(lambda at, what: DivergedError(
      f"{stage.name}: {what} at step {at}; last good checkpoint: step "
      f"{last_saved if last_saved is not None else 'none'} in {checkpointer.directory}"),
      limit=cfg.diverge_at)
  end = min(cfg.train_steps, cfg.stop_after or cfg.train_steps)
  bar = tqdm(total=cfg.train_steps, initial=step, desc=stage.name, unit="step",
             disable=jax.process_index() != 0, dynamic_ncols=True, mininterval=1.0)

  def info(finished=False, evaluation=None):
    return HookInfo(step, state, mesh, rules, stage_dir, late.recent, finished, evaluation or {})

  def log(done):
    """Writes a finished step's metrics row at LOG_EVERY (and the schedule's last step)."""
    if done is None:
      return
    throughput.count()
    done_step, values = done
    if (cfg.log_every and done_step % cfg.log_every == 0) or done_step == cfg.train_steps:
      row = {"loss": values["loss"], "learning_rate": values["learning_rate"],
             "grad_norm": values["grad_norm"], **throughput.row(),
             **{k: v for k, v in values.items()
                if k not in ("loss", "learning_rate", "grad_norm", "weight")}}
      writer.write(done_step, row)
      bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_sec']:,.0f}",
                      mfu=f"{row['mfu']:.1%}")

  def save(at_step):
    nonlocal last_saved
    log(late.flush())  # never save a state whose loss was not checked
    checkpointer.save(at_step, start.saved(state), train_iter)
    last_saved = at_step

  def evaluating(what="evaluating"):
    bar.set_description(f"{stage.name} ({what})")
    bar.refresh()

  def finish():
    """The final evaluation and the at-end hooks (their figures join the summary); run before
    the last checkpoint is saved, so a run cut off here is not yet complete and redoes them."""
    log(late.flush())
    evaluating("final evaluation")
    final = evaluator(state)
    if final:
      writer.write(step, final)
    for hook in stage.hooks:
      if hook.at_end:
        summary.update(hook.fn(info(finished=step == cfg.train_steps, evaluation=final)) or {})
    bar.set_description(stage.name)
    return final

  final_eval = None
  try:
    with mesh, parallel.activate(mesh, rules):
      # Compile once, for the first batch's shapes and shardings.
      first_local = next(train_iter)
      batch = parallel.global_batch(first_local, mesh, rules)
      compile_start = time.time()
      ctx = StepContext(mesh, rules, start.shardings, start.optimizer, start.schedule,
                        cfg.microbatches)
      compiled = stage.step.compile(ctx, state, batch)
      evaluator = Evaluator(stage.evaluation, stage.step, ctx, first_local, batch,
                            cfg.eval_steps)
      summary["compile_time"] = time.time() - compile_start
      periodic = [Hook(lambda i: evaluator(i.state), every=cfg.eval_every), *stage.hooks]

      if cfg.eval_at_start and start.resumed_from is None:
        start_eval = evaluator(state)
        if start_eval:
          writer.write(step, start_eval)
          summary.update({f"initial_{k}": v for k, v in start_eval.items()})
        throughput.reset()

      throughput.reset()  # tokens/s and MFU count the steps only: not compilation, not eval
      watchdog = Watchdog(cfg.hang_timeout_s,
                          lambda: f"{stage.name}: step {step} (last checkpoint: step {last_saved})")
      with watchdog:
        while step < end:
          state, device_metrics = compiled(state, batch)  # dispatched; runs while we go on
          step += 1
          log(late.push(step, device_metrics))  # the previous step's metrics, NaN-checked
          watchdog.beat()
          bar.update(1)
          for hook in periodic:  # evaluation, then the stage's hooks
            if hook.every and step % hook.every == 0 and step < end:
              log(late.flush())
              evaluating()
              row = hook.fn(info())
              bar.set_description(stage.name)
              watchdog.beat()
              if row:
                writer.write(step, row)
              throughput.reset()  # keep eval time out of tokens/s
          stop = sigterm.should_stop(step)
          if step == end:  # before the last save: an interrupted finish is redone on rerun
            final_eval = finish()
            watchdog.beat()
          if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == end or stop:
            save(step)
            watchdog.beat()
          if stop:
            checkpointer.wait()
            raise Preempted(f"{stage.name}: {sigterm.name}: saved checkpoint at step {step}; "
                            f"rerun the same command to resume", sigterm.signum)
          if step < end:  # only after any save: the saved iterator state must not include it
            batch = parallel.global_batch(next(train_iter), mesh, rules)
        log(late.flush())
      if final_eval is None:  # nothing left to step (resumed at STOP_AFTER)
        final_eval = finish()
  finally:
    bar.close()
    checkpointer.close()
    writer.close()
    close_iterator(train_iter)

  summary.update(steps=step, loss=late.last.get("loss"), wall_time=time.time() - wall_start,
                 peak_flops_source=peak_source, **final_eval)
  return summary
