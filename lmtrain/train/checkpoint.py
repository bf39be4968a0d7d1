"""Checkpoints: one orbax CheckpointManager per stage directory, and the lineage that chains stages.

A checkpoint holds the whole TrainState (params, optimizer state, step, rng, stage extras) and the data
iterator's state, so a resumed run continues exactly. Restoring against abstract arrays that carry the
current mesh's shardings reshards a checkpoint written on another mesh. A LoRA stage's checkpoint
leaves out what its parents hold (StepFactory.checkpoint_omits): the frozen base and frozen copies
are read again from the parent checkpoints lineage.json names (restore_params, merged_params).
"""

import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
import sys
import time

import gin
import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

import lmtrain
from lmtrain import fileio
from lmtrain.data import prepare
from lmtrain.data.loader import STATE_KIND as LOADER_STATE_KIND
from lmtrain.errors import UserError
from lmtrain.model import lora
from lmtrain.train import roles
from lmtrain.train.state import filled, pruned


@gin.configurable
class Checkpointer:
  """Saves and restores `DIR/<stage>/checkpoints/<step>/` with retention and async writes."""

  def __init__(self, directory, keep_last=3, keep_every=None, async_save=True):
    self.directory = fileio.absolute(directory)  # a local path or a bucket URL (gs://...)
    self._saving = None  # the step of the save in flight
    # A failed write surfaces once, as CheckpointSaveError; orbax's asyncio tasks would also log
    # each of its fragments' errors ("Task exception was never retrieved").
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep_last, keep_period=keep_every, create=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))

  def latest_step(self):
    return self.manager.latest_step()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_iterator=None):
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self._saving = int(step)
    with self._save_errors():
      self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)

  @contextlib.contextmanager
  def _save_errors(self):
    """A failed write (a full disk, a quota, a lost bucket) becomes one line naming the step and
    the checkpoints kept; the failed step's temporary directory is removed."""
    try:
      yield
    except UserError:
      raise
    except Exception as e:  # orbax and tensorstore raise OSError, ValueError, their own types
      step = self._saving
      self._remove_partial(step)
      kept = [s for s in self.steps() if s != step]
      raise CheckpointSaveError(
          f"saving checkpoint {step} in {self.directory} failed ({one_line(e)}); "
          f"{'checkpoints ' + ', '.join(map(str, kept)) + ' kept' if kept else 'no checkpoint kept'}"
          f"; fix the storage and rerun to resume") from None

  def _remove_partial(self, step):
    """Removes the failed step's temporary (or uncommitted) directory. The storage library may
    still be finishing the failed write's other fragments there: a few tries, a warning if it
    stays."""
    if step is None or jax.process_index() != 0:
      return
    problem = None
    for attempt in range(20):
      try:
        names = [n for n in fileio.listdir(self.directory)
                 if n.startswith(f"{step}.orbax-checkpoint-tmp") or (
                     n == str(step) and not _is_committed(os.path.join(self.directory, n)))]
        for name in names:
          fileio.rmtree(os.path.join(self.directory, name))
        if not names:
          return
      except (OSError, UserError) as e:
        problem = e
      time.sleep(0.05 * (attempt + 1))
    logging.warning("could not remove the partial checkpoint %s in %s: %s", step, self.directory,
                    problem)

  def restore_newest_good(self, abstract_state, data_iterator=None) -> tuple[object, int]:
    """Restores the latest checkpoint; one that fails to restore (a truncated or missing file) is
    moved to DIR/<stage>/damaged_checkpoints/ (kept, never deleted) with a warning naming the step
    and the problem, and the next newest is tried. None left: a UserError."""
    for step in reversed(self.steps()):
      try:
        problem = self._check_complete(step)
        if problem is None:
          state = self.restore(abstract_state, data_iterator, step)
      except UserError:  # another model, a setting: the checkpoint is fine
        raise
      except Exception as e:
        problem = restore_problem(e)
      problem = _agree(problem)  # every process moves on together
      if problem is None:
        return state, step
      moved = self._move_aside(step)
      left = [s for s in self.steps() if s < step]
      message = (f"checkpoint {step} in {self.directory} cannot be restored ({problem}); moved it "
                 f"to {moved}")
      if not left:
        raise UserError(message + "; no earlier checkpoint is left (a rerun starts this stage "
                        "from the beginning)")
      if jax.process_index() == 0:
        print(f"warning: {message}; resuming from checkpoint {left[-1]} instead",
              file=sys.stderr, flush=True)
    raise UserError(f"{self.directory}: no checkpoint to restore")

  def _check_complete(self, step) -> str | None:
    """What a restore would not notice: a data directory without this run's iterator states."""
    data_dir = os.path.join(self.directory, str(step), "data")
    if fileio.isdir(data_dir) and not self._other_hosts_data_states(step):
      return "its data-iterator state is missing"
    return None

  def _move_aside(self, step) -> str:
    target = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR, str(step))
    if jax.process_index() == 0:
      suffix = 1
      while fileio.exists(target):
        suffix += 1
        target = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR, f"{step}.{suffix}")
      fileio.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"lmtrain_moved_checkpoint_{step}")
    self.manager.reload()
    return target

  def restore(self, abstract_state, data_iterator=None, step=None):
    """Restores onto the shardings that `abstract_state` (ShapeDtypeStructs) carries."""
    step = self.latest_step() if step is None else step
    # A checkpoint of another model config would fail deep inside orbax: say what differs instead.
    check_compatible(saved_params(self.directory, step), abstract_state.params, self.directory)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    other_hosts = None
    if data_iterator is not None:
      if self._has_data_state(step):
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      else:
        other_hosts = self._other_hosts_data_states(step)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if other_hosts is not None:
      # Written by another number of processes. A loader over prepared corpora takes the old hosts'
      # states and continues where the data order was; any other iterator restarts its order.
      if other_hosts and all(isinstance(s, dict) and s.get("kind") == LOADER_STATE_KIND
                             for s in other_hosts):
        data_iterator.set_state({"resume_from_hosts": other_hosts})
        logging.warning("checkpoint %d was written by %d processes; the data order continues "
                        "where they were", step, len(other_hosts))
      else:
        logging.warning("checkpoint %d holds no data-iterator state for process %d of %d; "
                        "the data pipeline restarts from its beginning", step,
                        jax.process_index(), jax.process_count())
    return restored["state"]

  def _other_hosts_data_states(self, step) -> list[dict]:
    """The data states of every process of the run that wrote `step` (none: an empty list)."""
    data_dir = os.path.join(self.directory, str(step), "data")
    if not fileio.exists(data_dir):
      return []
    names = [n for n in fileio.listdir(data_dir) if n.startswith("process_") and n.endswith(".json")]
    return [json.loads(fileio.read_text(os.path.join(data_dir, n))) for n in sorted(names)]

  def _has_data_state(self, step) -> bool:
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return fileio.exists(os.path.join(self.directory, str(step), "data", name))

  def wait(self):
    with self._save_errors():
      self.manager.wait_until_finished()

  def close(self):
    try:
      self.wait()
    finally:
      self.manager.close()


