"""The rater web app (Starlette, server-rendered Jinja templates, one small script).

Pages:
  GET  /rate?token=T   a rater's link: the token moves into an HttpOnly cookie and the page
                       redirects to /rate, so the token leaves the address bar and history
  GET  /rate           the rater's open task (or "all done"), with their progress
  POST /rate           a ranking or a skip; committed before the 303 back to /rate acknowledges it
  GET  /mine           the rater's own labels (a rater sees no one else's)
  GET  /admin?token=T  the admin page: counts per rater, agreement on the overlapped tasks
  GET  /admin/export   the rankings as JSONL (?pairs=1: pairwise records)

Security: every page needs a token (401 without one, 403 for the wrong kind); templates autoescape
(model text is untrusted) and pass nothing into script; every POST carries the rater's CSRF token;
the headers forbid inline script, framing and Referer (the link holds the token).
"""

import json
import os
import secrets
from typing import Any

import jinja2
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from lmtrain.feedback import agreement, db, export

HERE = os.path.dirname(os.path.abspath(__file__))
RATER_COOKIE = "lmtrain_rater"
ADMIN_COOKIE = "lmtrain_admin"
SECURITY_HEADERS = {
    "content-security-policy": ("default-src 'none'; script-src 'self'; style-src 'self'; "
                                "img-src 'self'; form-action 'self'; frame-ancestors 'none'; "
                                "base-uri 'none'"),
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "cache-control": "no-store",
}

_templates = jinja2.Environment(loader=jinja2.FileSystemLoader(os.path.join(HERE, "templates")),
                                autoescape=True, undefined=jinja2.StrictUndefined)


def _page(name: str, status_code: int = 200, **context) -> HTMLResponse:
  return HTMLResponse(_templates.get_template(name).render(**context), status_code=status_code)


def _error(status: int, message: str) -> HTMLResponse:
  return _page("error.html", status, status=status, message=message)


class SecurityHeaders:
  """ASGI middleware: the security headers on every response, static files and errors included."""

  def __init__(self, app):
    self.app = app

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)

    async def send_with_headers(message):
      if message["type"] == "http.response.start":
        headers = [(k, v) for k, v in message.get("headers", [])
                   if k.decode("latin-1").lower() not in SECURITY_HEADERS]
        headers += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
        message = {**message, "headers": headers}
      await send(message)

    return await self.app(scope, receive, send_with_headers)


def _login_redirect(request: Request, path: str, cookie: str, token: str) -> Response:
  response = RedirectResponse(path, status_code=303)
  # Lax, not Strict: browsers leave a Strict cookie off requests that began on another site (the
  # link in a mail), which can include the redirect right after this login. Cross-site POSTs go
  # without a Lax cookie too, and the CSRF token guards them anyway.
  response.set_cookie(cookie, token, httponly=True, samesite="lax",
                      secure=request.url.scheme == "https", path="/")
  return response


def _parse_submission(form, k: int) -> dict[str, Any]:
  """ranking/scores/flags from the form fields; raises BadSubmission for malformed ones."""
  raw = str(form.get("ranking", "")).strip()
  try:
    ranking = [int(r) for r in raw.split(",")] if raw else []
  except ValueError:
    raise db.BadSubmission(f"the ranking {raw[:40]!r} is not a comma-separated list of "
                           "ranks") from None
  scores = []
  for i in range(k):
    value = str(form.get(f"score_{i}", "")).strip()
    if value and value not in {str(s) for s in range(1, 8)}:
      raise db.BadSubmission(f"the score of response {i + 1} must be 1-7 or empty, got "
                             f"{value[:20]!r}")
    scores.append(int(value) if value else None)
  flags = {name: [form.get(f"flag_{name}_{i}") == "on" for i in range(k)] for name in db.FLAGS}
  return {"ranking": ranking, "scores": scores, "flags": flags}


