"""`lmtrain report DIR`: PNG plots and a markdown summary of the stages in a work dir.

Reads DIR/<stage>/metrics.jsonl, lineage.json and checkpoints/ of every stage directory, and writes
loss.png, one figure of each stage's own metrics (sft.png, reward.png, ppo.png, dpo.png),
throughput.png and summary.md to OUT (default DIR/report). DIR and OUT may be buckets (gs://...);
with --output nothing is written into DIR, so a read-only work dir can be reported.
Nothing here touches JAX.

Every panel plots one metric family against an integer step axis labelled "step", with the
metric's name and unit on its y axis (no twin axes: a metric on its own scale gets its own panel),
each series in its own colour, line style and marker, and a legend. summary.md holds one table row
per stage and, per stage, an eval table with one row per eval metric.
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

MAX_EVAL_COLUMNS = 6  # eval steps shown in a stage's eval table (spread over the run)


class _Line(NamedTuple):
  label: str
  steps: list
  values: list
  points: bool  # an eval series: sparse, a marker at every point


class _Panel(NamedTuple):
  title: str
  ylabel: str
  lines: list  # of _Line


def add_arguments(p):
  p.add_argument("workdir", metavar="DIR", help="a work dir holding DIR/<stage>/metrics.jsonl")
  p.add_argument("--output", metavar="OUT", help="where to write the PNGs and summary.md "
                 "(default: DIR/report); nothing is then written into DIR, so a read-only work "
                 "dir or bucket can be reported")


def run(args) -> dict:
  """The `report` subcommand: writes the report and prints the stage and eval tables."""
  summaries, out_dir = write_report(args.workdir, args.output)
  print(markdown_table(summaries))
  tables = eval_tables(summaries)
  if tables:
    print("\n" + tables)
  print(f"\nwrote {os.path.join(out_dir, 'summary.md')}")
  return summaries


def write_report(workdir: str, output: str | None = None) -> tuple[dict, str]:
  """Writes the PNGs and summary.md; returns (stage -> summary, output directory)."""
  stages = load_workdir(workdir)
  summaries = summarize(stages)
  explicit = bool(output)
  out_dir = output or os.path.join(workdir, "report")
  _make_output_dir(out_dir, explicit)
  figures = write_figures(stages, out_dir, explicit)
  _write(os.path.join(out_dir, "summary.md"),
         summary_markdown(workdir, summaries, figures).encode(), explicit)
  return summaries, out_dir


def _cannot(path: str, what: str, reason: str, explicit: bool) -> UserError:
  hint = "" if explicit else "; pass --output OUT to write the report elsewhere"
  return UserError(f"{path}: cannot {what} ({reason}){hint}")


def _make_output_dir(out_dir: str, explicit: bool):
  """Creates the report's directory, or says in one line why it cannot be written."""
  if fileio.is_remote(out_dir):
    return  # a bucket has no directories; a failed write is a StorageError naming the object
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise _cannot(out_dir, "write the report there", "it is a file, not a directory", explicit)
  try:
    fileio.makedirs(out_dir)
  except OSError as e:
    raise _cannot(out_dir, "create the report directory", e.strerror or str(e), explicit) from None
  if not os.access(out_dir, os.W_OK | os.X_OK):
    raise _cannot(out_dir, "write the report there", "permission denied", explicit)


