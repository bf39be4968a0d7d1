"""The loop's pieces one by one (one-step-late metrics and the NaN guard, throughput, SIGTERM, the
hang watchdog, the starting state, evaluation), and the loop itself in this process with a tiny
stage: hooks at their periods and at the end, eval rows, the summary."""

import json
import os
import signal
import threading

import jax.numpy as jnp
import numpy as np
import pytest

from lmtrain import config, parallel
from lmtrain.errors import DivergedError, Preempted
from lmtrain.losses import lm_loss, perplexity_metrics
from lmtrain.model import transformer
from lmtrain.train import checkpoint as ckpt_lib
from lmtrain.train import loop, monitor, start
from lmtrain.train.evaluation import Evaluation, Evaluator
from lmtrain.train.state import state_shardings
from lmtrain.train.step import LossStep, StepContext
import util


@pytest.fixture(autouse=True)
def gin_config():
  """The loop's gin-configured parts (mesh, optimizer, schedule) as the pretrain stage sets them."""
  config.setup("pretrain", macros={"MODEL": "'tiny'", "TRAIN_STEPS": "6", "BATCH_SIZE": "8",
                                   "SEQ_LEN": "32", "EVAL_EVERY": "3", "LOG_EVERY": "2",
                                   "CHECKPOINT_EVERY": "100"})


def test_late_metrics_are_read_one_step_late_and_nan_stops_the_run():
  late = monitor.LateMetrics(lambda step, what: DivergedError(f"step {step}: {what}"), window=2)
  assert late.push(1, {"loss": jnp.float32(3.0)}) is None  # nothing finished before step 1
  assert late.push(2, {"loss": jnp.float32(2.0)}) == (1, {"loss": 3.0})
  assert late.push(3, {"loss": jnp.float32(1.0)}) == (2, {"loss": 2.0})
  assert late.flush() == (3, {"loss": 1.0}) and late.flush() is None
  assert late.recent == [{"loss": 2.0}, {"loss": 1.0}] and late.last == {"loss": 1.0}
  late.push(4, {"loss": jnp.float32(np.nan)})
  with pytest.raises(DivergedError, match="step 4: loss became nan"):
    late.flush()
  assert late.last == {"loss": 1.0}  # the bad step never becomes the last good one


@pytest.mark.parametrize("metrics, expected", [
    ({"loss": 5.5e11, "grad_norm": 3.0},
     "step 2: loss became 5.5e\\+11, beyond LoopConfig.diverge_at=1e\\+08"),
    ({"loss": -2e9, "grad_norm": 3.0}, "step 2: loss became -2e\\+09"),
    ({"loss": 4.0, "grad_norm": 1e12}, "step 2: gradient norm became 1e\\+12, beyond"),
    ({"loss": 4.0, "grad_norm": np.inf}, "step 2: gradient norm became inf"),
])
def test_an_exploding_loss_or_gradient_stops_the_run_like_a_nan(metrics, expected):
  late = monitor.LateMetrics(lambda step, what: DivergedError(f"step {step}: {what}"), limit=1e8)
  late.push(1, {"loss": jnp.float32(3.0), "grad_norm": jnp.float32(2.0)})
  late.push(2, {k: jnp.float32(v) for k, v in metrics.items()})
  with pytest.raises(DivergedError, match=expected):
    late.flush()
  assert late.last == {"loss": 3.0, "grad_norm": 2.0}
  unbounded = monitor.LateMetrics(lambda step, what: DivergedError(what), limit=None)
  unbounded.push(1, {k: jnp.float32(v) for k, v in metrics.items()})
  assert unbounded.flush()[0] == 1  # without a limit only a non-finite loss stops


def test_throughput_counts_tokens_over_the_steps_since_the_last_row(monkeypatch):
  clock = iter([100.0, 104.0, 104.0, 106.0, 106.0])
  monkeypatch.setattr(monitor.time, "time", lambda: next(clock))
  meter = monitor.Throughput(tokens_per_step=1000, flops_per_token=6.0, n_devices=2, peak=3000.0)
  meter.count()
  meter.count()
  row = meter.row()  # 2 steps in 4 s
  assert row["step_time"] == 2.0 and row["tokens_per_sec"] == 500.0
  assert row["mfu"] == pytest.approx(500.0 * 6.0 / (2 * 3000.0))
  meter.count()
  assert meter.row()["step_time"] == 2.0  # the interval restarted at the first row


def test_sigterm_is_recorded_and_the_handler_restored():
  before = signal.getsignal(signal.SIGTERM)
  with monitor.SigtermFlag() as flag:
    assert not flag.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag.raised and flag.should_stop(2)
  assert signal.getsignal(signal.SIGTERM) is before


def test_a_first_ctrl_c_asks_for_a_save_and_a_second_aborts(capsys):
  before = signal.getsignal(signal.SIGINT)
  with monitor.SigtermFlag() as flag:
    os.kill(os.getpid(), signal.SIGINT)
    assert flag.raised and flag.should_stop(1) and flag.name == "SIGINT"
    assert "saving a checkpoint at the next step boundary" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is before
  assert Preempted("x", flag.signum).exit_code == 130
  assert Preempted("x").exit_code == 143


