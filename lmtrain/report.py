"""`lmtrain report DIR`: PNG plots and a markdown summary of the stages in a work dir.

Reads DIR/<stage>/metrics.jsonl, lineage.json and checkpoints/ of every stage directory, and writes
loss.png, one figure of each stage's own metrics (sft.png, reward.png, ppo.png, dpo.png),
throughput.png and summary.md to OUT (default DIR/report). DIR and OUT may be buckets (gs://...).
Nothing here touches JAX.
"""

import io
import json
import math
import os
from typing import NamedTuple

from lmtrain import fileio
from lmtrain.errors import UserError
from lmtrain.stages import REGISTRY, STAGES
from lmtrain.train import roles

class _Line(NamedTuple):
  label: str
  steps: list
  values: list
  points: bool  # markers only (eval rows are sparse)
  right: bool  # on the panel's right-hand axis


def add_arguments(p):
  p.add_argument("workdir", metavar="DIR", help="a work dir holding DIR/<stage>/metrics.jsonl")
  p.add_argument("--output", metavar="OUT", help="where to write the PNGs and summary.md "
                 "(default: DIR/report)")


def run(args) -> dict:
  """The `report` subcommand: writes the report and prints the summary table."""
  summaries, out_dir = write_report(args.workdir, args.output)
  print(markdown_table(summaries))
  print(f"\nwrote {os.path.join(out_dir, 'summary.md')}")
  return summaries


def write_report(workdir: str, output: str | None = None) -> tuple[dict, str]:
  """Writes the PNGs and summary.md; returns (stage -> summary, output directory)."""
  stages = load_workdir(workdir)
  summaries = summarize(stages)
  out_dir = output or os.path.join(workdir, "report")
  fileio.makedirs(out_dir)
  figures = write_figures(stages, out_dir)
  fileio.write_text(os.path.join(out_dir, "summary.md"),
                    summary_markdown(workdir, summaries, figures))
  return summaries, out_dir