def create_app(engine: sa.engine.Engine) -> Starlette:
  """The app over a migrated database (db.open_db)."""

  async def current_rater(request: Request):
    token = request.cookies.get(RATER_COOKIE)
    if not token:
      return None, _error(401, "No rater token: open the personal link you were given.")
    rater = await run_in_threadpool(db.rater_by_token, engine, token)
    if rater is None:
      return None, _error(401, "This rater link is not valid (it may have been replaced): ask "
                               "the admin for a new one.")
    return rater, None

  async def admin_check(request: Request):
    token = request.cookies.get(ADMIN_COOKIE)
    if not token:
      if request.cookies.get(RATER_COOKIE):
        return _error(403, "This page needs the admin link; a rater link does not open it.")
      return _error(401, "No admin token: open the admin link that `lmtrain label init` printed.")
    if not await run_in_threadpool(db.is_admin_token, engine, token):
      return _error(403, "This admin link is not valid (a later `lmtrain label init` replaces "
                         "it).")
    return None

  async def rate(request: Request):
    if "token" in request.query_params:
      return _login_redirect(request, "/rate", RATER_COOKIE, request.query_params["token"])
    rater, failure = await current_rater(request)
    if failure:
      return failure
    task = await run_in_threadpool(db.next_task, engine, rater.id)
    done, total = await run_in_threadpool(db.progress, engine, rater.id)
    saved = request.query_params.get("saved", "")
    return _page("rate.html", rater=rater.name, task=task, done=done, total=total,
                 csrf=rater.csrf_token, flags=db.FLAGS, saved=saved if saved.isdigit() else "")

  async def submit(request: Request):
    rater, failure = await current_rater(request)
    if failure:
      return failure
    form = await request.form()
    if not secrets.compare_digest(str(form.get("csrf", "")).encode(), rater.csrf_token.encode()):
      return _error(403, "Missing or wrong CSRF token: reload the page and submit again.")
    try:
      task_id = int(str(form.get("task_id", "")))
    except ValueError:
      return _error(400, "The submission names no task (task_id).")
    task = await run_in_threadpool(db.assigned_task, engine, rater.id, task_id)
    if task is None:
      return _error(400, f"Task {task_id} is not assigned to you.")
    try:
      if form.get("action") == "skip":
        await run_in_threadpool(db.submit, engine, rater.id, task_id, ranking=None)
      else:
        fields = _parse_submission(form, len(task["responses"]))
        await run_in_threadpool(lambda: db.submit(engine, rater.id, task_id, **fields))
    except db.BadSubmission as e:
      return _error(400, f"Task {task_id}: {e}.")
    return RedirectResponse(f"/rate?saved={task_id}", status_code=303)

  async def mine(request: Request):
    rater, failure = await current_rater(request)
    if failure:
      return failure
    rows = await run_in_threadpool(db.rater_labels, engine, rater.id)
    return _page("mine.html", rater=rater.name, labels=rows)

  async def admin(request: Request):
    if "token" in request.query_params:
      return _login_redirect(request, "/admin", ADMIN_COOKIE, request.query_params["token"])
    failure = await admin_check(request)
    if failure:
      return failure
    totals = await run_in_threadpool(db.counts, engine)
    stats = agreement.summary(await run_in_threadpool(db.all_labels, engine))
    return _page("admin.html", totals=totals, stats=stats)

  async def export_download(request: Request):
    failure = await admin_check(request)
    if failure:
      return failure
    pairs = request.query_params.get("pairs") == "1"
    rows = await run_in_threadpool(db.all_labels, engine)
    records = export.pair_records(rows) if pairs else export.ranking_records(rows)
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    name = "pairs.jsonl" if pairs else "rankings.jsonl"
    return Response(body, media_type="application/x-ndjson",
                    headers={"content-disposition": f'attachment; filename="{name}"'})

  async def home(request: Request):
    return _error(401, "No rater token: open the personal link you were given (it ends in ?token=...).")

  routes = [
      Route("/", home),
      Route("/rate", rate, methods=["GET"]),
      Route("/rate", submit, methods=["POST"]),
      Route("/mine", mine),
      Route("/admin", admin),
      Route("/admin/export", export_download),
      Mount("/static", StaticFiles(directory=os.path.join(HERE, "static")), name="static"),
  ]
  return Starlette(routes=routes, middleware=[Middleware(SecurityHeaders)])
