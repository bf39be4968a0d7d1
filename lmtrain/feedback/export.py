"""The export of labels for the reward stage: K-wise rankings, or pairwise preference records.

A ranking record is the candidate record back (its other fields kept) plus the label:
  {"prompt", "responses", "ranking" (rank of responses[i], 1 = best, ties equal), "rater",
   "labeled_at" (ISO-8601 UTC), "task_id", "scores" (1-7 or null per response),
   "flags" ({flag: [bool per response]}), "source", ...}
A pair record is {"prompt", "chosen", "rejected", "rater", "labeled_at", "task_id"} for each two
responses of a ranking with different ranks. Skipped tasks are not exported.
"""

import json
import os
from typing import Any, Iterator, Sequence

from lmtrain.errors import UserError


def ranking_records(labels: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any]]:
  """From `db.all_labels` rows."""
  for label in labels:
    yield {"prompt": label["prompt"], "responses": label["responses"],
           "ranking": label["ranking"], "rater": label["rater"],
           "labeled_at": label["labeled_at"], "task_id": label["task_id"],
           "scores": label["scores"], "flags": label["flags"],
           "source": label["extra"].get("source", {}),
           **{k: v for k, v in label["extra"].items() if k != "source"}}


def pair_records(labels: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any]]:
  for label in labels:
    responses, ranking = label["responses"], label["ranking"]
    for i, better in enumerate(ranking):
      for j, worse in enumerate(ranking):
        if better < worse:
          yield {"prompt": label["prompt"], "chosen": responses[i], "rejected": responses[j],
                 "rater": label["rater"], "labeled_at": label["labeled_at"],
                 "task_id": label["task_id"]}


def write(path: str, records: Iterator[dict[str, Any]]) -> int:
  """Writes JSONL through a temporary file renamed into place (no half-written export)."""
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise UserError(f"--output {path}: directory {directory} does not exist")
  count, tmp = 0, f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
      count += 1
  os.replace(tmp, path)
  return count
