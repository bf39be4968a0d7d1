"""Test helpers for `lmtrain label`: fake candidates files, and a rater driving the app over HTTP
(an httpx or starlette TestClient client) the way the page's form does."""

import json
import re

SOURCE = {"stage": "sft", "path": "runs/demo/sft", "step": 200, "config_sha256": "ab12"}


def write_candidates(path, n: int, k: int = 3, prefix: str = "prompt") -> list[dict]:
  """n candidate records of k responses each, as `lmtrain candidates` writes them."""
  records = [{"prompt": f"{prefix} {i}: name a colour.",
              "responses": [f"answer {j} to {prefix} {i}" for j in range(k)],
              "source": SOURCE, "temperature": 0.7, "prompt_id": f"{prefix}-{i}"}
             for i in range(n)]
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
  return records


def open_task(page: str) -> tuple[int | None, str | None]:
  """(task id, CSRF token) of a rater page; (None, None) on the "all done" page."""
  task = re.search(r'name="task_id" value="(\d+)"', page)
  csrf = re.search(r'name="csrf" value="([^"]+)"', page)
  return (int(task.group(1)) if task else None), (csrf.group(1) if csrf else None)


class Rater:
  """One rater's browser session: the link's token becomes a cookie, then task after task."""

  def __init__(self, client, token: str):
    self.client = client
    response = client.get(f"/rate?token={token}", follow_redirects=True)
    assert response.status_code == 200, response.text
    self.page = response.text

  def current(self) -> tuple[int | None, str | None]:
    return open_task(self.page)

  def refresh(self):
    response = self.client.get("/rate")
    assert response.status_code == 200, response.text
    self.page = response.text

  def post(self, **fields):
    """A raw form POST to /rate, not following the redirect."""
    return self.client.post("/rate", data=fields, follow_redirects=False)

  def rank(self, ranking: list[int], **fields):
    """Submits a ranking of the open task; returns (task id, response); loads the next page."""
    task_id, csrf = self.current()
    response = self.post(csrf=csrf, task_id=str(task_id), action="submit",
                         ranking=",".join(map(str, ranking)), **fields)
    if response.status_code == 303:
      self.refresh()
    return task_id, response