DAMAGED_DIR = "damaged_checkpoints"


class CheckpointSaveError(UserError):
  """A checkpoint could not be written. orbax's writer threads may still hold the failed write's
  tasks, whose errors would print at interpreter exit: the CLI exits at once after its line."""
  exit_at_once = True


def one_line(error: Exception) -> str:
  """An exception as a short line: its root cause's first line, or its type's name."""
  while error.__cause__ is not None:  # tensorstore's own words, not orbax's wrapper
    error = error.__cause__
  text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
  code = re.search(r"os_error_code='?(\d+)", str(error))  # tensorstore's word for the OS error
  if code:
    return f"{os.strerror(int(code.group(1)))}, errno {code.group(1)}"
  text = text if len(text) <= 200 else text[:197] + "..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def restore_problem(error: Exception) -> str:
  """What is wrong with a checkpoint that failed to restore, in one line; running out of device
  memory is not the checkpoint's fault and is raised as it is."""
  if "RESOURCE_EXHAUSTED" in str(error):
    raise error
  return one_line(error)


def _is_committed(step_dir: str) -> bool:
  return fileio.exists(os.path.join(step_dir, "_CHECKPOINT_METADATA")) or fileio.exists(
      os.path.join(step_dir, "commit_success.txt"))


def _agree(problem: str | None) -> str | None:
  """On several processes: a problem any of them saw (the first one's words) for all of them."""
  if jax.process_count() == 1:
    return problem
  import numpy as np
  from jax.experimental import multihost_utils
  failed = multihost_utils.process_allgather(np.asarray(problem is not None))
  if not failed.any():
    return None
  return problem or f"process {int(np.argmax(failed))} could not restore it"


