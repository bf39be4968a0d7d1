"""The rater app in-process (starlette TestClient), on SQLite and on a real PostgreSQL server:
the security cases with their status and message, assignment with overlap, idempotent submits,
the admin page and its export."""

import json

import pytest
from starlette.testclient import TestClient

from lmtrain.feedback import app as label_app
from lmtrain.feedback import db
from label_fakes import Rater

SCRIPT = "<script>alert('pwned')</script>"


@pytest.fixture
def engine(db_url):
  engine = db.open_db(db_url)
  yield engine
  engine.dispose()


def _client(engine):
  return TestClient(label_app.create_app(engine), base_url="http://127.0.0.1")


def _tasks(engine, n, k=3, overlapped=(), prompt=None):
  records = [{"prompt": prompt or f"prompt {i}", "responses": [f"r{i}.{j}" for j in range(k)],
              "source": {"stage": "sft"}, "id": i} for i in range(n)]
  db.add_tasks(engine, records, set(overlapped))
  return records


def _rater(engine, name):
  return Rater(_client(engine), db.add_rater(engine, name))


def _label_count(engine):
  return len(db.all_labels(engine))


def test_no_token_and_bad_token_get_401(engine):
  _tasks(engine, 1)
  client = _client(engine)
  for path in ("/", "/rate", "/mine"):
    response = client.get(path)
    assert response.status_code == 401, path
    assert "the personal link you were given" in response.text.lower()
  response = client.post("/rate", data={"task_id": "1", "ranking": "1,2,3"})
  assert response.status_code == 401 and "No rater token" in response.text
  response = client.get("/rate?token=not-a-real-token", follow_redirects=True)
  assert response.status_code == 401
  assert "This rater link is not valid" in response.text
  assert _label_count(engine) == 0


def test_admin_pages_need_the_admin_token(engine):
  _tasks(engine, 2)
  rater = _rater(engine, "ann")
  for path in ("/admin", "/admin/export"):
    response = rater.client.get(path)  # holds a rater cookie only
    assert response.status_code == 403, path
    assert "needs the admin link; a rater link does not open it" in response.text
    response = _client(engine).get(path)
    assert response.status_code == 401 and "No admin token" in response.text
  response = _client(engine).get("/admin?token=guess", follow_redirects=True)
  assert response.status_code == 403 and "admin link is not valid" in response.text
  # The admin token opens no rater page: the two kinds are separate.
  admin = _client(engine)
  admin.get(f"/admin?token={db.new_admin_token(engine)}")
  assert admin.get("/admin").status_code == 200
  assert admin.get("/rate").status_code == 401


def test_a_rater_cannot_submit_or_see_another_raters_task(engine):
  _tasks(engine, 2)
  ann, bob = _rater(engine, "ann"), _rater(engine, "bob")
  ann_task, _ = ann.current()
  bob_task, bob_csrf = bob.current()
  assert ann_task != bob_task
  response = bob.post(csrf=bob_csrf, task_id=str(ann_task), action="submit", ranking="1,2,3")
  assert response.status_code == 400
  assert f"Task {ann_task} is not assigned to you." in response.text
  response = bob.post(csrf=bob_csrf, task_id="999", action="skip")
  assert response.status_code == 400 and "Task 999 is not assigned to you." in response.text
  assert _label_count(engine) == 0
  # ann's labels are hers alone.
  ann.rank([2, 1, 3])
  assert "prompt 0" in ann.client.get("/mine").text
  assert "prompt 0" not in bob.client.get("/mine").text


@pytest.mark.parametrize("ranking, message", [
    ("1,2", "the ranking must give each of the 3 responses a rank (got 2 values)"),
    ("1,2,3,4", "the ranking must give each of the 3 responses a rank (got 4 values)"),
    ("1,3,4", "are not a ranking of the 3 responses"),
    ("0,1,2", "are not a ranking of the 3 responses"),
    ("1,1,1", "a ranking that ties every response says nothing"),
    ("", "the ranking must give each of the 3 responses a rank (got 0 values)"),
    ("first,second,third", "is not a comma-separated list of ranks"),
])
def test_a_bad_ranking_gets_400(engine, ranking, message):
  _tasks(engine, 1)
  rater = _rater(engine, "ann")
  task_id, csrf = rater.current()
  response = rater.post(csrf=csrf, task_id=str(task_id), action="submit", ranking=ranking)
  assert response.status_code == 400
  assert message in response.text
  assert _label_count(engine) == 0


def test_a_bad_score_gets_400(engine):
  _tasks(engine, 1)
  rater = _rater(engine, "ann")
  task_id, response = rater.rank([1, 2, 3], score_1="9")
  assert response.status_code == 400
  assert "the score of response 2 must be 1-7 or empty" in response.text


@pytest.mark.parametrize("csrf, label", [(None, "missing"), ("wrong-token", "wrong")])
def test_a_post_without_the_csrf_token_gets_403(engine, csrf, label):
  _tasks(engine, 2)
  rater = _rater(engine, "ann")
  task_id, _ = rater.current()
  fields = {"task_id": str(task_id), "action": "submit", "ranking": "1,2,3"}
  if csrf is not None:
    fields["csrf"] = csrf
  response = rater.post(**fields)
  assert response.status_code == 403, label
  assert "Missing or wrong CSRF token" in response.text
  # Another rater's CSRF token does not do either.
  other = _rater(engine, "bob")
  _, other_csrf = other.current()
  assert other_csrf is not None
  assert rater.post(**{**fields, "csrf": other_csrf}).status_code == 403
  assert _label_count(engine) == 0