def test_the_watchdog_exits_with_code_4_when_nothing_beats(monkeypatch, capsys):
  exited = threading.Event()
  codes = []
  monkeypatch.setattr(monitor.os, "_exit", lambda code: (codes.append(code), exited.set()))
  with monitor.Watchdog(0.01, lambda: "pretrain: step 7") as watchdog:
    watchdog.last -= 60  # as if the last step finished a minute ago
    assert exited.wait(10)
  assert codes[0] == monitor.HANG_EXIT_CODE
  assert "pretrain: step 7: no progress for 60 s" in capsys.readouterr().err


def test_start_state_is_fresh_from_a_parent_or_resumed(tmp_path):
  mesh, rules = util.mesh_of({"data": 2, "fsdp": 2, "tensor": 2}), parallel.axis_rules()
  factory = LossStep(util.TINY, lm_loss, frozen_reference=True)
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  fresh = start.start_state(factory, None, 10, 0, mesh, rules, checkpointer, None)
  assert fresh.resumed_from is None and fresh.parent is None and int(fresh.state.step) == 0
  # Params and the frozen reference are laid out by their logical names on the mesh.
  _, _, names = transformer.abstract_model(util.TINY)
  expected = state_shardings(mesh, rules, fresh.state, names, {"reference": names})
  assert fresh.state.params["embed"].sharding == expected.params["embed"]
  assert fresh.state.extras["reference"]["embed"].sharding == expected.params["embed"]
  np.testing.assert_array_equal(fresh.state.extras["reference"]["embed"],
                                fresh.state.params["embed"])

  parent_params = util.init_params(util.TINY, seed=3)
  seen = []

  def from_parent(abstract, pinned=None):
    assert pinned is None  # a new run
    seen.append(abstract["embed"].sharding)
    return parent_params, {"stage": "pretrain", "step": 5}

  child = start.start_state(factory, from_parent, 10, 0, mesh, rules, checkpointer, None)
  assert child.parent == {"stage": "pretrain", "step": 5}
  assert seen == [expected.params["embed"]]  # the parent restores straight into the shardings
  np.testing.assert_array_equal(child.state.params["embed"], parent_params["embed"])

  checkpointer.save(4, child.state.replace(step=jnp.int32(4)))
  checkpointer.wait()
  resumed = start.start_state(factory, from_parent, 10, 0, mesh, rules, checkpointer, None)
  assert resumed.resumed_from == 4 and len(seen) == 1  # the parent is not read again
  np.testing.assert_array_equal(resumed.state.params["embed"], parent_params["embed"])
  checkpointer.close()


def test_check_batch_names_the_setting():
  mesh = util.mesh_of({"data": 2, "fsdp": 2, "tensor": 2})
  with pytest.raises(Exception, match="BATCH_SIZE=6 .* not divisible by the data x fsdp mesh"):
    start.check_batch(6, 1, mesh)
  with pytest.raises(Exception, match="does not divide into LoopConfig.microbatches=4"):
    start.check_batch(6, 4, mesh)


def test_the_evaluator_sums_the_loss_over_the_eval_batches():
  mesh, rules = util.mesh_of({"data": 2, "fsdp": 4, "tensor": 1}), parallel.axis_rules()
  factory = LossStep(util.TINY, lm_loss)
  started = start.start_state(factory, None, 1, 0, mesh, rules, _NoCheckpoints(), None)
  state = started.state
  batches = [util.packed_batch(seed=s) for s in range(3)]
  ctx = StepContext(mesh, rules, started.shardings, started.optimizer, started.schedule)
  measured = []
  evaluation = Evaluation(data=lambda i, n: iter(batches), loss_fn=lm_loss,
                          metrics=perplexity_metrics,
                          measure=lambda params, extras, m, r: measured.append(m) or {"x": 1.0})
  with mesh, parallel.activate(mesh, rules):
    first = parallel.global_batch(batches[0], mesh, rules)
    out = Evaluator(evaluation, factory, ctx, batches[0], first, eval_steps=2)(state)
  model = transformer.merge(transformer.abstract_model(util.TINY)[0], state.params)
  sums = [lm_loss(model, b, None) for b in batches[:2]]  # eval_steps=2 of the 3
  expected = sum(float(s) for s, _, _ in sums) / sum(float(w) for _, w, _ in sums)
  assert out["eval_loss"] == pytest.approx(expected, rel=1e-5)
  assert out["eval_perplexity"] == pytest.approx(np.exp(expected), rel=1e-5)
  assert out["x"] == 1.0 and measured == [mesh]


class _NoCheckpoints:
  def latest_step(self):
    return None


class _Batches:
  """Endless packed batches whose position is their checkpointed state."""

  def __init__(self, process_index, process_count):
    del process_index, process_count
    self.i = 0

  def __next__(self):
    self.i += 1
    return util.packed_batch(seed=self.i)

  def get_state(self):  # bytes: the checkpointer stores a non-grain iterator's state raw
    return json.dumps(self.i).encode()

  def set_state(self, state):
    self.i = json.loads(state.decode())

  def start_prefetch(self):
    pass