def restore_params(stage_dir: str, abstract_params, step=None):
  """One model's params from a stage's checkpoint (a chained stage's parent, `lmtrain sample`,
  the converters), resharded onto the shardings in `abstract_params`; shape and vocab mismatches
  are reported by name. A LoRA stage's checkpoint holds its adapters and trained heads only: the
  frozen rest is its base, the parent checkpoint lineage.json names, read from there in turn."""
  ckpt_dir = os.path.join(stage_dir, "checkpoints")
  if not fileio.isdir(ckpt_dir):
    raise UserError(f"INIT_FROM={stage_dir}: no checkpoints/ directory there")
  with ocp.CheckpointManager(ckpt_dir, item_names=("state", "data"),
                             options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
    steps = sorted(manager.all_steps())
    if not steps:
      raise UserError(f"{stage_dir}: no finished checkpoint there")
    if step is not None and step not in steps:
      raise UserError(f"{stage_dir}: no checkpoint at step {step}; the steps there are "
                      f"{', '.join(map(str, steps))}")
    step = steps[-1] if step is None else step
    try:
      saved = saved_params(ckpt_dir, step)
      one, role = roles.one_model(saved, abstract_params)
      absent = _absent(abstract_params, one)
      from_base = lora.has_adapters(one) and any(jax.tree.leaves(absent))
      held = pruned(abstract_params, absent) if from_base else abstract_params
      wanted = {role: held} if role else held
      check_compatible(one, held, stage_dir)
      restore_args = ocp.checkpoint_utils.construct_restore_args(wanted)
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item={"params": wanted}, restore_args={"params": restore_args},
          partial_restore=True)))
    except UserError:
      raise
    except Exception as e:  # a truncated or missing file
      raise UserError(f"{stage_dir}: checkpoint {step} cannot be restored "
                      f"({restore_problem(e)})") from None
  params = restored["state"]["params"]
  params = params[role] if role else params
  if from_base:
    base_abstract = pruned(abstract_params, jax.tree.map(lambda a: not a, absent))
    params = filled(params, filled(_base_params(stage_dir, base_abstract), abstract_params))
  return params, step


def _absent(abstract, saved):
  """True for each leaf of `abstract` that `saved` (a checkpoint's params metadata) lacks."""
  if not isinstance(abstract, dict):
    return saved is None
  return {k: _absent(v, saved.get(k) if isinstance(saved, dict) else None)
          for k, v in abstract.items()}


def _base_params(stage_dir: str, abstract):
  """The frozen base of a LoRA checkpoint in `stage_dir`: the leaves `abstract` names, from the
  parent checkpoint its lineage.json records (with that parent's own adapters folded in)."""
  entry = read_lineage(stage_dir).get("parent")
  if not entry or "path" not in entry:
    raise UserError(f"{stage_dir}: its checkpoint holds LoRA adapters without their base weights, "
                    f"and its lineage.json names no parent checkpoint to take them from")
  try:
    return merged_params(parent_dir(stage_dir, entry), abstract, entry)[0]
  except UserError as e:
    raise UserError(f"{stage_dir} (LoRA adapters over the weights of {entry['path']} at step "
                    f"{entry.get('step')}): {e}") from None


def parent_dir(stage_dir: str, entry: dict) -> str:
  """Where the parent checkpoint `entry` (a lineage.json parent entry) is now: its path, or, when
  the work dir was moved or copied, the stage of that name beside `stage_dir`."""
  path = entry["path"]
  if fileio.isdir(os.path.join(path, "checkpoints")):
    return path
  beside = os.path.join(os.path.dirname(stage_dir.rstrip("/")),
                        os.path.basename(path.rstrip("/")))
  return beside if fileio.isdir(os.path.join(beside, "checkpoints")) else path