def test_a_script_in_a_candidate_shows_as_text(engine):
  db.add_tasks(engine, [{"prompt": f"say {SCRIPT}", "responses": [SCRIPT, "<b>bold</b>",
                                                                  '" onmouseover="alert(1)']}],
               set())
  rater = _rater(engine, "ann")
  page = rater.page
  assert SCRIPT not in page and "<b>bold</b>" not in page
  assert "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;" in page
  assert "&#34; onmouseover=&#34;alert(1)" in page
  # The only script is the app's own file; the CSP forbids any inline one.
  assert page.count("<script") == 1 and '<script src="/static/label.js"></script>' in page
  rater.rank([1, 2, 3])
  assert SCRIPT not in rater.client.get("/mine").text
  admin = _client(engine)
  admin.get(f"/admin?token={db.new_admin_token(engine)}")
  assert SCRIPT not in admin.get("/admin").text
  # The export keeps the text as it was: escaping belongs to the page, not the data.
  exported = [json.loads(line) for line in admin.get("/admin/export").text.splitlines()]
  assert exported[0]["responses"][0] == SCRIPT


def test_security_headers_on_every_response(engine):
  _tasks(engine, 1)
  rater = _rater(engine, "ann")
  for response in (rater.client.get("/rate"), rater.client.get("/static/label.js"),
                   _client(engine).get("/rate")):
    headers = response.headers
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"] == "no-referrer"
  # The link's token leaves the address bar at once, into an HttpOnly cookie.
  token = db.add_rater(engine, "bob")
  response = _client(engine).get(f"/rate?token={token}", follow_redirects=False)
  assert response.status_code == 303 and response.headers["location"] == "/rate"
  cookie = response.headers["set-cookie"]
  assert "HttpOnly" in cookie and "SameSite=lax" in cookie


def test_double_submit_stores_one_label(engine):
  _tasks(engine, 2)
  rater = _rater(engine, "ann")
  task_id, csrf = rater.current()
  fields = dict(csrf=csrf, task_id=str(task_id), action="submit", ranking="2,1,3")
  assert rater.post(**fields).status_code == 303
  assert rater.post(**{**fields, "ranking": "1,2,3"}).status_code == 303
  labels = db.all_labels(engine)
  assert [(l["task_id"], l["ranking"]) for l in labels] == [(task_id, [2, 1, 3])]


def test_ranking_scores_flags_progress_and_skip(engine):
  _tasks(engine, 3)
  rater = _rater(engine, "ann")
  assert "Task 1 of 3" in rater.page
  task_id, response = rater.rank([1, 1, 2], score_0="7", score_2="2",
                                 flag_harmful_2="on", flag_factually_wrong_1="on")
  assert response.status_code == 303 and response.headers["location"] == f"/rate?saved={task_id}"
  assert "Task 2 of 3" in rater.page
  skipped, csrf = rater.current()
  assert rater.post(csrf=csrf, task_id=str(skipped), action="skip").status_code == 303
  rater.refresh()
  [label] = db.all_labels(engine)
  assert label["ranking"] == [1, 1, 2] and label["scores"] == [7, None, 2]
  assert label["flags"] == {"harmful": [False, False, True],
                            "factually_wrong": [False, True, False],
                            "ignores_instruction": [False, False, False]}
  # The skipped task goes to the next rater; ann never sees it again.
  assert rater.current()[0] not in (task_id, skipped)
  assert _rater(engine, "bob").current()[0] == skipped


def test_overlapped_tasks_go_to_two_raters_the_rest_to_one(engine):
  _tasks(engine, 4, overlapped={1, 3})
  raters = [_rater(engine, name) for name in ("ann", "bob", "cat")]
  seen = {name: [] for name in ("ann", "bob", "cat")}
  for _ in range(6):
    for name, rater in zip(seen, raters):
      task_id, _ = rater.current()
      if task_id is not None:
        seen[name].append(task_id)
        assert rater.rank([1, 2, 3])[1].status_code == 303
  per_task = {}
  for name, task_ids in seen.items():
    assert len(task_ids) == len(set(task_ids))
    for task_id in task_ids:
      per_task.setdefault(task_id, []).append(name)
  assert {task: len(names) for task, names in per_task.items()} == {1: 1, 2: 2, 3: 1, 4: 2}
  for rater in raters:
    assert 'id="all-done"' in rater.page


def test_admin_page_counts_agreement_and_export(engine):
  _tasks(engine, 3, overlapped={0, 1})
  ann, bob = _rater(engine, "ann"), _rater(engine, "bob")
  ann.rank([1, 2, 3])
  bob.rank([1, 3, 2])  # task 1, the other of its two raters
  ann.rank([2, 1, 3])
  bob.rank([2, 1, 3])  # task 2: full agreement
  admin = _client(engine)
  admin.get(f"/admin?token={db.new_admin_token(engine)}")
  page = admin.get("/admin").text
  # 6 response pairs compared, 5 ordered alike.
  assert "83.3% of 6 response pairs" in page
  assert "<td>ann</td><td>2</td><td>0</td>" in page
  response = admin.get("/admin/export")
  assert response.headers["content-disposition"] == 'attachment; filename="rankings.jsonl"'
  records = [json.loads(line) for line in response.text.splitlines()]
  assert [(r["task_id"], r["rater"], r["ranking"]) for r in records] == [
      (1, "ann", [1, 2, 3]), (1, "bob", [1, 3, 2]), (2, "ann", [2, 1, 3]), (2, "bob", [2, 1, 3])]
  assert records[0]["source"] == {"stage": "sft"} and records[0]["id"] == 0
  pairs = [json.loads(line) for line in admin.get("/admin/export?pairs=1").text.splitlines()]
  assert len(pairs) == 12 and pairs[0] == {
      "prompt": "prompt 0", "chosen": "r0.0", "rejected": "r0.1", "rater": "ann",
      "labeled_at": records[0]["labeled_at"], "task_id": 1}
