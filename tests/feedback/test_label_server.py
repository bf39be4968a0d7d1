"""`lmtrain label serve` as a real server on 127.0.0.1, on SQLite and on PostgreSQL: an acknowledged
label survives kill -9 of the server, and 20 raters submitting at once lose and duplicate nothing."""

import threading
from concurrent import futures

import httpx

from lmtrain.feedback import db
from label_fakes import Rater, write_candidates
from lmtrain import cli

RATERS = 20


def _init(tmp_path, db_url, n, overlap):
  candidates = tmp_path / "candidates.jsonl"
  write_candidates(candidates, n)
  cli.main(["label", "init", "--db", db_url, "--candidates", str(candidates), "--overlap",
            str(overlap)])


def test_an_acknowledged_label_survives_kill_9(tmp_path, db_url, start_server):
  _init(tmp_path, db_url, 3, 0)
  engine = db.open_db(db_url)
  token = db.add_rater(engine, "ann")
  engine.dispose()
  server = start_server(db_url)
  with httpx.Client(base_url=server.url, timeout=30) as client:
    rater = Rater(client, token)
    task_id, csrf = rater.current()
    response = rater.post(csrf=csrf, task_id=str(task_id), action="submit", ranking="3,1,2",
                          score_1="6")
    assert response.status_code == 303  # the acknowledgement
  server.kill9()
  assert server.process.returncode == -9
  engine = db.open_db(db_url)
  labels = db.all_labels(engine)
  engine.dispose()
  assert [(l["task_id"], l["rater"], l["ranking"], l["scores"]) for l in labels] == [
      (task_id, "ann", [3, 1, 2], [None, 6, None])]
  # A restarted server carries on from the same database.
  server = start_server(db_url)
  with httpx.Client(base_url=server.url, timeout=30) as client:
    assert Rater(client, token).current()[0] == task_id + 1


def test_twenty_raters_at_once_lose_and_duplicate_nothing(tmp_path, db_url, start_server):
  # 30 tasks, 10 of them for two raters: 40 labels to hand out among 20 raters.
  _init(tmp_path, db_url, 30, 1 / 3)
  engine = db.open_db(db_url)
  tokens = [db.add_rater(engine, f"rater{i:02d}") for i in range(RATERS)]
  server = start_server(db_url)
  start = threading.Barrier(RATERS, timeout=60)

  def rate(index):
    """Submits until there is nothing left (at most 10 tasks); returns the acknowledged labels.
    The first submit goes out at the same moment as everyone else's, and twice."""
    acknowledged = {}
    with httpx.Client(base_url=server.url, timeout=60) as client:
      rater = Rater(client, tokens[index])
      start.wait()
      for round_ in range(10):
        task_id, csrf = rater.current()
        if task_id is None:
          break
        # A ranking that differs between raters: [1 + index % 3, ...] rotated.
        ranking = [1 + (index + j) % 3 for j in range(3)]
        fields = dict(csrf=csrf, task_id=str(task_id), action="submit",
                      ranking=",".join(map(str, ranking)))
        response = rater.post(**fields)
        assert response.status_code == 303, response.text
        if round_ == 0:
          assert rater.post(**fields).status_code == 303  # a double submit
        acknowledged[task_id] = ranking
        rater.refresh()
    return acknowledged

  with futures.ThreadPoolExecutor(RATERS) as pool:
    results = list(pool.map(rate, range(RATERS)))
  labels = db.all_labels(engine)
  stored = {(l["rater"], l["task_id"]): l["ranking"] for l in labels}
  expected = {(f"rater{i:02d}", task): ranking for i, acknowledged in enumerate(results)
              for task, ranking in acknowledged.items()}
  assert len(labels) == len(stored) == 40  # no duplicate rows, every slot filled
  assert stored == expected  # nothing acknowledged is missing, nothing else is there
  per_task = {}
  for label in labels:
    per_task[label["task_id"]] = per_task.get(label["task_id"], 0) + 1
  assert sorted(per_task.values()) == [1] * 20 + [2] * 10
  assert all(counts == (2 if overlap else 1) for counts, overlap in
             ((per_task[l["task_id"]], l["overlap"]) for l in labels))
  engine.dispose()