def _model_keys(path: str, step: int, abstract) -> set:
  """The top-level parameter names of the model saved at `step` in `path` (its policy, for
  `abstract` one model): those its checkpoint holds, and for a LoRA checkpoint its base's too."""
  try:
    saved = saved_params(os.path.join(path, "checkpoints"), step)
  except (OSError, ValueError) as e:  # missing (a step kept no longer) or damaged metadata
    raise UserError(f"INIT_FROM={path}: checkpoint {step} cannot be restored "
                    f"({one_line(e)})") from None
  saved, _ = roles.one_model(saved, abstract)
  keys = set(saved)
  entry = read_lineage(path).get("parent")
  if lora.has_adapters(saved) and entry and entry.get("step") is not None:
    base = parent_dir(path, entry)
    if not fileio.isdir(os.path.join(base, "checkpoints")):  # else its trunk would look new
      raise UserError(f"{path} (LoRA adapters over the weights of {entry['path']} at step "
                      f"{entry['step']}): {base}: no checkpoints there; a LoRA stage's "
                      f"checkpoints hold its adapters, not the base weights they adapt")
    keys |= _model_keys(base, entry["step"], abstract)
  return keys


def committed_at(ckpt_dir: str, step: int) -> int | None:
  """When checkpoint `step` was committed (orbax's metadata, in ns), to tell it from one written
  anew at the same step; None when not recorded."""
  path = os.path.join(ckpt_dir, str(step), "_CHECKPOINT_METADATA")
  try:
    value = fileio.read_json(path).get("commit_timestamp_nsecs") if fileio.exists(path) else None
  except (OSError, ValueError, UserError):
    return None
  return int(value) if value else None


