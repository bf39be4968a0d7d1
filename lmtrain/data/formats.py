"""Record reading and validation. Every bad record is reported as `FILE:LINE: what is wrong`.

Text, JSONL and array_record files are read here, local or gs://; text and JSONL also as .gz/.zst. A record schema is a function from the parsed
JSON object to a value that raises `BadRecord` with what is wrong; `iter_records` does the rest
(location, stop-or-skip), so the SFT and preference schemas can plug in the same way.
"""

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator, TypeVar

from lmtrain import fileio
from lmtrain.data import sources
from lmtrain.errors import UserError

T = TypeVar("T")

JSON_EXTENSIONS = (".jsonl", ".json")
ARRAY_RECORD_EXTENSION = ".array_record"
_READ_BLOCK = 1024  # array_record records read per call.


class BadRecord(ValueError):
  """Raised by a schema for a record it rejects; the message says what is wrong."""


@dataclasses.dataclass
class SkipCounter:
  """Counts the records skipped with on_error="skip"; keeps the first few messages to show."""

  count: int = 0
  messages: list[str] = dataclasses.field(default_factory=list)
  max_messages: int = 10

  def add(self, message: str):
    self.count += 1
    if len(self.messages) < self.max_messages:
      self.messages.append(message)


def require_str(record: dict[str, Any], field: str) -> str:
  """The string value of `field`; the generic check every schema uses."""
  if field not in record:
    raise BadRecord(f'missing "{field}" field')
  value = record[field]
  if not isinstance(value, str):
    raise BadRecord(f'"{field}" must be a string, got {type(value).__name__}')
  return value


def text_schema(record: dict[str, Any]) -> str:
  return require_str(record, "text")


def _parse_json_object(data: bytes) -> dict[str, Any]:
  try:
    obj = json.loads(data)
  except json.JSONDecodeError as e:
    raise BadRecord(f"invalid JSON ({e.msg} at column {e.colno})") from e
  except UnicodeDecodeError as e:
    raise BadRecord(f"invalid UTF-8 at byte {e.start}") from e
  if not isinstance(obj, dict):
    raise BadRecord(f"expected a JSON object, got {type(obj).__name__}")
  return obj


def _check_on_error(on_error: str):
  if on_error not in ("raise", "skip"):
    raise UserError(f'on_error must be "raise" or "skip", got {on_error!r}')


def _local_copy(path: str) -> tuple[str, str | None]:
  """(a local path to read `path` from, a temp dir to delete after) : array_record reads local
  files only, so a bucket object is downloaded first."""
  if not fileio.is_remote(path):
    return path, None
  tmp = tempfile.mkdtemp(prefix="lmtrain-read-")
  local = os.path.join(tmp, os.path.basename(path))
  with sources.open_binary(path) as src, open(local, "wb") as dst:
    shutil.copyfileobj(src, dst)
  return local, tmp


def _raw_records(path: str) -> Iterator[tuple[str, Any]]:
  """Yields (location, raw JSON line or bytes) for JSONL and array_record files."""
  if path.endswith(ARRAY_RECORD_EXTENSION):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    local, tmp = _local_copy(path)
    reader = array_record_module.ArrayRecordReader(local)
    try:
      total = reader.num_records()
      for start in range(0, total, _READ_BLOCK):
        for i, data in enumerate(reader.read(start, min(start + _READ_BLOCK, total)), start):
          yield f"{path}:RECORD {i + 1}", data
    finally:
      reader.close()
      if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return
  # Bytes, so that invalid UTF-8 is reported as a bad record of its line.
  with sources.open_binary(path) as f:
    for lineno, line in enumerate(f, start=1):
      if line.strip():
        yield f"{path}:{lineno}", line.strip()


def _check_file(path: str):
  if not fileio.isfile(path):
    raise UserError(f"{path}: file not found")


