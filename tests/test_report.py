"""`lmtrain report`: plots and summary of a synthetic work dir (no training, no JAX)."""

import argparse
import json
import os

import matplotlib.image
import pytest
from matplotlib.ticker import MaxNLocator

from lmtrain import cli, report
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


def _tables(text):
  """The markdown tables of `text`, each a list of rows (lists of cells), header first."""
  tables, current = [], None
  for line in text.splitlines():
    if line.startswith("|"):
      if current is None:
        current = []
        tables.append(current)
      if not line.startswith("|---"):
        current.append([cell.strip() for cell in line.strip("|").split("|")])
    else:
      current = None
  return tables


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
  stages, *evals = _tables(summary)
  assert stages[0] == ["stage", "steps", "final loss", "checkpoint", "parent"]
  assert [row[0] for row in stages[1:]] == ["pretrain", "sft", "reward", "ppo"]
  assert stages[2] == ["sft", "20", "2", "20", "pretrain@20"]
  assert stages[3] == ["reward", "30", "0.625", "30", "sft@20"]
  # One eval table per stage that logged eval rows (reward and ppo did not), one row per metric.
  assert "### pretrain: eval metrics" in summary and "### sft: eval metrics" in summary
  assert evals[1] == [["metric", "step 0", "step 20"],
                      ["eval_exact_match", "0", "0.75"],
                      ["eval_loss", "3", "2.125"],
                      ["eval_perplexity", "20", "8.375"]]
  assert "Reward normalization of reward: offset=0.5, scale=2" in summary
  for name in figures:
    assert f"]({name})" in summary
  printed = capsys.readouterr().out
  assert "| sft | 20 | 2 | 20 | pretrain@20 |" in printed and "summary.md" in printed
  assert "| eval_exact_match | 0 | 0.75 |" in printed


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
  summary = open(os.path.join(out_dir, "summary.md")).read()
  assert "| pretrain | 1 | 5 | - | - |" in summary and "eval metrics" not in summary


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
  assert [tuple(line) for line in lines] == [
      ("eval_task_score_count", [0, 30], [0.25, 0.5], True),
      ("eval_task_score_last", [0, 30], [1.0, 1.0], True),
      ("eval_task_score_sort", [30], [0.0], True)]
  assert report._lines([{"step": 1, "task_score": 0.5}], ("eval_task_score_*",)) == []


def _ppo_rows(evals_at=(0, 2, 4)):
  """A PPO stage whose per-task held-out scores coincide (count = last) and whose eval rows hold
  eight metrics, as the demo's do."""
  rows = [_train_row(s, 0.5, reward_mean=0.1 * s, kl=0.01 * s, kl_coef=0.1, entropy=2.0,
                     policy_loss=0.1, value_loss=0.2, clipfrac=0.05, approx_kl=0.001,
                     explained_variance=0.5, response_length=12.0, task_score=0.2)
          for s in range(1, 5)]
  for s in evals_at:
    rows.append({"step": s, "eval_task_score": 0.25 + 0.0625 * s, "eval_reward_mean": -0.5 + s,
                 "eval_response_length": 10.0, "eval_eos_fraction": 1.0,
                 "eval_task_score_count": 0.5, "eval_task_score_last": 0.5,
                 "eval_task_score_reverse": 0.125 * s, "eval_task_score_sort": 0.25})
  return rows


def _figures(workdir):
  return report.build_figures(report.load_workdir(str(workdir)))