def merged_params(path: str, abstract, entry: dict | None = None):
  """One model's params from the stage in `path` with any LoRA adapters of its own folded into
  its weights (lora.merged), laid out as `abstract`, and the step read: its latest checkpoint, or
  the step of `entry` (the lineage entry a child recorded), which must be the checkpoint the child
  started from (committed_at)."""
  ckpt_dir = os.path.join(path, "checkpoints")
  step = entry.get("step") if entry else None
  if not fileio.isdir(ckpt_dir):
    raise UserError(f"{path}: no checkpoints there" + (
        "; a LoRA stage's checkpoints hold its adapters, not the base weights they adapt"
        if entry else ""))
  with ocp.CheckpointManager(ckpt_dir, item_names=("state", "data"),
                             options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
    steps = sorted(manager.all_steps())
  if step is None:
    if not steps:
      raise UserError(f"{path}: no finished checkpoint there")
    step = steps[-1]
  elif step not in steps:
    raise UserError(f"{path}: checkpoint {step}, the one this stage started from, is gone (the "
                    f"steps there: {', '.join(map(str, steps)) or 'none'}); a LoRA stage's "
                    f"checkpoints hold its adapters, not the base weights they adapt")
  expected = entry.get("committed") if entry else None
  if expected is not None:
    now = committed_at(ckpt_dir, step)
    if now is not None and now != expected:
      raise UserError(f"{path}: checkpoint {step} was written anew since this stage started from "
                      f"it; its adapters and state belong to the earlier one")
  try:
    saved = saved_params(ckpt_dir, step)
  except (OSError, ValueError) as e:  # missing (a step kept no longer) or damaged metadata
    raise UserError(f"{path}: checkpoint {step} cannot be restored ({one_line(e)})") from None
  saved, _ = roles.one_model(saved, abstract)
  if lora.has_adapters(saved):
    return _restore_merged(path, abstract, saved[lora.KEY], step)
  return restore_params(path, abstract, step)


def check_parent_tokenizer(parent_dir: str, tokenizer_path: str):
  """One line when the parent stage (its lineage.json) was trained with another tokenizer than the
  child's: the ids would mean other pieces, though the vocab sizes may agree."""
  lineage = read_lineage(parent_dir)
  expected = lineage.get("tokenizer_sha256")
  if not expected:  # written before lineage recorded it, or a converted checkpoint
    return
  actual = prepare.tokenizer_sha256(tokenizer_path)
  if actual != expected:
    raise UserError(f"INIT_FROM={parent_dir}: trained with tokenizer {lineage.get('tokenizer')} "
                    f"(sha256 {expected[:12]}...), but this run's TOKENIZER {tokenizer_path} has "
                    f"sha256 {actual[:12]}...; use the parent's tokenizer")


@gin.configurable
def parent_checks(allow_unfinished: bool = False) -> dict:
  """Settings of the checks a chained stage makes of its parent: `allow_unfinished` starts from a
  parent whose run stopped before its TRAIN_STEPS (a STOP_AFTER, a preemption)."""
  return {"allow_unfinished": allow_unfinished}


def check_parent_finished(parent_dir: str, latest: int | None):
  """One line when the parent's run has not reached its TRAIN_STEPS (lineage.json's train_steps):
  its latest checkpoint is a mid-run one, with the final evaluation and hooks not yet run."""
  planned = read_lineage(parent_dir).get("train_steps")
  if latest is None or not planned or latest >= planned or parent_checks()["allow_unfinished"]:
    return
  raise UserError(f"INIT_FROM={parent_dir}: that run is unfinished (its latest checkpoint is step "
                  f"{latest} of {planned}); rerun its command to finish it, or start from it "
                  f"anyway with --gin_param parent_checks.allow_unfinished=True")


def parent_initializer(workdir: str, init_from, default_parent: str, model_config=None,
                       seed: int = 0, tokenizer: str | None = None):
  """`Stage.init_from_parent` for a chained stage: params from INIT_FROM (a stage directory such as
  DIR/pretrain, or a converted checkpoint), else from DIR/<default_parent>; returns them with the
  parent's lineage entry (its stage, path, step and when that checkpoint was committed). Top-level
  params the parent lacks (a new scalar head on an LM trunk, say; the parent's LM head is simply
  not loaded) are initialised fresh from `model_config`. `tokenizer`: the child's tokenizer file,
  checked against the parent's lineage. `pinned`: the entry returned at the run's start, for a
  resume that reloads the same checkpoint (a LoRA stage's frozen base)."""
  path = fileio.absolute(init_from or os.path.join(workdir, default_parent))

  def init(abstract_params, pinned=None):
    where = parent_dir(os.path.join(workdir, default_parent), pinned) if pinned else path
    if not fileio.isdir(os.path.join(where, "checkpoints")):
      if pinned:
        raise UserError(f"{where}: the checkpoint this run started from is gone (its frozen "
                        f"base weights are not in this stage's checkpoints)")
      raise UserError(f"INIT_FROM={where}: no checkpoints there (run the {default_parent} stage "
                      f"first, or set --gin.INIT_FROM)")
    if tokenizer and not pinned:
      check_parent_tokenizer(where, tokenizer)
    if pinned is None:
      with ocp.CheckpointManager(os.path.join(where, "checkpoints"),
                                 item_names=("state", "data"),
                                 options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
        latest = manager.latest_step()
      check_parent_finished(where, latest)
      if latest is None:
        raise UserError(f"INIT_FROM={where}: no finished checkpoint there")
    else:
      latest = pinned["step"]
    saved = _model_keys(where, latest, abstract_params)
    # A child's adapters are its own (fresh); a parent's are folded into its weights.
    base = lora.without_adapters(abstract_params)
    new_keys = [k for k in base if k not in saved] if model_config else []
    loaded = {k: v for k, v in base.items() if k not in new_keys}
    entry = pinned or {"step": latest,
                       "committed": committed_at(os.path.join(where, "checkpoints"), latest)}
    params, step = merged_params(where, loaded, entry)
    if lora.has_adapters(abstract_params):
      params[lora.KEY] = lora.placed_fresh_adapters(
          abstract_params[lora.KEY], jax.random.fold_in(jax.random.PRNGKey(seed), 1))
    if new_keys:
      from lmtrain.model import transformer
      full_init = transformer.init_fn(model_config)
      fresh = jax.jit(lambda rng: {k: full_init(rng)[k] for k in new_keys},
                      out_shardings={k: jax.tree.map(lambda a: a.sharding, abstract_params[k])
                                     for k in new_keys})(jax.random.PRNGKey(seed))
      params = {**params, **fresh}
    parent_stage = read_lineage(where).get("stage", os.path.basename(where.rstrip("/")))
    return params, {"stage": parent_stage, "path": where, "step": int(step),
                    "committed": entry.get("committed")}

  return init


def _restore_merged(path: str, abstract_base, saved_adapters, step):
  """The base params of a LoRA checkpoint with its adapters folded in (lora.merged), laid out as
  `abstract_base`; the adapters are read whole onto every device (they are small)."""
  model_json = os.path.join(path, "model.json")
  if not fileio.exists(model_json):
    raise UserError(f"INIT_FROM={path}: its checkpoint holds LoRA adapters but model.json (their "
                    f"alpha and rank) is missing")
  cfg = fileio.read_json(model_json)
  scale = float(cfg["lora_alpha"]) / int(cfg["lora_rank"])
  sharding = jax.tree.leaves(abstract_base)[0].sharding
  whole = (jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
           if isinstance(sharding, jax.sharding.NamedSharding) else sharding)
  abstract_adapters = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=whole), saved_adapters)
  params, step = restore_params(path, {**abstract_base, lora.KEY: abstract_adapters}, step)
  fold = jax.jit(lambda p: lora.merged(p, scale),
                 out_shardings=jax.tree.map(lambda a: a.sharding, abstract_base))
  return fold(params), step


