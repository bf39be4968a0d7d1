"""Rule-based scorers: (completion, record) -> score in [0, 1], for PPO rewards and SFT eval.

`completion` is the generated text of one assistant turn (after EOS truncation); `record` is the
prompt record with the fields a scorer reads, e.g. "answer" and "task".
"""

import re
from typing import Any, Callable, Sequence

import numpy as np

from lmtrain.errors import UserError

Scorer = Callable[[str, dict[str, Any]], float]


def _field(record: dict[str, Any], name: str, scorer: str) -> Any:
  if name not in record:
    raise UserError(f'scorer {scorer}: record has no "{name}" field')
  return record[name]


def exact_match(completion: str, record: dict[str, Any]) -> float:
  """1.0 when the completion equals record["answer"], surrounding whitespace ignored."""
  answer = str(_field(record, "answer", "exact_match"))
  return float(completion.strip() == answer.strip())


def _number(text: str) -> int | None:
  text = text.strip().rstrip(".").strip()
  return int(text) if re.fullmatch(r"-?\d+", text) else None


def _words(text: str) -> list[str]:
  return [w for w in re.split(r"[,\s]+", text.strip().rstrip(".")) if w]


# How the answer of each demo task (lmtrain.data.demo) is read from a completion.
_DEMO_READERS = {
    "count": _number,
    "last": lambda text: text.strip().rstrip("."),
    "reverse": _words,
    "sort": _words,
}


def demo_tasks(completion: str, record: dict[str, Any]) -> float:
  """1.0 when the completion answers the demo task right: numbers compared as integers, word
  lists word by word (commas or spaces), words case-sensitively; a trailing period is allowed."""
  task = _field(record, "task", "demo_tasks")
  if task not in _DEMO_READERS:
    raise UserError(f"scorer demo_tasks: unknown task {task!r} (known: "
                    f"{', '.join(sorted(_DEMO_READERS))})")
  read = _DEMO_READERS[task]
  got = read(completion)
  return float(got is not None and got == read(str(_field(record, "answer", "demo_tasks"))))


SCORERS: dict[str, Scorer] = {
    "demo_tasks": demo_tasks,
    "exact_match": exact_match,
}


def get_scorer(name: str) -> Scorer:
  """The scorer registered as `name`."""
  if name not in SCORERS:
    raise UserError(f"unknown scorer {name!r}; known scorers: {', '.join(sorted(SCORERS))}")
  return SCORERS[name]


def per_task(name: str, scores, records: Sequence[dict[str, Any]]) -> dict[str, float]:
  """{NAME_<task>: mean score} for the records that carry a "task" field (the demo's do): which
  skills an eval's mean hides. Tasks whose names are not plain identifiers are left out."""
  groups: dict[str, list[float]] = {}
  for score, record in zip(scores, records):
    task = record.get("task")
    if isinstance(task, str) and task.isidentifier():
      groups.setdefault(task, []).append(float(score))
  return {f"{name}_{task}": float(np.mean(v)) for task, v in sorted(groups.items())}


class ResponseScorer:
  """Decodes generated rows (their masked tokens, EOS dropped) and scores each with the scorer
  `name` against the record of its prompt: PPO/GRPO rewards and task scores, SFT eval."""

  def __init__(self, name: str, records: Sequence[dict[str, Any]], tokenizer):
    self.scorer = get_scorer(name)
    self.records = list(records)
    self.tokenizer = tokenizer

  def texts(self, tokens, mask) -> list[str]:
    eos = self.tokenizer.eos_id
    return [self.tokenizer.decode([int(t) for t, m in zip(row, row_mask) if m and t != eos])
            for row, row_mask in zip(tokens, mask)]

  def __call__(self, tokens, mask, index) -> np.ndarray:
    """[B] float32 scores of rows tokens [B, N] (mask [B, N]) answering records `index` [B]."""
    return np.asarray([self.scorer(text, self.records[int(i)])
                       for text, i in zip(self.texts(tokens, mask), index)], np.float32)