def test_every_axes_labelled_with_integer_steps_and_no_twin(workdir):
  figures = _figures(workdir)
  assert list(figures) == ["loss.png", "sft.png", "reward.png", "ppo.png", "throughput.png"]
  for name, fig in figures.items():
    assert fig.axes, name
    fig.canvas.draw()
    for ax in fig.axes:
      where = f"{name}: {ax.get_title()}"
      assert ax.get_xlabel() == "step", where
      assert ax.get_ylabel(), where
      locator = ax.xaxis.get_major_locator()
      assert isinstance(locator, MaxNLocator) and locator._integer, where
      assert all(float(t).is_integer() for t in ax.get_xticks()), (where, ax.get_xticks())
      # No twin axis: an axes sharing this one's x (twinx) would be a second, unlabelled y scale.
      assert ax.get_shared_x_axes().get_siblings(ax) == [ax], where
      assert ax.get_legend() is not None, where
  ylabels = {name: [ax.get_ylabel() for ax in fig.axes] for name, fig in figures.items()}
  assert ylabels["loss.png"] == ["loss (nats)", "loss (nats)", "loss (nats)", "loss"]
  assert ylabels["sft.png"] == ["exact match (fraction)", "perplexity"]
  # A right-axis key of a stage's panel spec (kl_coef, value_loss) is a panel of its own.
  assert [(ax.get_title(), ax.get_ylabel()) for ax in figures["ppo.png"].axes] == [
      ("reward", "reward mean"), ("kl", "KL (nats)"), ("kl: KL coef", "KL coef"),
      ("task score", "task score (fraction)"), ("entropy", "entropy (nats)"),
      ("clip fraction", "clipfrac (fraction)"), ("approx kl", "approx KL (nats)"),
      ("losses", "policy loss"), ("losses: value loss", "value loss"),
      ("explained variance", "explained variance"), ("response length", "response length (tokens)")]


def test_tokens_per_sec_and_mfu_on_separate_panels(workdir):
  throughput = _figures(workdir)["throughput.png"]
  # reward logged no throughput keys; each other stage gets a tokens/s panel and an MFU panel.
  assert [(ax.get_title(), ax.get_ylabel()) for ax in throughput.axes] == [
      (f"{stage}: {name}", label) for stage in ("pretrain", "sft", "ppo")
      for name, label in (("throughput", "throughput (tokens/s)"),
                          ("MFU", "MFU (fraction of peak)"))]
  for ax in throughput.axes:
    (line,) = ax.get_lines()
    assert line.get_label() in ("tokens_per_sec", "mfu")
  pretrain_tps = throughput.axes[0].get_lines()[0]
  assert list(pretrain_tps.get_xdata()) == [10, 15, 20]
  assert list(pretrain_tps.get_ydata()) == [1010.0, 1015.0, 1020.0]


def test_coinciding_series_in_a_panel_are_distinguishable(tmp_path):
  work = tmp_path / "run"
  work.mkdir()
  _write_stage(work, "ppo", _ppo_rows())
  fig = _figures(work)["ppo.png"]
  (ax,) = [ax for ax in fig.axes if ax.get_title() == "held-out task score per task"]
  assert ax.get_ylabel() == "task score (fraction)"
  lines = ax.get_lines()
  assert [line.get_label() for line in lines] == [
      "eval_task_score_count", "eval_task_score_last", "eval_task_score_reverse",
      "eval_task_score_sort"]
  assert list(lines[0].get_ydata()) == list(lines[1].get_ydata())  # the two that coincide
  for attr in ("get_color", "get_linestyle", "get_marker"):
    values = [getattr(line, attr)() for line in lines]
    assert len(set(values)) == len(values), (attr, values)
  assert [t.get_text() for t in ax.get_legend().get_texts()] == [l.get_label() for l in lines]
  # Every panel with several series, train and eval alike, tells them apart by style too.
  for ax in fig.axes:
    styles = [(line.get_linestyle(), line.get_marker()) for line in ax.get_lines()]
    assert len(set(styles)) == len(styles), (ax.get_title(), styles)


