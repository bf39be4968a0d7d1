"""The rater database: tasks, raters, assignments and labels, on SQLite (embedded) or PostgreSQL.

SQLAlchemy Core over a versioned schema: `schema_version` holds the number of the last migration
applied, and `open_db` applies the missing ones in order, so an older database file keeps working.

Conventions:
- a task's `slots` is how many more raters it may be handed to (2 for an overlapped task, else 1);
  taking one is a conditional UPDATE (`slots > 0`), atomic on both backends, so concurrent raters
  never over-assign a task; a skip gives its slot back.
- a label row is unique per (task, rater): a double submit inserts nothing the second time.
- tokens are stored only as SHA-256 hashes (they are 256-bit random, so no slow hash is needed);
  a rater's CSRF token is a separate random value that cannot log anyone in.
- times are UTC.
"""

import datetime
import hashlib
import json
import secrets
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from lmtrain.errors import UserError

FLAGS = ("harmful", "factually_wrong", "ignores_instruction")
ADMIN_TOKEN_KEY = "admin_token_hash"

metadata = sa.MetaData()

schema_version = sa.Table("schema_version", metadata, sa.Column("version", sa.Integer,
                                                                nullable=False))
settings = sa.Table("settings", metadata, sa.Column("key", sa.String(64), primary_key=True),
                    sa.Column("value", sa.Text, nullable=False))
tasks = sa.Table(
    "tasks", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    # sha256 of [prompt, responses]: re-running init with a grown file adds only the new ones.
    sa.Column("fingerprint", sa.String(64), nullable=False, unique=True),
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("responses", sa.Text, nullable=False),  # JSON list of strings
    sa.Column("extra", sa.Text, nullable=False),  # JSON object: the candidate's other fields
    sa.Column("overlap", sa.Boolean, nullable=False),
    sa.Column("slots", sa.Integer, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False))
raters = sa.Table(
    "raters", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("csrf_token", sa.String(64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False))
assignments = sa.Table(
    "assignments", metadata,
    sa.Column("task_id", sa.Integer, sa.ForeignKey("tasks.id"), primary_key=True),
    sa.Column("rater_id", sa.Integer, sa.ForeignKey("raters.id"), primary_key=True),
    sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=False))
