"""Checkpoints: one orbax CheckpointManager per stage directory, and the lineage that chains stages.

A checkpoint holds the whole TrainState (params, optimizer state, step, rng, stage extras) and the data
iterator's state, so a resumed run continues exactly. Restoring against abstract arrays that carry the
current mesh's shardings reshards a checkpoint written on another mesh.
"""

import datetime
import hashlib
import json
import logging
import os

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
from lmtrain.train import roles


@gin.configurable
class Checkpointer:
  """Saves and restores `DIR/<stage>/checkpoints/<step>/` with retention and async writes."""

  def __init__(self, directory, keep_last=3, keep_every=None, async_save=True):
    self.directory = fileio.absolute(directory)  # a local path or a bucket URL (gs://...)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep_last, keep_period=keep_every, create=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator=None):
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)

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
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def restore_params(stage_dir: str, abstract_params, step=None):
  """Params only from another stage's checkpoint (the parent of a chained stage), resharded onto
  the shardings in `abstract_params`. Shape and vocab mismatches are reported by name."""
  ckpt_dir = os.path.join(stage_dir, "checkpoints")
  if not fileio.isdir(ckpt_dir):
    raise UserError(f"INIT_FROM={stage_dir}: no checkpoints/ directory there")
  with ocp.CheckpointManager(ckpt_dir, item_names=("state", "data"),
                             options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise UserError(f"INIT_FROM={stage_dir}: no finished checkpoint there")
    saved = saved_params(ckpt_dir, step)
    one, role = roles.one_model(saved, abstract_params)
    wanted = {role: abstract_params} if role else abstract_params
    check_compatible(one, abstract_params, stage_dir)
    restore_args = ocp.checkpoint_utils.construct_restore_args(wanted)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"params": wanted}, restore_args={"params": restore_args},
        partial_restore=True)))
  params = restored["state"]["params"]
  return (params[role] if role else params), step


def check_parent_tokenizer(parent_dir: str, tokenizer_path: str):
  """One line when the parent stage (its lineage.json) was trained with another tokenizer than the
  child's: the ids would mean other pieces, though the vocab sizes may agree."""
  lineage_path = os.path.join(parent_dir, "lineage.json")
  if not fileio.exists(lineage_path):
    return
  lineage = fileio.read_json(lineage_path)
  expected = lineage.get("tokenizer_sha256")
  if not expected:  # written before lineage recorded it, or a converted checkpoint
    return
  actual = prepare.tokenizer_sha256(tokenizer_path)
  if actual != expected:
    raise UserError(f"INIT_FROM={parent_dir}: trained with tokenizer {lineage.get('tokenizer')} "
                    f"(sha256 {expected[:12]}...), but this run's TOKENIZER {tokenizer_path} has "
                    f"sha256 {actual[:12]}...; use the parent's tokenizer")


def parent_initializer(workdir: str, init_from, default_parent: str, model_config=None,
                       seed: int = 0, tokenizer: str | None = None):
  """`Stage.init_from_parent` for a chained stage: params from INIT_FROM (a stage directory such as
  DIR/pretrain, or a converted checkpoint), else from DIR/<default_parent>; returns them with the
  parent's lineage entry. Top-level params the parent lacks (a new scalar head on an LM trunk, say;
  the parent's LM head is simply not loaded) are initialised fresh from `model_config`.
  `tokenizer`: the child's tokenizer file, checked against the parent's lineage."""
  path = fileio.absolute(init_from or os.path.join(workdir, default_parent))

  def init(abstract_params):
    if not fileio.isdir(os.path.join(path, "checkpoints")):
      raise UserError(f"INIT_FROM={path}: no checkpoints there (run the {default_parent} stage "
                      f"first, or set --gin.INIT_FROM)")
    if tokenizer:
      check_parent_tokenizer(path, tokenizer)
    with ocp.CheckpointManager(os.path.join(path, "checkpoints"), item_names=("state", "data"),
                               options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
      latest = manager.latest_step()
    saved = saved_params(os.path.join(path, "checkpoints"), latest) if latest is not None else {}
    saved, _ = roles.one_model(saved, abstract_params)
    new_keys = [k for k in abstract_params if k not in saved] if model_config else []
    loaded = {k: v for k, v in abstract_params.items() if k not in new_keys}
    params, step = restore_params(path, loaded)
    if new_keys:
      from lmtrain.model import transformer
      full_init = transformer.init_fn(model_config)
      fresh = jax.jit(lambda rng: {k: full_init(rng)[k] for k in new_keys},
                      out_shardings={k: jax.tree.map(lambda a: a.sharding, abstract_params[k])
                                     for k in new_keys})(jax.random.PRNGKey(seed))
      params = {**params, **fresh}
    parent_stage = os.path.basename(path.rstrip("/"))
    lineage_path = os.path.join(path, "lineage.json")
    if fileio.exists(lineage_path):
      parent_stage = fileio.read_json(lineage_path).get("stage", parent_stage)
    return params, {"stage": parent_stage, "path": path, "step": int(step)}

  return init


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


def write_lineage(stage_dir: str, stage: str, config_text: str, parent=None, tokenizer=None):
  """DIR/<stage>/lineage.json: what this stage is, which checkpoint it started from, its config."""
  lineage = {
      "stage": stage,
      "parent": parent,
      "tokenizer": fileio.absolute(tokenizer) if tokenizer else None,
      "tokenizer_sha256": prepare.tokenizer_sha256(tokenizer) if tokenizer else None,
      "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
      "lmtrain_version": lmtrain.__version__,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  fileio.write_json(os.path.join(stage_dir, "lineage.json"), lineage)
  return lineage
