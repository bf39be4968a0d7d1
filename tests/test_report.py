"""`lmtrain report`: plots and summary of a synthetic work dir (no training, no JAX)."""

import argparse
import json
import os

import matplotlib.image
import pytest

from lmtrain import report
from lmtrain.errors import UserError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_stage(workdir, name, rows, parent=None, checkpoints=(), normalization=None):
  stage_dir = workdir / name
  stage_dir.mkdir()
  with open(stage_dir / "metrics.jsonl", "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  with open(stage_dir / "lineage.json", "w") as f:
    json.dump({"stage": name, "config_sha256": "0" * 64, "created": "2025-01-01T00:00:00+00:00",
               "parent": None if parent is None else {
                   "stage": parent[0], "path": str(workdir / parent[0]), "step": parent[1]}}, f)
  for step in checkpoints:
    (stage_dir / "checkpoints" / str(step)).mkdir(parents=True)
  if normalization is not None:
    with open(stage_dir / "reward_normalization.json", "w") as f:
      json.dump(normalization, f)


def _train_row(step, loss, **extra):
  return {"step": step, "loss": loss, "learning_rate": 1e-3, "grad_norm": 1.0,
          "tokens_per_sec": 1000.0 + step, "mfu": 0.25, "step_time": 0.1, **extra}


@pytest.fixture
def workdir(tmp_path):
  """pretrain -> sft -> reward -> ppo, written in an order unlike the chain's (ppo first)."""
  work = tmp_path / "run"
  work.mkdir()
  _write_stage(work, "ppo", [
      _train_row(s, 0.5 - 0.01 * s, reward_mean=0.1 * s, kl=0.01 * s, kl_coef=0.1, entropy=2.0,
                 policy_loss=0.1, value_loss=0.2, clipfrac=0.05, approx_kl=0.001,
                 explained_variance=0.5, response_length=12.0, task_score=0.2 + 0.05 * s)
      for s in range(1, 6)], parent=("reward", 30), checkpoints=(5,))
  _write_stage(work, "pretrain", [
      _train_row(10, 4.0), {"step": 10, "eval_loss": 4.2, "eval_perplexity": 66.69},
      _train_row(20, 3.0), _train_row(15, 3.5),
      {"step": 20, "eval_loss": 3.25, "eval_perplexity": 25.79}],
      checkpoints=(10, 20))
  # A resumed run re-logs step 20 after its checkpoint at 10: the later row is the one that counts.
  _write_stage(work, "sft", [
      {"step": 0, "eval_loss": 3.0, "eval_exact_match": 0.0, "eval_perplexity": 20.0},
      _train_row(10, 2.5), _train_row(20, 9.9), _train_row(20, 2.0),
      {"step": 20, "eval_loss": 2.125, "eval_exact_match": 0.75, "eval_perplexity": 8.375}],
      parent=("pretrain", 20), checkpoints=(10, 20))
  # A single row, and no throughput keys: nothing may assume a series has two points.
  _write_stage(work, "reward", [{"step": 30, "loss": 0.625, "accuracy": 0.8125, "margin": 1.5}],
               parent=("sft", 20), checkpoints=(30,), normalization={"offset": 0.5, "scale": 2.0})
  (work / "pretrain" / "checkpoints" / "30.orbax-checkpoint-tmp-1").mkdir()  # unfinished save
  (work / "data").mkdir()  # not a stage: no metrics.jsonl
  return work


def _assert_png(path):
  with open(path, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE, path
  assert os.path.getsize(path) > 1000, path
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, image.shape


def test_summary_values_and_chain_order(workdir):
  summaries = report.summarize(report.load_workdir(str(workdir)))
  assert list(summaries) == ["pretrain", "sft", "reward", "ppo"]
  pretrain, sft, reward, ppo = summaries.values()
  assert (pretrain["steps"], pretrain["final_loss"], pretrain["checkpoint"]) == (20, 3.0, 20)
  assert pretrain["eval"] == {"eval_loss": 3.25, "eval_perplexity": 25.79}
  assert pretrain["parent"] is None
  assert (sft["steps"], sft["final_loss"], sft["parent"]) == (20, 2.0, "pretrain@20")
  assert sft["eval"] == {"eval_exact_match": 0.75, "eval_loss": 2.125, "eval_perplexity": 8.375}
  assert (reward["steps"], reward["final_loss"], reward["checkpoint"]) == (30, 0.625, 30)
  assert reward["final"]["accuracy"] == 0.8125 and reward["eval"] == {}
  assert reward["reward_normalization"] == {"offset": 0.5, "scale": 2.0}
  assert (ppo["steps"], ppo["parent"], ppo["checkpoint"]) == (5, "reward@30", 5)
  assert ppo["final"]["reward_mean"] == pytest.approx(0.5)


def test_report_writes_pngs_and_summary(workdir, tmp_path, capsys):
  out = tmp_path / "out"
  report.run(argparse.Namespace(workdir=str(workdir), output=str(out)))
  figures = ["loss.png", "sft.png", "reward.png", "ppo.png", "throughput.png"]
  assert sorted(os.listdir(out)) == sorted(figures + ["summary.md"])
  for name in figures:
    _assert_png(out / name)
  summary = (out / "summary.md").read_text()
  rows = [line for line in summary.splitlines() if line.startswith("| ") and "---" not in line]
  assert [row.split("|")[1].strip() for row in rows[1:]] == ["pretrain", "sft", "reward", "ppo"]
  assert rows[2] == ("| sft | 20 | 2 | eval_exact_match=0.75, eval_loss=2.125, "
                     "eval_perplexity=8.375 | 20 | pretrain@20 |")
  assert rows[3] == "| reward | 30 | 0.625 | - | 30 | sft@20 |"
  assert "Reward normalization of reward: offset=0.5, scale=2" in summary
  for name in figures:
    assert f"]({name})" in summary
  printed = capsys.readouterr().out
  assert rows[2] in printed and "summary.md" in printed


def test_default_output_and_absent_figures(tmp_path):
  work = tmp_path / "run"
  work.mkdir()
  _write_stage(work, "pretrain", [{"step": 1, "loss": 5.0}])
  summaries, out_dir = report.write_report(str(work))
  assert out_dir == os.path.join(str(work), "report")
  # No stage figure for pretrain, no throughput keys, no checkpoints: the rest is skipped.
  assert sorted(os.listdir(out_dir)) == ["loss.png", "summary.md"]
  _assert_png(os.path.join(out_dir, "loss.png"))
  assert summaries["pretrain"]["checkpoint"] is None
  assert "| pretrain | 1 | 5 | - | - | - |" in open(os.path.join(out_dir, "summary.md")).read()


def test_dpo_figure_without_mfu(tmp_path):
  work = tmp_path / "run"
  work.mkdir()
  # MFU is NaN on a device with no known peak; the parent checkpoint lives in another work dir.
  _write_stage(work, "dpo", [
      _train_row(s, 0.7 - 0.1 * s, mfu=float("nan"), reward_accuracy=0.5 + 0.1 * s, margin=0.1 * s,
                 chosen_reward=0.05 * s, rejected_reward=-0.05 * s) for s in (1, 2)]
      + [{"step": 2, "eval_loss": 0.6, "eval_reward_accuracy": 0.625, "eval_margin": 0.25}],
      parent=("sft", 200))
  summaries, out_dir = report.write_report(str(work))
  assert sorted(os.listdir(out_dir)) == ["dpo.png", "loss.png", "summary.md", "throughput.png"]
  for name in ("dpo.png", "throughput.png"):
    _assert_png(os.path.join(out_dir, name))
  assert summaries["dpo"]["parent"] == "sft@200"
  assert summaries["dpo"]["eval"]["eval_reward_accuracy"] == 0.625


def test_malformed_line_names_file_and_line(workdir):
  path = workdir / "sft" / "metrics.jsonl"
  with open(path, "a") as f:
    f.write('{"step": 30, "loss": \n')
  with pytest.raises(UserError) as e:
    report.load_workdir(str(workdir))
  message = str(e.value)
  assert message.startswith(f"{path}:6: not valid JSON") and "\n" not in message


def test_missing_dir_and_no_stages(tmp_path):
  with pytest.raises(UserError, match="no such work dir"):
    report.load_workdir(str(tmp_path / "absent"))
  (tmp_path / "empty" / "pretrain").mkdir(parents=True)
  with pytest.raises(UserError, match="no stages found"):
    report.load_workdir(str(tmp_path / "empty"))


def test_per_task_panel_takes_every_logged_task():
  rows = [{"step": 0, "eval_task_score": 0.5, "eval_task_score_count": 0.25,
           "eval_task_score_last": 1.0},
          {"step": 1, "task_score": 0.5},
          {"step": 30, "eval_task_score": 0.75, "eval_task_score_count": 0.5,
           "eval_task_score_last": 1.0, "eval_task_score_sort": 0.0}]
  lines = report._lines(rows, ("eval_task_score_*",))
  assert [(line.label, line.steps, line.values, line.points) for line in lines] == [
      ("eval_task_score_count", [0, 30], [0.25, 0.5], True),
      ("eval_task_score_last", [0, 30], [1.0, 1.0], True),
      ("eval_task_score_sort", [30], [0.0], True)]
  assert report._lines([{"step": 1, "task_score": 0.5}], ("eval_task_score_*",)) == []