labels = sa.Table(
    "labels", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("task_id", sa.Integer, sa.ForeignKey("tasks.id"), nullable=False),
    sa.Column("rater_id", sa.Integer, sa.ForeignKey("raters.id"), nullable=False),
    sa.Column("skipped", sa.Boolean, nullable=False),
    sa.Column("ranking", sa.Text),  # JSON list: the rank of responses[i], 1 = best; null if skipped
    sa.Column("scores", sa.Text),  # JSON list: 1-7 or null per response
    sa.Column("flags", sa.Text),  # JSON object: flag name -> list of booleans per response
    sa.Column("labeled_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("task_id", "rater_id", name="one_label_per_rater"),
    sa.Index("labels_by_rater", "rater_id"))


def _migration_1(conn):
  # The tables as defined above. Once a later migration alters one, this one must keep creating
  # the version-1 shape (copy the definition here), so that old and new databases converge.
  for table in (settings, tasks, raters, assignments, labels):
    table.create(conn)


# Ordered; a database at version v gets MIGRATIONS[v:] applied. Append, never edit a released one.
MIGRATIONS = (_migration_1,)


def now() -> datetime.datetime:
  return datetime.datetime.now(datetime.timezone.utc)


def iso_utc(moment: datetime.datetime) -> str:
  """ISO-8601 in UTC with a Z; SQLite hands times back without their zone."""
  if moment.tzinfo is None:
    moment = moment.replace(tzinfo=datetime.timezone.utc)
  return moment.astimezone(datetime.timezone.utc).isoformat(timespec="seconds").replace(
      "+00:00", "Z")


def hash_token(token: str) -> str:
  return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _sqlite_engine(url: sa.engine.URL) -> sa.engine.Engine:
  engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

  @sa.event.listens_for(engine, "connect")
  def _on_connect(dbapi_conn, _):
    # The driver's own transaction handling is off, so that `begin` below starts every transaction
    # with BEGIN IMMEDIATE: a read-then-write transaction then waits for the write lock up front
    # instead of failing with "database is locked" when two raters submit at once.
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: each commit is synced to disk before the page acknowledges it.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()

  @sa.event.listens_for(engine, "begin")
  def _on_begin(conn):
    conn.exec_driver_sql("BEGIN IMMEDIATE")

  return engine


def open_db(url: str) -> sa.engine.Engine:
  """An engine for `url` (sqlite:///path.db or postgresql://...), schema migrated to the latest."""
  try:
    parsed = sa.engine.make_url(url)
  except sa.exc.ArgumentError:
    raise UserError(f"--db {url!r}: not a database URL (sqlite:///labels.db or "
                    "postgresql://user@host/dbname)") from None
  backend = parsed.get_backend_name()
  if backend == "sqlite":
    if parsed.database in (None, "", ":memory:"):
      raise UserError(f"--db {url}: give a file, e.g. sqlite:///labels.db")
    engine = _sqlite_engine(parsed)
  elif backend in ("postgresql", "postgres"):
    try:
      import psycopg  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      raise UserError(f"--db {url.split('@')[-1]}: PostgreSQL needs its driver: pip install "
                      "'lmtrain[postgres]'") from None
    # psycopg 3, whatever driver the URL named (SQLAlchemy's default would be psycopg2).
    engine = sa.create_engine(parsed.set(drivername="postgresql+psycopg"), pool_pre_ping=True,
                              pool_size=10, max_overflow=20)
  else:
    raise UserError(f"--db {url}: use sqlite:///FILE or postgresql://...; {backend!r} is not "
                    "supported")
  try:
    migrate(engine)
  except sa.exc.OperationalError as e:
    raise UserError(f"--db {parsed.render_as_string(hide_password=True)}: cannot open the "
                    f"database ({str(e.orig).strip().splitlines()[0]})") from None
  return engine


def migrate(engine: sa.engine.Engine):
  with engine.begin() as conn:
    if conn.dialect.name == "postgresql":
      # Two processes opening a fresh database at once (init and serve) would both create the
      # tables; this transaction-scoped lock makes the second wait and find them. (SQLite's
      # BEGIN IMMEDIATE already does.)
      conn.execute(sa.text("SELECT pg_advisory_xact_lock(7271100)"))
    if not sa.inspect(conn).has_table("schema_version"):
      schema_version.create(conn)
      conn.execute(schema_version.insert().values(version=0))
    version = conn.execute(sa.select(schema_version.c.version)).scalar_one()
    if version > len(MIGRATIONS):
      raise UserError(f"the database has schema version {version}, newer than this lmtrain "
                      f"knows ({len(MIGRATIONS)}): upgrade lmtrain")
    for migration in MIGRATIONS[version:]:
      migration(conn)
    conn.execute(schema_version.update().values(version=len(MIGRATIONS)))


def _insert(conn, table):
  """An INSERT that can say ON CONFLICT DO NOTHING in the connection's dialect."""
  dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
  return dialect.insert(table)


def fingerprint(prompt: str, responses: list[str]) -> str:
  return hashlib.sha256(json.dumps([prompt, responses]).encode("utf-8")).hexdigest()


def add_tasks(engine, candidates: list[dict[str, Any]], overlapped: set[int]) -> int:
  """Inserts the candidates (overlapped holds the indices that go to two raters); returns how many
  were new."""
  added = 0
  with engine.begin() as conn:
    for i, record in enumerate(candidates):
      extra = {k: v for k, v in record.items() if k not in ("prompt", "responses")}
      statement = _insert(conn, tasks).values(
          fingerprint=fingerprint(record["prompt"], record["responses"]),
          prompt=record["prompt"], responses=json.dumps(record["responses"]),
          extra=json.dumps(extra), overlap=i in overlapped, slots=2 if i in overlapped else 1,
          created_at=now()).on_conflict_do_nothing(index_elements=["fingerprint"])
      added += conn.execute(statement).rowcount
  return added


def known_fingerprints(engine) -> set[str]:
  with engine.connect() as conn:
    return set(conn.execute(sa.select(tasks.c.fingerprint)).scalars())


def new_admin_token(engine) -> str:
  """A fresh admin token; the one before it stops working."""
  token = secrets.token_urlsafe(32)
  with engine.begin() as conn:
    conn.execute(settings.delete().where(settings.c.key == ADMIN_TOKEN_KEY))
    conn.execute(settings.insert().values(key=ADMIN_TOKEN_KEY, value=hash_token(token)))
  return token


def is_admin_token(engine, token: str) -> bool:
  with engine.connect() as conn:
    stored = conn.execute(sa.select(settings.c.value).where(
        settings.c.key == ADMIN_TOKEN_KEY)).scalar_one_or_none()
  return stored is not None and secrets.compare_digest(stored, hash_token(token))


def add_rater(engine, name: str) -> str:
  """Registers a rater; returns their login token (only its hash is kept)."""
  if not name.strip() or len(name) > 200:
    raise UserError(f"rater name {name!r}: give 1 to 200 characters")
  token = secrets.token_urlsafe(32)
  try:
    with engine.begin() as conn:
      conn.execute(raters.insert().values(name=name, token_hash=hash_token(token),
                                          csrf_token=secrets.token_urlsafe(32), created_at=now()))
  except sa.exc.IntegrityError:
    raise UserError(f"rater {name!r} already exists in the database; pick another name") from None
  return token


def rater_by_token(engine, token: str):
  """The rater row (id, name, csrf_token) whose token this is, or None."""
  with engine.connect() as conn:
    return conn.execute(sa.select(raters.c.id, raters.c.name, raters.c.csrf_token).where(
        raters.c.token_hash == hash_token(token))).one_or_none()


def _task_dict(row) -> dict[str, Any]:
  return {"id": row.id, "prompt": row.prompt, "responses": json.loads(row.responses),
          "extra": json.loads(row.extra), "overlap": row.overlap}


def _task_columns():
  return (tasks.c.id, tasks.c.prompt, tasks.c.responses, tasks.c.extra, tasks.c.overlap)


def next_task(engine, rater_id: int) -> dict[str, Any] | None:
  """The rater's open task: the one handed to them and not yet labelled, else the first task not
  yet handed to them that still has a slot. None when there is nothing left."""
  labelled = sa.select(labels.c.task_id).where(labels.c.rater_id == rater_id)
  with engine.begin() as conn:
    row = conn.execute(
        sa.select(*_task_columns()).join(assignments, assignments.c.task_id == tasks.c.id)
        .where(assignments.c.rater_id == rater_id, tasks.c.id.not_in(labelled))
        .order_by(tasks.c.id).limit(1)).one_or_none()
    if row is not None:
      return _task_dict(row)
    mine = sa.select(assignments.c.task_id).where(assignments.c.rater_id == rater_id)
    while True:
      row = conn.execute(sa.select(*_task_columns()).where(
          tasks.c.slots > 0, tasks.c.id.not_in(mine)).order_by(tasks.c.id).limit(1)).one_or_none()
      if row is None:
        return None
      # Another rater may have taken the last slot since the SELECT (PostgreSQL runs both at
      # once): the conditional UPDATE decides, and a miss moves on to the next task.
      taken = conn.execute(tasks.update().where(tasks.c.id == row.id, tasks.c.slots > 0)
                           .values(slots=tasks.c.slots - 1)).rowcount
      if taken:
        mine_now = conn.execute(_insert(conn, assignments).values(
            task_id=row.id, rater_id=rater_id, assigned_at=now()).on_conflict_do_nothing()).rowcount
        if not mine_now:  # the same rater's other request took it a moment ago: one slot is theirs
          conn.execute(tasks.update().where(tasks.c.id == row.id).values(slots=tasks.c.slots + 1))
        return _task_dict(row)


def assigned_task(engine, rater_id: int, task_id: int) -> dict[str, Any] | None:
  """The task if it was handed to this rater, else None."""
  with engine.connect() as conn:
    row = conn.execute(sa.select(*_task_columns()).join(
        assignments, assignments.c.task_id == tasks.c.id).where(
            tasks.c.id == task_id, assignments.c.rater_id == rater_id)).one_or_none()
  return None if row is None else _task_dict(row)


def progress(engine, rater_id: int) -> tuple[int, int]:
  """(tasks this rater has finished, finished + open to them now). Others may take open tasks
  first, so the total can shrink as they work."""
  with engine.connect() as conn:
    done = conn.execute(sa.select(sa.func.count()).select_from(labels).where(
        labels.c.rater_id == rater_id)).scalar_one()
    pending = conn.execute(sa.select(sa.func.count()).select_from(assignments).where(
        assignments.c.rater_id == rater_id)).scalar_one() - done
    mine = sa.select(assignments.c.task_id).where(assignments.c.rater_id == rater_id)
    open_tasks = conn.execute(sa.select(sa.func.count()).select_from(tasks).where(
        tasks.c.slots > 0, tasks.c.id.not_in(mine))).scalar_one()
  return done, done + pending + open_tasks


class BadSubmission(ValueError):
  """A submission the server refuses (HTTP 400); the message says what is wrong."""


def check_ranking(ranking: list[Any], k: int) -> list[int]:
  """A rank per response, 1 = best, ties as equal ranks, no gaps (1, 2, 2, 3)."""
  if len(ranking) != k or not all(isinstance(r, int) and not isinstance(r, bool)
                                  for r in ranking):
    raise BadSubmission(f"the ranking must give each of the {k} responses a rank (got "
                        f"{len(ranking)} values)")
  if sorted(set(ranking)) != list(range(1, max(ranking) + 1)):
    raise BadSubmission(f"the ranks {ranking} are not a ranking of the {k} responses: use 1 for "
                        "the best, the next number for each worse group, equal ranks for ties")
  if k > 1 and max(ranking) == 1:
    raise BadSubmission("a ranking that ties every response says nothing: skip the task instead")
  return ranking


def submit(engine, rater_id: int, task_id: int, *, ranking: list[int] | None,
           scores: list[int | None] | None = None,
           flags: dict[str, list[bool]] | None = None) -> bool:
  """Stores a label (ranking None = skipped), committed before this returns. Returns False when the
  rater had already labelled the task (a double submit; the first label stands)."""
  with engine.begin() as conn:
    task = conn.execute(sa.select(tasks.c.responses).join(
        assignments, assignments.c.task_id == tasks.c.id).where(
            tasks.c.id == task_id, assignments.c.rater_id == rater_id)).one_or_none()
    if task is None:
      raise BadSubmission(f"task {task_id} is not assigned to you")
    k = len(json.loads(task.responses))
    if ranking is not None:
      check_ranking(ranking, k)
    scores = scores or [None] * k
    if len(scores) != k or any(s is not None and s not in range(1, 8) for s in scores):
      raise BadSubmission(f"scores must be 1-7 or empty, one per response ({k})")
    flags = {name: list((flags or {}).get(name, [False] * k)) for name in FLAGS}
    if any(len(v) != k for v in flags.values()):
      raise BadSubmission(f"flags must have one value per response ({k})")
    inserted = conn.execute(_insert(conn, labels).values(
        task_id=task_id, rater_id=rater_id, skipped=ranking is None,
        ranking=None if ranking is None else json.dumps(ranking),
        scores=None if ranking is None else json.dumps(scores),
        flags=None if ranking is None else json.dumps(flags),
        labeled_at=now()).on_conflict_do_nothing(index_elements=["task_id", "rater_id"])).rowcount
    if inserted and ranking is None:
      # A skip hands the task on to another rater.
      conn.execute(tasks.update().where(tasks.c.id == task_id).values(slots=tasks.c.slots + 1))
  return bool(inserted)


def rater_labels(engine, rater_id: int) -> list[dict[str, Any]]:
  """The rater's own labels, newest first (a rater sees only these)."""
  with engine.connect() as conn:
    rows = conn.execute(sa.select(labels.c.task_id, labels.c.skipped, labels.c.ranking,
                                  labels.c.labeled_at, tasks.c.prompt)
                        .join(tasks, tasks.c.id == labels.c.task_id)
                        .where(labels.c.rater_id == rater_id)
                        .order_by(labels.c.labeled_at.desc(), labels.c.id.desc())).all()
  return [{"task_id": r.task_id, "skipped": r.skipped,
           "ranking": json.loads(r.ranking) if r.ranking else None,
           "labeled_at": iso_utc(r.labeled_at), "prompt": r.prompt} for r in rows]


def all_labels(engine) -> list[dict[str, Any]]:
  """Every ranking (skips left out), oldest first, joined with its task and rater."""
  with engine.connect() as conn:
    rows = conn.execute(
        sa.select(labels.c.task_id, labels.c.ranking, labels.c.scores, labels.c.flags,
                  labels.c.labeled_at, raters.c.name, raters.c.id.label("rater_id"),
                  *_task_columns()[1:])
        .join(tasks, tasks.c.id == labels.c.task_id).join(raters, raters.c.id == labels.c.rater_id)
        .where(labels.c.skipped.is_(False)).order_by(labels.c.id)).all()
  return [{"task_id": r.task_id, "prompt": r.prompt, "responses": json.loads(r.responses),
           "ranking": json.loads(r.ranking), "scores": json.loads(r.scores),
           "flags": json.loads(r.flags), "rater": r.name, "rater_id": r.rater_id,
           "labeled_at": iso_utc(r.labeled_at), "overlap": r.overlap,
           "extra": json.loads(r.extra)} for r in rows]


def counts(engine) -> dict[str, Any]:
  """Totals for the admin page: tasks, and per rater labelled/skipped/open."""
  with engine.connect() as conn:
    total = conn.execute(sa.select(sa.func.count()).select_from(tasks)).scalar_one()
    overlapped = conn.execute(sa.select(sa.func.count()).select_from(tasks).where(
        tasks.c.overlap.is_(True))).scalar_one()
    labelled = sa.select(labels.c.rater_id, sa.func.count().label("n")).where(
        labels.c.skipped.is_(False)).group_by(labels.c.rater_id).subquery()
    skipped = sa.select(labels.c.rater_id, sa.func.count().label("n")).where(
        labels.c.skipped.is_(True)).group_by(labels.c.rater_id).subquery()
    rows = conn.execute(
        sa.select(raters.c.id, raters.c.name, sa.func.coalesce(labelled.c.n, 0),
                  sa.func.coalesce(skipped.c.n, 0))
        .outerjoin(labelled, labelled.c.rater_id == raters.c.id)
        .outerjoin(skipped, skipped.c.rater_id == raters.c.id).order_by(raters.c.id)).all()
  return {"tasks": total, "overlapped": overlapped,
          "raters": [{"id": r[0], "name": r[1], "labelled": r[2], "skipped": r[3]} for r in rows]}
