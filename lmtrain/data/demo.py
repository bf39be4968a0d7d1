"""The embedded default pretraining corpus: English that ships with Python, no downloads.

The Python reference topics (`pydoc_data.topics`) and the docstrings of a fixed list of standard
library modules and their public functions, classes and methods, about 1 MB in all.
"""

import hashlib
import importlib
import inspect
import json
import os
import re

# Sorted and fixed so the corpus is the same on every run of a given Python.
MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "bz2", "calendar", "cmd", "codecs",
    "collections", "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "doctest", "email", "enum", "filecmp", "fnmatch", "fractions",
    "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html",
    "html.parser", "http.client", "http.server", "imaplib", "inspect", "io", "ipaddress",
    "itertools", "json", "locale", "logging", "lzma", "mailbox", "math", "mimetypes",
    "multiprocessing", "numbers", "operator", "optparse", "os", "os.path", "pathlib", "pdb",
    "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint", "profile", "pydoc", "queue",
    "random", "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal",
    "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics", "string", "struct",
    "subprocess", "sys", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "token",
    "tokenize", "trace", "traceback", "types", "typing", "unittest", "urllib.parse",
    "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile", "zlib",
)

MIN_CHARS = 200
EVAL_PERCENT = 5


def _clean(text: str) -> str:
  """Dedents, strips trailing spaces and collapses runs of blank lines."""
  text = inspect.cleandoc(text)
  text = "\n".join(line.rstrip() for line in text.splitlines())
  return re.sub(r"\n{3,}", "\n\n", text).strip()


def _docstrings():
  seen = set()
  for module_name in MODULES:
    try:
      module = importlib.import_module(module_name)
    except ImportError:  # E.g. sqlite3 or ssl missing from a minimal Python build.
      continue
    objects = [(module_name, module)]
    for attr in sorted(getattr(module, "__all__", None) or dir(module)):
      obj = getattr(module, attr, None)
      # Only what the module defines: re-exports may carry docs other packages patched in.
      if (not attr.startswith("_") and getattr(obj, "__module__", None) == module.__name__
          and (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj))):
        objects.append((f"{module_name}.{attr}", obj))
        if inspect.isclass(obj):
          objects.extend((f"{module_name}.{attr}.{key}", value)
                         for key, value in sorted(vars(obj).items())
                         if not key.startswith("_")
                         and (inspect.isroutine(value) or isinstance(value, property)))
    for name, obj in objects:
      doc = obj.__doc__
      # Re-exported and inherited docstrings appear once.
      if isinstance(doc, str) and doc not in seen:
        seen.add(doc)
        yield f"{name}\n\n{_clean(doc)}"


def documents() -> list[str]:
  """All corpus documents (at least MIN_CHARS each), in a fixed order."""
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  docs = [_clean(topics.topics[key]) for key in sorted(topics.topics)]
  docs.extend(_docstrings())
  return [doc for doc in docs if len(doc) >= MIN_CHARS]


def is_eval(text: str) -> bool:
  """Stable held-out split: about EVAL_PERCENT% of documents, chosen by a hash of the text."""
  digest = hashlib.sha256(text.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") % 100 < EVAL_PERCENT


def _write_jsonl(path: str, docs: list[str]):
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for doc in docs:
      f.write(json.dumps({"text": doc}) + "\n")
  os.replace(tmp, path)  # Atomic, so a half-written file never counts as present.


def write_pretrain_corpus(out_dir: str) -> tuple[str, str]:
  """Writes OUT_DIR/pretrain_{train,eval}.jsonl unless both exist; returns their paths."""
  train_path = os.path.join(out_dir, "pretrain_train.jsonl")
  eval_path = os.path.join(out_dir, "pretrain_eval.jsonl")
  if not (os.path.exists(train_path) and os.path.exists(eval_path)):
    os.makedirs(out_dir, exist_ok=True)
    docs = documents()
    _write_jsonl(train_path, [d for d in docs if not is_eval(d)])
    _write_jsonl(eval_path, [d for d in docs if is_eval(d)])
  return train_path, eval_path
