"""`lmtrain label init|add-rater|export` from the command line: loading and re-loading candidates,
bad records and settings, links and token storage, the versioned schema, the export formats."""

import json
import re
import sqlite3
import subprocess
import sys

import pytest

from lmtrain import cli
from lmtrain.feedback import db
from label_fakes import SOURCE, Rater, write_candidates


def _run(capsys, *argv):
  """(exit code, stdout, stderr) of `lmtrain label ARGV`."""
  try:
    cli.main(["label", *map(str, argv)])
    code = 0
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


@pytest.fixture
def url(tmp_path):
  return f"sqlite:///{tmp_path / 'labels.db'}"


def test_init_adds_only_new_tasks_and_prints_an_admin_link(tmp_path, url, capsys):
  path = tmp_path / "c.jsonl"
  write_candidates(path, 10)
  code, out, _ = _run(capsys, "init", "--db", url, "--candidates", path, "--overlap", 0.2)
  assert code == 0
  assert "added 10 tasks (2 of them go to two raters)" in out
  assert re.search(r"http://127\.0\.0\.1:8000/admin\?token=[\w-]{40,}", out)
  write_candidates(path, 15)  # the same 10, and 5 more
  code, out, _ = _run(capsys, "init", "--db", url, "--candidates", path, "--overlap", 0.2,
                      "--base_url", "https://label.example.org/")
  assert "added 5 tasks (1 of them go to two raters)" in out
  assert "10 records of" in out and "https://label.example.org/admin?token=" in out
  engine = db.open_db(url)
  counts = db.counts(engine)
  assert counts["tasks"] == 15 and counts["overlapped"] == 3
  engine.dispose()


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "p"}', 'missing "responses" field'),
    ('{"prompt": "p", "responses": ["only one"]}', "needs at least 2 responses"),
    ('{"prompt": "p", "responses": ["a", 3]}', '"responses"[1] must be a string'),
    ('{"responses": ["a", "b"]}', 'missing "prompt" field'),
    ('{"prompt": "p", "responses": ["a", "b"], "source": "sft"}', '"source" must be an object'),
    ("not json", "invalid JSON"),
])
def test_a_bad_candidate_record_names_its_line(tmp_path, url, capsys, line, message):
  path = tmp_path / "c.jsonl"
  path.write_text('{"prompt": "fine", "responses": ["a", "b"]}\n' + line + "\n")
  code, _, err = _run(capsys, "init", "--db", url, "--candidates", path)
  assert code == 1
  assert err.startswith(f"lmtrain: error: {path}:2: ") and message in err


@pytest.mark.parametrize("argv, message", [
    (["init", "--db", "mysql://x/y", "--candidates", "c.jsonl"], "'mysql' is not supported"),
    (["init", "--db", "nonsense", "--candidates", "c.jsonl"], "not a database URL"),
    (["init", "--db", "sqlite://", "--candidates", "c.jsonl"], "give a file"),
    (["init", "--candidates", "missing.jsonl"], "missing.jsonl: file not found"),
    (["init", "--candidates", "c.jsonl", "--overlap", "1.5"], "--overlap 1.5: must be between"),
    (["export", "--output", "no/such/dir/r.jsonl"], "does not exist"),
])
def test_bad_settings_are_one_line_errors(tmp_path, monkeypatch, capsys, argv, message):
  monkeypatch.chdir(tmp_path)
  write_candidates(tmp_path / "c.jsonl", 2)
  code, _, err = _run(capsys, *argv)
  assert code == 1 and err.startswith("lmtrain: error: ") and message in err
  assert len(err.strip().splitlines()) == 1


def test_add_rater_stores_only_a_hash_of_the_token(tmp_path, url, capsys):
  write_candidates(tmp_path / "c.jsonl", 2)
  _run(capsys, "init", "--db", url, "--candidates", tmp_path / "c.jsonl")
  code, out, _ = _run(capsys, "add-rater", "--db", url, "ann")
  assert code == 0
  token = re.search(r"link for ann: http://127\.0\.0\.1:8000/rate\?token=([\w-]+)", out).group(1)
  assert len(token) >= 40
  code, _, err = _run(capsys, "add-rater", "--db", url, "ann")
  assert code == 1 and "rater 'ann' already exists" in err
  # The database file and its write-ahead log, where fresh rows sit until a checkpoint.
  wal = tmp_path / "labels.db-wal"
  raw = (tmp_path / "labels.db").read_bytes() + (wal.read_bytes() if wal.exists() else b"")
  assert token.encode() not in raw
  assert db.hash_token(token).encode() in raw


def test_the_schema_is_versioned(url):
  engine = db.open_db(url)
  engine.dispose()
  path = url[len("sqlite:///"):]
  with sqlite3.connect(path) as conn:
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [
        (len(db.MIGRATIONS),)]
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
  db.open_db(url).dispose()  # opening again applies nothing twice
  with sqlite3.connect(path) as conn:
    assert conn.execute("SELECT count(*) FROM schema_version").fetchone() == (1,)
    conn.execute("UPDATE schema_version SET version = 99")
  with pytest.raises(Exception, match="schema version 99, newer than this lmtrain knows"):
    db.open_db(url)


def test_export_rankings_and_pairs(tmp_path, url, capsys):
  from starlette.testclient import TestClient
  from lmtrain.feedback import app as label_app
  records = write_candidates(tmp_path / "c.jsonl", 3)
  _run(capsys, "init", "--db", url, "--candidates", tmp_path / "c.jsonl", "--overlap", 0)
  engine = db.open_db(url)
  rater = Rater(TestClient(label_app.create_app(engine)), db.add_rater(engine, "ann"))
  rater.rank([2, 1, 2], score_0="3")
  _, csrf = rater.current()
  rater.post(csrf=csrf, task_id="2", action="skip")
  engine.dispose()
  out_path = tmp_path / "rankings.jsonl"
  code, out, _ = _run(capsys, "export", "--db", url, "--output", out_path)
  assert code == 0 and f"wrote 1 rankings to {out_path}" in out
  [record] = [json.loads(line) for line in out_path.read_text().splitlines()]
  assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record.pop("labeled_at"))
  assert record == {
      "prompt": records[0]["prompt"], "responses": records[0]["responses"], "ranking": [2, 1, 2],
      "rater": "ann", "task_id": 1, "scores": [3, None, None],
      "flags": {"harmful": [False] * 3, "factually_wrong": [False] * 3,
                "ignores_instruction": [False] * 3},
      "source": SOURCE, "temperature": 0.7, "prompt_id": "prompt-0"}
  pairs_path = tmp_path / "pairs.jsonl"
  code, out, _ = _run(capsys, "export", "--db", url, "--output", pairs_path, "--pairs")
  assert code == 0 and "wrote 2 pairs" in out
  pairs = [json.loads(line) for line in pairs_path.read_text().splitlines()]
  responses = records[0]["responses"]
  assert [(p["chosen"], p["rejected"]) for p in pairs] == [(responses[1], responses[0]),
                                                           (responses[1], responses[2])]
  assert set(pairs[0]) == {"prompt", "chosen", "rejected", "rater", "labeled_at", "task_id"}


def test_help_does_not_import_the_web_stack():
  code = ("import sys; from lmtrain import cli\n"
          "try:\n  cli.main(['label', 'serve', '--help'])\nexcept SystemExit:\n  pass\n"
          "print(sorted(m for m in ('starlette', 'sqlalchemy', 'uvicorn', 'jax') "
          "if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          check=True)
  assert "--host" in result.stdout and result.stdout.strip().endswith("[]")
