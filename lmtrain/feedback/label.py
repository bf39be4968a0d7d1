"""`lmtrain label init|add-rater|serve|export`: collect rankings of model responses from raters.

init loads a candidates file (`lmtrain candidates`) into the database and prints the admin link;
add-rater prints a rater's personal link; serve runs the web app (lmtrain/feedback/app.py);
export writes the rankings for `lmtrain reward`. The web and database libraries are imported only
when a sub-command runs, so `lmtrain --help` stays fast.
"""

import random

DEFAULT_DB = "sqlite:///labels.db"
DEFAULT_BASE_URL = "http://127.0.0.1:8000"


def add_arguments(subparsers):
  parser = subparsers.add_parser(
      "label", help="collect rankings from raters: init, add-rater, serve, export")
  sub = parser.add_subparsers(dest="label_command", required=True, metavar="SUBCOMMAND")

  def with_db(p):
    p.add_argument("--db", default=DEFAULT_DB,
                   help=f"database URL: sqlite:///FILE (default {DEFAULT_DB}) or "
                        "postgresql://user:password@host/dbname")

  def with_base_url(p):
    p.add_argument("--base_url", default=DEFAULT_BASE_URL,
                   help="the address raters reach the app at, for the printed links (default "
                        f"{DEFAULT_BASE_URL}; behind a TLS proxy: https://your.host)")

  p = sub.add_parser("init", help="load a candidates file as tasks; prints the admin link")
  with_db(p)
  with_base_url(p)
  p.add_argument("--candidates", required=True, help="JSONL from `lmtrain candidates`")
  p.add_argument("--overlap", type=float, default=0.1,
                 help="share of the new tasks given to two raters, for agreement (default 0.1)")
  p.add_argument("--seed", type=int, default=0, help="picks the overlapped tasks")
  p = sub.add_parser("add-rater", help="register a rater; prints their personal link")
  with_db(p)
  with_base_url(p)
  p.add_argument("name", help="the rater's name or id, as the export records it")
  p = sub.add_parser("serve", help="serve the rater and admin pages")
  with_db(p)
  p.add_argument("--host", default="127.0.0.1",
                 help="address to bind (default 127.0.0.1: put a TLS reverse proxy in front)")
  p.add_argument("--port", type=int, default=8000)
  p = sub.add_parser("export", help="write the rankings (JSONL) for `lmtrain reward`")
  with_db(p)
  p.add_argument("--output", required=True, help="JSONL file to write")
  p.add_argument("--pairs", action="store_true",
                 help="one {prompt, chosen, rejected} record per ordered pair instead")


def candidate_schema(record):
  """A candidates record: a prompt and at least two response strings; other fields are kept."""
  from lmtrain.data.formats import BadRecord, require_str
  require_str(record, "prompt")
  responses = record.get("responses")
  if not isinstance(responses, list):
    raise BadRecord('missing "responses" field (a list of response strings)')
  if len(responses) < 2:
    raise BadRecord(f'"responses" needs at least 2 responses to rank, got {len(responses)}')
  for i, response in enumerate(responses):
    if not isinstance(response, str):
      raise BadRecord(f'"responses"[{i}] must be a string, got {type(response).__name__}')
  if "source" in record and not isinstance(record["source"], dict):
    raise BadRecord('"source" must be an object (the checkpoint\'s lineage)')
  return record


def _link(base_url: str, path: str, token: str) -> str:
  return f"{base_url.rstrip('/')}{path}?token={token}"


def _init(args, engine):
  from lmtrain.data import formats
  from lmtrain.errors import UserError
  from lmtrain.feedback import db
  if not 0 <= args.overlap <= 1:
    raise UserError(f"--overlap {args.overlap}: must be between 0 and 1")
  fresh, seen, read, dropped, unrankable = [], db.known_fingerprints(engine), 0, 0, 0
  for record in formats.iter_records(args.candidates, candidate_schema):
    read += 1
    # Equal responses (which `lmtrain candidates` keeps when resampling does not part them) are
    # shown once: ranking a text against itself says nothing, and the reward data refuse it.
    first = {}
    for response in record["responses"]:
      first.setdefault(response.strip(), response)
    distinct = list(first.values())
    dropped += len(record["responses"]) - len(distinct)
    if len(distinct) < 2:
      unrankable += 1
      continue
    record = {**record, "responses": distinct}
    key = db.fingerprint(record["prompt"], record["responses"])
    if key not in seen:
      seen.add(key)
      fresh.append(record)
  overlapped = set(random.Random(args.seed).sample(range(len(fresh)),
                                                   round(args.overlap * len(fresh))))
  added = db.add_tasks(engine, fresh, overlapped)
  token = db.new_admin_token(engine)
  print(f"added {added} tasks ({len(overlapped)} of them go to two raters); "
        f"{read - len(fresh) - unrankable} records of {args.candidates} were already tasks")
  if dropped:
    print(f"{dropped} responses equal to another of their prompt's were left out; "
          f"{unrankable} records kept fewer than 2 distinct responses and were not added")
  print(f"admin link (earlier admin links stop working): {_link(args.base_url, '/admin', token)}")


def run(args):
  from lmtrain.feedback import db
  engine = db.open_db(args.db)
  try:
    if args.label_command == "init":
      _init(args, engine)
    elif args.label_command == "add-rater":
      token = db.add_rater(engine, args.name)
      print(f"link for {args.name}: {_link(args.base_url, '/rate', token)}")
    elif args.label_command == "export":
      from lmtrain.feedback import export
      rows = db.all_labels(engine)
      records = export.pair_records(rows) if args.pairs else export.ranking_records(rows)
      count = export.write(args.output, records)
      print(f"wrote {count} {'pairs' if args.pairs else 'rankings'} to {args.output}")
    elif args.label_command == "serve":
      import uvicorn
      from lmtrain.feedback import app
      print(f"serving on http://{args.host}:{args.port} (Ctrl-C stops)", flush=True)
      uvicorn.run(app.create_app(engine), host=args.host, port=args.port, log_level="warning")
  finally:
    engine.dispose()