def load_metrics(path: str) -> list[dict]:
  """The rows of a metrics.jsonl; a bad line is a UserError naming FILE:LINE."""
  rows = []
  for number, line in enumerate(fileio.read_text(path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f"{path}:{number}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
      raise UserError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
    rows.append(row)
  return rows


def _read_json(path: str):
  """A small JSON file's content, or None when it does not exist."""
  if not fileio.exists(path):
    return None
  try:
    return json.loads(fileio.read_text(path))
  except json.JSONDecodeError as e:
    raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def _checkpoint_steps(stage_dir: str) -> list[int]:
  ckpt_dir = os.path.join(stage_dir, "checkpoints")
  if not fileio.isdir(ckpt_dir):
    return []
  # Orbax names finished saves by step; in-progress ones carry a tmp suffix and are skipped.
  return sorted(int(name) for name in fileio.listdir(ckpt_dir)
                if name.isdigit() and fileio.isdir(os.path.join(ckpt_dir, name)))


def load_workdir(workdir: str) -> dict[str, dict]:
  """Every stage directory of `workdir` (one with a metrics.jsonl), in chain order, as
  name -> {kind, rows, lineage, checkpoints, normalization}."""
  if not fileio.isdir(workdir):
    raise UserError(f"{workdir}: no such work dir")
  stages = {}
  for name in sorted(fileio.listdir(workdir)):
    stage_dir = os.path.join(workdir, name)
    metrics_path = os.path.join(stage_dir, "metrics.jsonl")
    if not fileio.isfile(metrics_path):
      continue
    lineage = _read_json(os.path.join(stage_dir, "lineage.json"))
    if lineage is not None and not isinstance(lineage, dict):
      raise UserError(f"{os.path.join(stage_dir, 'lineage.json')}: expected a JSON object")
    stages[name] = {
        "kind": (lineage or {}).get("stage") or name,
        "rows": load_metrics(metrics_path),
        "lineage": lineage,
        "checkpoints": _checkpoint_steps(stage_dir),
        "normalization": _read_json(os.path.join(stage_dir, roles.NORMALIZATION_FILE)),
    }
  if not stages:
    raise UserError(f"{workdir}: no stages found (expected DIR/<stage>/metrics.jsonl)")
  return {name: stages[name] for name in chain_order(
      {name: s["kind"] for name, s in stages.items()},
      {name: s["lineage"] for name, s in stages.items()})}


def _parent_name(lineage, names) -> str | None:
  """The stage directory among `names` that a lineage's parent points at, if any."""
  parent = (lineage or {}).get("parent")
  if not isinstance(parent, dict):
    return None
  # The path names the exact directory; the stage name covers a work dir that has been moved.
  path = str(parent.get("path") or "").rstrip("/")
  for candidate in (os.path.basename(path), parent.get("stage")):
    if candidate in names:
      return candidate
  return None


def chain_order(kinds: dict[str, str], lineages: dict[str, dict | None]) -> list[str]:
  """Stage names ordered parents first (depth-first from each root), siblings in chain order."""
  def rank(name):
    kind = kinds[name]
    return (STAGES.index(kind) if kind in STAGES else len(STAGES), name)

  parents = {name: _parent_name(lineages[name], kinds) for name in kinds}
  order, seen = [], set()

  def visit(name):
    if name in seen:
      return
    seen.add(name)
    order.append(name)
    for child in sorted((c for c, p in parents.items() if p == name and c != name), key=rank):
      visit(child)

  for root in sorted((n for n, p in parents.items() if p is None or p == n), key=rank):
    visit(root)
  for name in sorted(kinds, key=rank):  # stages on a lineage cycle, which no root reaches
    visit(name)
  return order


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _series(rows: list[dict], key: str) -> tuple[list, list]:
  """(steps, values) of `key`, sorted by step. A resumed run appends rows for the steps it re-runs
  after its last checkpoint, so the last row logged for a step wins."""
  by_step = {}
  for row in rows:
    if _is_number(row.get("step")) and _is_number(row.get(key)):
      by_step[row["step"]] = row[key]
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def summarize_stage(stage: dict) -> dict:
  """Steps done, final train metrics, last eval metrics, latest checkpoint and parent of a stage."""
  rows = stage["rows"]
  train = [r for r in rows if "loss" in r]
  final, evals = {}, {}
  for key in sorted({k for r in rows for k in r if k != "step"}):
    steps, values = _series(train if not key.startswith("eval_") else rows, key)
    if steps:
      (evals if key.startswith("eval_") else final)[key] = values[-1]
  train_steps = [r["step"] for r in train if _is_number(r.get("step"))]
  parent = (stage["lineage"] or {}).get("parent")
  summary = {
      "kind": stage["kind"],
      "steps": max(train_steps) if train_steps else None,
      "final_loss": final.get("loss"),
      "final": final,
      "eval": evals,
      "checkpoint": stage["checkpoints"][-1] if stage["checkpoints"] else None,
      "parent": (f"{parent.get('stage')}@{parent.get('step')}" if isinstance(parent, dict)
                 else None),
  }
  if stage["normalization"] is not None:
    summary["reward_normalization"] = stage["normalization"]
  return summary


def summarize(stages: dict[str, dict]) -> dict[str, dict]:
  """Stage name -> summary, in the order of `stages` (see load_workdir)."""
  return {name: summarize_stage(stage) for name, stage in stages.items()}


def _fmt(v) -> str:
  if v is None:
    return "-"
  return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown_table(summaries: dict[str, dict]) -> str:
  lines = ["| stage | steps | final loss | last eval | checkpoint | parent |",
           "|---|---|---|---|---|---|"]
  for name, s in summaries.items():
    evals = ", ".join(f"{k}={_fmt(v)}" for k, v in s["eval"].items()) or "-"
    lines.append(f"| {name} | {_fmt(s['steps'])} | {_fmt(s['final_loss'])} | {evals} | "
                 f"{_fmt(s['checkpoint'])} | {_fmt(s['parent'])} |")
  return "\n".join(lines)


def summary_markdown(workdir: str, summaries: dict[str, dict], figures: list[str]) -> str:
  parts = [f"# lmtrain report: {workdir}", "", markdown_table(summaries), ""]
  for name, s in summaries.items():
    norm = s.get("reward_normalization")
    if isinstance(norm, dict):
      parts.append(f"Reward normalization of {name}: offset={_fmt(norm.get('offset'))}, "
                   f"scale={_fmt(norm.get('scale'))}")
      parts.append("")
  for figure in figures:
    parts += [f"## {figure[:-len('.png')]}", "", f"![{figure}]({figure})", ""]
  return "\n".join(parts)


def _expand(rows: list[dict], keys) -> list[str]:
  out = []
  for key in keys:
    if key.endswith("*"):
      out += sorted({k for row in rows for k in row if k.startswith(key[:-1])})
    else:
      out.append(key)
  return out


def _lines(rows: list[dict], left, right=()) -> list[_Line]:
  lines = []
  for keys, on_right in ((left, False), (right, True)):
    for key in _expand(rows, keys):
      steps, values = _series(rows, key)
      kept = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
      if kept:
        lines.append(_Line(key, [s for s, _ in kept], [v for _, v in kept],
                           key.startswith("eval_"), on_right))
  if not any(not line.right for line in lines):  # a right axis alone needs no second scale
    lines = [line._replace(right=False) for line in lines]
  return lines


def _save_figure(path: str, panels: list[tuple[str, list[_Line]]]):
  """One PNG holding a grid of panels, each a (title, lines) pair plotted against step."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  cols = min(len(panels), 3)
  nrows = math.ceil(len(panels) / cols)
  # The object API with an Agg canvas: no pyplot, so no global backend state and no display needed.
  fig = Figure(figsize=(4.8 * cols, 3.4 * nrows), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, cols, squeeze=False).ravel()
  for ax, (title, lines) in zip(axes, panels):
    twin = ax.twinx() if any(line.right for line in lines) else None
    handles = []
    for i, line in enumerate(lines):
      target = twin if line.right else ax
      if len(line.steps) == 1:  # a lone point would be invisible as a line
        handles.append(target.scatter(line.steps, line.values, s=18, color=f"C{i}",
                                      label=line.label, zorder=3))
      elif line.points:  # sparse eval rows: markers, joined by a faint dashed line
        handles += target.plot(line.steps, line.values, color=f"C{i}", marker="o", markersize=4,
                               linestyle="--", linewidth=0.8, label=line.label, zorder=3)
      else:
        handles += target.plot(line.steps, line.values, color=f"C{i}", linewidth=1.2,
                               label=line.label)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize="small")
  for ax in axes[len(panels):]:
    ax.set_visible(False)
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=100)
  fileio.write_bytes(path, png.getvalue())


def write_figures(stages: dict[str, dict], out_dir: str) -> list[str]:
  """Writes the figures whose data is present; returns their file names, in report order."""
  figures = []

  def save(filename, panels):
    panels = [(title, lines) for title, lines in panels if lines]
    if panels:
      _save_figure(os.path.join(out_dir, filename), panels)
      figures.append(filename)

  save("loss.png", [(name, _lines(s["rows"], ("loss", "eval_loss"))) for name, s in stages.items()])
  for name, stage in stages.items():
    spec = REGISTRY.get(stage["kind"])
    save(f"{name}.png", [(title, _lines(stage["rows"], left, right))
                         for title, left, right in (spec.panels if spec else ())])
  # Per stage, since each stage counts its own steps; MFU is NaN (so absent) on an unknown device.
  save("throughput.png", [(name, _lines(s["rows"], ("tokens_per_sec",), ("mfu",)))
                          for name, s in stages.items()])
  return figures