def _finish(path: str, good: int, skipped: int, first_bad: str | None = None):
  if good == 0:
    detail = f" ({skipped} bad records skipped" + (
        f"; the first: {first_bad})" if first_bad else ")") if skipped else ""
    raise UserError(f"{path}: no records{detail}")


class _Tally:
  """A file's good and skipped records; a skipped one is logged and counted (on_error='skip')."""

  def __init__(self, counter: SkipCounter | None, log_skips: bool):
    self.good = self.skipped = 0
    self.first_bad = None
    self._counter, self._log = counter, log_skips

  def skip(self, message: str):
    self.skipped += 1
    self.first_bad = self.first_bad or message
    if self._log:
      logging.warning("skipping bad record: %s", message)
    if self._counter is not None:
      self._counter.add(message)

  def finish(self, path: str):
    _finish(path, self.good, self.skipped, self.first_bad)


def iter_records(path: str, schema: Callable[[dict[str, Any]], T], *, on_error: str = "raise",
                 counter: SkipCounter | None = None, log_skips: bool = True) -> Iterator[T]:
  """Yields `schema(obj)` for each JSON object record of a JSONL or array_record file.

  on_error="raise" stops at the first bad record with a UserError `FILE:LINE: what is wrong`;
  "skip" logs it, adds it to `counter` and goes on.
  """
  _check_on_error(on_error)
  _check_file(path)
  tally = _Tally(counter, log_skips)
  for location, raw in _raw_records(path):
    try:
      value = schema(_parse_json_object(raw))
    except BadRecord as e:
      message = f"{location}: {e}"
      if on_error == "raise":
        raise UserError(message) from None
      tally.skip(message)
      continue
    tally.good += 1
    yield value
  tally.finish(path)


def _iter_plain_text(path: str, on_error: str = "raise", counter: SkipCounter | None = None,
                     log_skips: bool = True) -> Iterator[str]:
  """Documents of a plain text file: paragraphs separated by one or more blank lines. A line that is
  not UTF-8, or holds a NUL byte (a binary file), is a bad record `FILE:LINE`: on_error="skip"
  leaves out its paragraph and counts it."""
  _check_file(path)
  tally = _Tally(counter, log_skips)
  lines, bad = [], None

  def end_paragraph():
    nonlocal lines, bad
    text, problem = "\n".join(lines), bad
    lines, bad = [], None
    if problem is None:
      tally.good += 1
      return text
    tally.skip(problem)
    return None

  with sources.open_binary(path) as f:
    for lineno, raw in enumerate(f, start=1):
      try:
        if b"\0" in raw:
          raise BadRecord("binary data (a NUL byte); pretraining text must be UTF-8")
        line = raw.decode("utf-8")
      except (BadRecord, UnicodeDecodeError) as e:
        problem = (f"{path}:{lineno}: invalid UTF-8 at byte {e.start}"
                   if isinstance(e, UnicodeDecodeError) else f"{path}:{lineno}: {e}")
        if on_error == "raise":
          raise UserError(problem) from None
        bad = bad or problem
        lines.append("")
        continue
      if line.strip():
        lines.append(line.rstrip("\r\n"))
      elif lines:
        text = end_paragraph()
        if text is not None:
          yield text
  if lines:
    text = end_paragraph()
    if text is not None:
      yield text
  tally.finish(path)


def iter_text_records(path: str, *, on_error: str = "raise", counter: SkipCounter | None = None,
                      log_skips: bool = True) -> Iterator[str]:
  """Yields the documents of a pretraining file (.jsonl/.json, .array_record, or plain text;
  .gz/.zst compressed text and JSONL too)."""
  kind = sources.strip_compression(path)
  if kind.endswith(JSON_EXTENSIONS) or kind.endswith(ARRAY_RECORD_EXTENSION):
    return iter_records(path, text_schema, on_error=on_error, counter=counter,
                        log_skips=log_skips)
  _check_on_error(on_error)
  return _iter_plain_text(path, on_error, counter, log_skips)