def test_eval_table_has_one_row_per_metric(tmp_path):
  work = tmp_path / "run"
  work.mkdir()
  _write_stage(work, "ppo", _ppo_rows())
  summaries, out_dir = report.write_report(str(work), str(tmp_path / "out"))
  (evals,) = _tables(open(os.path.join(out_dir, "summary.md")).read())[1:]
  assert evals[0] == ["metric", "step 0", "step 2", "step 4"]
  assert {row[0]: row[1:] for row in evals[1:]} == {
      "eval_eos_fraction": ["1", "1", "1"],
      "eval_response_length": ["10", "10", "10"],
      "eval_reward_mean": ["-0.5", "1.5", "3.5"],
      "eval_task_score": ["0.25", "0.375", "0.5"],
      "eval_task_score_count": ["0.5", "0.5", "0.5"],
      "eval_task_score_last": ["0.5", "0.5", "0.5"],
      "eval_task_score_reverse": ["0", "0.25", "0.5"],
      "eval_task_score_sort": ["0.25", "0.25", "0.25"]}
  assert len(evals) == 1 + 8
  assert summaries["ppo"]["eval"]["eval_task_score"] == 0.5


def test_eval_table_of_many_eval_steps_spreads_its_columns(tmp_path):
  work = tmp_path / "run"
  work.mkdir()
  _write_stage(work, "ppo", _ppo_rows(evals_at=range(0, 41, 4)))  # 11 eval steps
  summaries = report.summarize(report.load_workdir(str(work)))
  table = report.eval_table("ppo", summaries["ppo"])
  assert table.splitlines()[0] == ("### ppo: eval metrics "
                                   "(6 of 11 eval steps shown, the last one included)")
  (rows,) = _tables(table)
  assert rows[0] == ["metric"] + [f"step {s}" for s in (0, 8, 16, 24, 32, 40)]
  assert rows[1 + 2] == ["eval_reward_mean", "-0.5", "7.5", "15.5", "23.5", "31.5", "39.5"]
  assert report._shown_steps([1, 2, 3]) == [1, 2, 3]


def _tree(path):
  """Every file and directory under `path` with its size and modification time."""
  out = {}
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      full = os.path.join(root, name)
      st = os.stat(full)
      out[os.path.relpath(full, path)] = (st.st_size, st.st_mtime_ns)
  return out


def test_output_elsewhere_reports_a_read_only_workdir(workdir, tmp_path, capsys):
  out = tmp_path / "elsewhere" / "report"
  before = _tree(workdir)
  modes = {p: os.stat(p).st_mode for p in [str(workdir)] + [
      os.path.join(r, d) for r, ds, _ in os.walk(workdir) for d in ds]}
  for path, mode in modes.items():
    os.chmod(path, mode & ~0o222)  # read-only (root may still write: hence the tree comparison)
  try:
    cli.main(["report", str(workdir), "--output", str(out)])
  finally:
    for path, mode in modes.items():
      os.chmod(path, mode)
  assert _tree(workdir) == before  # nothing written, created or touched in the work dir
  assert sorted(os.listdir(out)) == sorted(["loss.png", "sft.png", "reward.png", "ppo.png",
                                            "throughput.png", "summary.md"])
  _assert_png(out / "ppo.png")
  assert f"wrote {out / 'summary.md'}" in capsys.readouterr().out


def test_unwritable_output_is_a_one_line_error(workdir, tmp_path, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  for out, reason in ((blocker, "it is a file, not a directory"),
                      (blocker / "report", "Not a directory")):
    with pytest.raises(UserError) as e:
      report.write_report(str(workdir), str(out))
    assert str(e.value).startswith(f"{out}: cannot ") and reason in str(e.value), str(e.value)
    assert "\n" not in str(e.value) and "--output" not in str(e.value)
    with pytest.raises(SystemExit) as exit_:
      cli.main(["report", str(workdir), "--output", str(out)])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"lmtrain: error: {out}: cannot ") and err.count("\n") == 1, err
  assert blocker.read_text() == "not a directory"
  assert not (workdir / "report").exists()
  # Without --output the report goes into the work dir; when that fails the error says --output.
  (workdir / "report").write_text("in the way")
  with pytest.raises(UserError, match=r"report: cannot .*pass --output OUT"):
    report.write_report(str(workdir))