def _write(path: str, data: bytes, explicit: bool = True):
  try:
    fileio.write_bytes(path, data)
  except OSError as e:
    raise _cannot(path, "write the report", e.strerror or str(e), explicit) from None


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
  history = {}  # eval metric -> {step: value}
  for key in evals:
    steps, values = _series(rows, key)
    history[key] = dict(zip(steps, values))
  train_steps = [r["step"] for r in train if _is_number(r.get("step"))]
  parent = (stage["lineage"] or {}).get("parent")
  summary = {
      "kind": stage["kind"],
      "steps": max(train_steps) if train_steps else None,
      "final_loss": final.get("loss"),
      "final": final,
      "eval": evals,
      "eval_history": history,
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
  """One row per stage; the eval metrics are in eval_tables, one row per metric."""
  lines = ["| stage | steps | final loss | checkpoint | parent |", "|---|---|---|---|---|"]
  for name, s in summaries.items():
    lines.append(f"| {name} | {_fmt(s['steps'])} | {_fmt(s['final_loss'])} | "
                 f"{_fmt(s['checkpoint'])} | {_fmt(s['parent'])} |")
  return "\n".join(lines)


def _shown_steps(steps: list, limit: int = MAX_EVAL_COLUMNS) -> list:
  """All of `steps` when they fit in `limit` columns, else `limit` of them evenly spread over the
  run, the first and the last included."""
  if len(steps) <= limit:
    return list(steps)
  return [steps[round(i * (len(steps) - 1) / (limit - 1))] for i in range(limit)]


def eval_table(name: str, summary: dict) -> str | None:
  """A stage's eval metrics, one row per metric and one column per eval step; None without any."""
  history = summary.get("eval_history") or {}
  if not history:
    return None
  steps = sorted({step for values in history.values() for step in values})
  shown = _shown_steps(steps)
  title = f"### {name}: eval metrics"
  if len(shown) < len(steps):
    title += f" ({len(shown)} of {len(steps)} eval steps shown, the last one included)"
  lines = [title, "", "| metric | " + " | ".join(f"step {s}" for s in shown) + " |",
           "|---|" + "---|" * len(shown)]
  for metric, values in history.items():
    lines.append(f"| {metric} | " + " | ".join(_fmt(values.get(s)) for s in shown) + " |")
  return "\n".join(lines)


def eval_tables(summaries: dict[str, dict]) -> str:
  return "\n\n".join(t for t in (eval_table(n, s) for n, s in summaries.items()) if t)


def summary_markdown(workdir: str, summaries: dict[str, dict], figures: list[str]) -> str:
  parts = [f"# lmtrain report: {workdir}", "", markdown_table(summaries), ""]
  for name, s in summaries.items():
    norm = s.get("reward_normalization")
    if isinstance(norm, dict):
      parts.append(f"Reward normalization of {name}: offset={_fmt(norm.get('offset'))}, "
                   f"scale={_fmt(norm.get('scale'))}")
      parts.append("")
  tables = eval_tables(summaries)
  if tables:
    parts += [tables, ""]
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


def _lines(rows: list[dict], keys) -> list[_Line]:
  """The finite points of each of `keys` (a trailing "*" expanded) that has any."""
  lines = []
  for key in _expand(rows, keys):
    steps, values = _series(rows, key)
    kept = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    if kept:
      lines.append(_Line(key, [s for s, _ in kept], [v for _, v in kept], key.startswith("eval_")))
  return lines


# Units of the logged metrics, by name less any eval_ prefix; a per-task key (task_score_count)
# takes its family's unit. Ratios and scores with no unit of their own are left without one.
_UNITS = {
    "loss": "nats", "kl": "nats", "approx_kl": "nats", "entropy": "nats",
    "exact_match": "fraction", "accuracy": "fraction", "reward_accuracy": "fraction",
    "task_score": "fraction", "clipfrac": "fraction", "value_clipfrac": "fraction",
    "eos_fraction": "fraction", "mfu": "fraction of peak",
    "response_length": "tokens", "tokens_per_sec": "tokens/s", "step_time": "s",
    "kl_coef": "",  # a coefficient, not a KL (and no member of the kl family)
}
_NAMES = {"tokens_per_sec": "throughput", "mfu": "MFU", "kl": "KL", "approx_kl": "approx KL",
          "kl_coef": "KL coef"}
_RL_KINDS = ("ppo", "grpo")  # whose "loss" is a sum of policy terms, not a log-likelihood


def _base(key: str) -> str:
  key = key.removeprefix("eval_")
  return key[:-1].rstrip("_") if key.endswith("*") else key


def _unit(base: str, kind: str | None = None) -> str:
  if base == "loss" and kind in _RL_KINDS:
    return ""
  if base in _UNITS:
    return _UNITS[base]
  family = max((k for k in _UNITS if base.startswith(k + "_")), key=len, default=None)
  return _UNITS[family] if family else ""


def _name_and_unit(title: str, keys, kind: str | None = None) -> tuple[str, str]:
  bases = sorted({_base(k) for k in keys})
  name = _NAMES.get(bases[0], bases[0].replace("_", " ")) if len(bases) == 1 else title
  units = {_unit(b, kind) for b in bases}
  return name, units.pop() if len(units) == 1 else ""


def ylabel(title: str, keys, kind: str | None = None) -> str:
  """The y label of a panel of `keys`: the metric's name (the panel's title when its keys are
  different metrics) and, where it has one, its unit."""
  name, unit = _name_and_unit(title, keys, kind)
  return f"{name} ({unit})" if unit else name


def _stage_panels(title: str, rows: list[dict], left, right=(), kind=None) -> list[_Panel]:
  """A spec panel as drawn: its left keys on one panel, each right-axis key (a metric on its own
  scale) on a panel of its own, so that no axis is shared between two scales."""
  panels = [_Panel(title, ylabel(title, left, kind), _lines(rows, left))] if left else []
  for key in right:
    name, _ = _name_and_unit(key, (key,), kind)
    panels.append(_Panel(f"{title}: {name}", ylabel(key, (key,), kind), _lines(rows, (key,))))
  return panels


_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
# Each size fits inside the one before, and each line is narrower than the one it is drawn over:
# series with the same values show as nested markers on a striped line.
_MARKER_SIZES = (10.0, 6.5, 4.5, 3.0)
_LINE_WIDTHS = (2.6, 1.9, 1.3, 0.9)


def series_style(i: int, points: int, sparse: bool) -> dict:
  """Plot keywords of the i-th series of a panel: its own colour, line style and hollow marker
  (shrinking with i, so markers of series that coincide nest rather than cover each other)."""
  style = {"color": f"C{i % 10}", "linestyle": _LINESTYLES[i % len(_LINESTYLES)],
           "marker": _MARKERS[i % len(_MARKERS)], "markerfacecolor": "none",
           "markersize": _MARKER_SIZES[i % 4], "markeredgewidth": 1.2,
           "linewidth": _LINE_WIDTHS[i % 4]}
  if points == 1:
    style["linestyle"] = "none"  # a lone point: the marker alone
  elif not sparse:
    style["markevery"] = max(1, points // 8)  # a dense training curve: a few markers along it
  return style


def make_figure(panels: list[_Panel], cols: int = 3):
  """A matplotlib Figure holding a grid of panels, each against an integer step axis."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.ticker import MaxNLocator
  cols = min(len(panels), cols)
  nrows = math.ceil(len(panels) / cols)
  # The object API with an Agg canvas: no pyplot, so no global backend state and no display needed.
  fig = Figure(figsize=(4.8 * cols, 3.4 * nrows), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, cols, squeeze=False).ravel()
  for ax, panel in zip(axes, panels):
    for i, line in enumerate(panel.lines):
      ax.plot(line.steps, line.values, label=line.label, zorder=2 + i,
              **series_style(i, len(line.steps), line.points))
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
  for ax in axes[len(panels):]:
    fig.delaxes(ax)  # an empty grid cell: no axes, rather than an unlabelled hidden one
  return fig


def build_figures(stages: dict[str, dict]) -> dict[str, object]:
  """File name -> Figure of every figure whose data is present, in report order."""
  figures = {}

  def add(filename, panels, cols=3):
    panels = [p for p in panels if p.lines]
    if panels:
      figures[filename] = make_figure(panels, cols)

  add("loss.png", [_Panel(name, ylabel(name, ("loss",), s["kind"]),
                          _lines(s["rows"], ("loss", "eval_loss"))) for name, s in stages.items()])
  for name, stage in stages.items():
    spec = REGISTRY.get(stage["kind"])
    add(f"{name}.png", [panel for title, left, right in (spec.panels if spec else ())
                        for panel in _stage_panels(title, stage["rows"], left, right,
                                                   stage["kind"])])
  # Per stage, since each stage counts its own steps. Tokens/s and MFU, which is proportional to
  # it, on panels of their own; MFU is NaN (so absent) on an unknown device.
  add("throughput.png", [panel for name, s in stages.items() for key in ("tokens_per_sec", "mfu")
                         for panel in _stage_panels(name, s["rows"], (), (key,))], cols=2)
  return figures


def write_figures(stages: dict[str, dict], out_dir: str, explicit: bool = True) -> list[str]:
  """Writes the figures whose data is present; returns their file names, in report order."""
  names = []
  for filename, fig in build_figures(stages).items():
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    _write(os.path.join(out_dir, filename), png.getvalue(), explicit)
    names.append(filename)
  return names