def saved_params(ckpt_dir: str, step: int):
  """Shape metadata of the params saved at `step`. Read with the handler directly: a fresh manager's
  item_metadata is None for items it has not restored yet."""
  state_dir = epath.Path(ckpt_dir) / str(step) / "state"
  return ocp.StandardCheckpointHandler().metadata(state_dir)["params"]


def check_compatible(saved, expected, where):
  """One line naming every parameter whose shape differs (vocab size first, as it is the usual one)."""
  flat_saved = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in
                jax.tree_util.tree_leaves_with_path(saved)}
  flat_expected = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in
                   jax.tree_util.tree_leaves_with_path(expected)}
  problems = []
  embed = "['embed']"
  if embed in flat_saved and flat_saved[embed][0] != flat_expected[embed][0]:
    problems.append(f"vocab size {flat_saved[embed][0]} in the checkpoint vs "
                    f"{flat_expected[embed][0]} in the model config")
  missing = sorted(set(flat_expected) - set(flat_saved))
  if missing:
    problems.append(f"missing parameters {missing[:4]}")
  for key in sorted(set(flat_expected) & set(flat_saved)):
    if flat_saved[key] != flat_expected[key] and key != embed:
      problems.append(f"{key} has shape {flat_saved[key]} there vs {flat_expected[key]} here")
  if problems:
    raise UserError(f"{where}: checkpoint does not fit the model: " + "; ".join(problems[:4]))


def write_lineage(stage_dir: str, stage: str, config_text: str, parent=None, tokenizer=None,
                  **facts):
  """DIR/<stage>/lineage.json: what this stage is, which checkpoint it started from, its config;
  `facts`: the loop's (train_steps, the settings a resume must keep)."""
  lineage = {
      "stage": stage,
      "parent": parent,
      "tokenizer": fileio.absolute(tokenizer) if tokenizer else None,
      "tokenizer_sha256": prepare.tokenizer_sha256(tokenizer) if tokenizer else None,
      "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
      "lmtrain_version": lmtrain.__version__,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      **facts,
  }
  fileio.write_json(os.path.join(stage_dir, "lineage.json"), lineage)
  return lineage


def read_lineage(stage_dir: str) -> dict:
  path = os.path.join(stage_dir, "lineage.json")
  return fileio.read_json(path) if fileio.exists(path) else {}


def update_lineage(stage_dir: str, **fields):
  lineage = read_lineage(stage_dir)
  if lineage:
    lineage.update(fields)
    fileio.write_json(os.path.join(stage_dir, "lineage.json"), lineage)


def resume_changes(stage_dir: str, keys: dict) -> dict:
  """{setting: (at the checkpoint, now)} for each of `keys` (JSON values: the data sources, batch
  size, sequence length, model architecture, tokenizer hash) that differs from the run that wrote
  the checkpoints (lineage.json's resume_keys; a run from before they were kept: none)."""
  before = read_lineage(stage_dir).get("resume_keys") or {}
  now = json.loads(json.dumps(keys))  # tuples as lists, as they were stored
  return {k: (before[k], now[k]) for k in now if k in before and before[k] != now[k]}


def describe_changes(changes: dict) -> str:
  parts = []
  for key, (old, new) in changes.items():
    if isinstance(old, dict) and isinstance(new, dict):  # the model: only the fields that differ
      fields = sorted(set(old) | set(new))
      diff = [f"{f} {old.get(f)} -> {new.get(f)}" for f in fields if old.get(f) != new.get(f)]
      parts.append(f"{key} ({', '.join(diff)})")
    else:
      parts.append(f"{key} {_short(old)} -> {_short(new)}")
  return "; ".join(parts)


def _short(value, limit=80) -> str:
  text = value if isinstance(value, str) else json.dumps(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."