def test_the_loop_runs_hooks_at_their_periods_and_at_the_end(tmp_path):
  calls = []

  def every_two(info):
    calls.append(("every_two", info.step, int(info.state.step), info.finished))
    return {"hook_value": float(info.step)}

  def at_end(info):
    calls.append(("at_end", info.step, len(info.recent), info.finished))
    return {"final_fact": 1.5}

  stage = loop.Stage(
      name="toy", step=LossStep(util.TINY, lm_loss), train_data=_Batches,
      evaluation=Evaluation(data=lambda i, n: iter([util.packed_batch(seed=99)]),
                            loss_fn=lm_loss, metrics=perplexity_metrics),
      hooks=(loop.Hook(every_two, every=2), loop.Hook(at_end, at_end=True)))
  cfg = loop.LoopConfig()
  summary = loop.train(stage, str(tmp_path), cfg)
  assert calls == [("every_two", 2, 2, False), ("every_two", 4, 4, False), ("at_end", 6, 5, True)]
  rows = [json.loads(line) for line in open(tmp_path / "toy" / "metrics.jsonl")]
  assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]  # LOG_EVERY
  assert [r["step"] for r in rows if "hook_value" in r] == [2, 4]
  assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]  # EVAL_EVERY and the end
  assert summary["final_fact"] == 1.5 and summary["steps"] == 6
  assert summary["eval_loss"] == rows[-1]["eval_loss"]
  assert json.load(open(tmp_path / "toy" / "model.json"))["d_model"] == util.TINY.d_model

  # Resumed after the schedule's end: nothing runs again.
  calls.clear()
  assert loop.train(stage, str(tmp_path), cfg)["note"] == "already complete" and not calls


def test_a_run_cut_off_in_its_end_hooks_is_not_complete_and_redoes_them(tmp_path):
  # The end-of-run work (e.g. the reward normalisation) runs before the last checkpoint is
  # saved: a crash there leaves step 6 unsaved, and the rerun redoes the last steps and the hook.
  calls = []

  def at_end(info):
    calls.append((info.step, info.finished))
    if len(calls) == 1:
      raise RuntimeError("cut off")
    return {"final_fact": 2.5}

  stage = loop.Stage(name="toy", step=LossStep(util.TINY, lm_loss), train_data=_Batches,
                     hooks=(loop.Hook(at_end, at_end=True),))
  with pytest.raises(RuntimeError, match="cut off"):
    loop.train(stage, str(tmp_path), loop.LoopConfig(checkpoint_every=4))
  assert sorted(int(p) for p in os.listdir(tmp_path / "toy" / "checkpoints")) == [4]
  summary = loop.train(stage, str(tmp_path), loop.LoopConfig(checkpoint_every=4))
  assert calls == [(6, True), (6, True)] and summary["final_fact"] == 2.5
  assert sorted(int(p) for p in os.listdir(tmp_path / "toy" / "checkpoints")) == [4, 6]


def test_zero_log_and_checkpoint_periods_mean_only_at_the_end(tmp_path):
  stage = loop.Stage(name="toy", step=LossStep(util.TINY, lm_loss), train_data=_Batches)
  summary = loop.train(stage, str(tmp_path), loop.LoopConfig(checkpoint_every=0, log_every=0))
  assert summary["steps"] == 6
  rows = [json.loads(line) for line in open(tmp_path / "toy" / "metrics.jsonl")]
  assert [r["step"] for r in rows if "loss" in r] == [6]
  assert sorted(int(p) for p in os.listdir(tmp_path / "toy" / "checkpoints")) == [6]


def test_the_start_up_block_says_small_epoch_counts_in_significant_digits():
  # A short run over a large corpus reads a sliver of one epoch: not "0.00 epochs".
  assert loop._epochs(512 / 573_340) == "0.00089"
  assert loop._epochs(0.1418) == "0.14" and loop._epochs(2.0) == "2.00" and loop._epochs(0) == "0.00"


def test_a_resume_with_other_trainable_layers_is_refused_even_when_changes_are_allowed(tmp_path):
  """TRAINABLE_LAYERS is a resume key like TRAINABLE: another one is another optimizer mask; a
  lineage from before the key existed resumes."""
  from lmtrain.errors import UserError
  stage_dir = str(tmp_path)
  keys = {"BATCH_SIZE": 8, "TRAINABLE": "all", "TRAINABLE_LAYERS": None}
  ckpt_lib.write_lineage(stage_dir, "sft", "", resume_keys={"BATCH_SIZE": 8, "TRAINABLE": "all"})
  assert loop.check_resume(stage_dir, keys, allow_change=False) == {}
  ckpt_lib.write_lineage(stage_dir, "sft", "", resume_keys=keys)
  with pytest.raises(UserError, match=r"resuming with another TRAINABLE_LAYERS null -> 2; the "
                                      r"checkpoints hold the optimizer state"):
    loop.check_resume(stage_dir, {**keys, "TRAINABLE_LAYERS": 2}, allow_change=True)
