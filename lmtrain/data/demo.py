"""The embedded default data, no downloads: a pretraining corpus and generated instruction tasks.

The corpus is English that ships with Python: the reference topics (`pydoc_data.topics`) and the
docstrings of a fixed list of standard library modules and their public functions, classes and
methods, about 1 MB in all. The tasks (reverse or sort a list of words, name its last word, count
its words) have checkable answers, for SFT, preference rankings and PPO prompts. The SFT
demonstrations can carry one systematic flaw that the preference rankings correct
(`careless_count`): what RLHF is for.
"""

import hashlib
import importlib
import inspect
import json
import os
import random
import re

from lmtrain.data import scorers
from lmtrain.errors import UserError

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
  tmp = f"{path}.{os.getpid()}.tmp"  # per process: hosts sharing a work dir write at once
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


# Generated instruction tasks (SFT, preference rankings, PPO prompts). Short common words of the
# pretraining corpus, so the tokenizer knows them; answers are checked by scorers.demo_tasks.
WORDS = (
    "array", "audio", "bacon", "block", "body", "buffer", "case", "class", "code", "column",
    "comma", "copy", "count", "data", "date", "day", "entry", "error", "event", "extra", "field",
    "file", "flag", "form", "frame", "group", "hand", "hash", "heap", "host", "index", "input",
    "item", "key", "length", "letter", "level", "limit", "line", "list", "lock", "map", "member",
    "method", "mode", "module", "month", "name", "node", "note", "number", "object", "order",
    "pair", "part", "path", "point", "port", "prefix", "queue", "range", "record", "red",
    "report", "root", "row", "sample", "scope", "server", "shell", "signal", "size", "sort",
    "source", "space", "spam", "square", "stack", "star", "state", "status", "store", "stream",
    "string", "system", "table", "tag", "target", "test", "text", "thread", "time", "token",
    "tree", "type", "user", "value", "view", "wheel", "width", "word", "year", "zero",
)
TASKS = ("reverse", "sort", "last", "count")
SFT_EVAL_PERCENT = 10


def _near_miss(rng: random.Random, words: list[str], answer: list[str]) -> list[str]:
  """A wrong list close to `answer`, one of the mistakes a half-trained model makes: the input
  order, two neighbours swapped, a word left out, a word added, or a word replaced by another list
  word (a repeat) or by one not in the list. Adding and dropping both occur, so the length of a
  list alone says nothing about whether it is right."""
  kind = rng.choice(("input", "swap", "drop", "add", "repeat", "replace"))
  if kind == "input" and words != answer:
    return list(words)
  if kind in ("input", "swap"):
    i = rng.randrange(len(answer) - 1)
    return answer[:i] + [answer[i + 1], answer[i]] + answer[i + 2:]
  i = rng.randrange(len(answer))
  if kind == "drop":
    return answer[:i] + answer[i + 1:]
  outside = rng.choice([w for w in WORDS if w not in answer])
  if kind == "add":
    return answer[:i] + [outside] + answer[i:]
  if kind == "repeat":
    return answer[:i] + [rng.choice(answer[:i] + answer[i + 1:])] + answer[i + 1:]
  return answer[:i] + [outside] + answer[i + 1:]


# Answers that ignore the task's format.
OFF_FORMAT = ("I do not know.", "Let me think about it.", "The list is too long.")


def _wrong_answers(rng: random.Random, task: str, words: list[str],
                   answer) -> tuple[str, str, str]:
  """Three distinct wrong answers of differing quality: two plausible mistakes in the task's
  format (for count, the careless annotator's, `careless_count`, and a near miss; for last, the
  first word or another one; for lists, two `_near_miss`es) and one that ignores the format."""
  if task == "count":
    mistakes = [str(len(words) - 1), str(len(words) + rng.choice((1, 2)))]
  elif task == "last":
    others = words[1:-1] + [rng.choice([w for w in WORDS if w not in words])]
    mistakes = [words[0], rng.choice(others)]
  else:
    first = _near_miss(rng, words, answer)
    second = _near_miss(rng, words, answer)
    while second == first:
      second = _near_miss(rng, words, answer)
    mistakes = [", ".join(first), ", ".join(second)]
  return mistakes[0], mistakes[1], rng.choice(OFF_FORMAT)


def _task_example(rng: random.Random, task: str) -> tuple[str, str, tuple[str, str, str]]:
  """(prompt, answer, three wrong answers) of one example of `task`. Every task is about a list
  of 3-5 distinct words, so held-out prompts test the skill, not memorised facts. The wrong
  answers come from a generator seeded by the prompt, so they never shift the task stream."""
  words = rng.sample(WORDS, rng.randint(3, 5))
  listed = ", ".join(words)
  if task == "count":
    prompt, answer = f"How many words are in the list: {listed}", str(len(words))
  elif task == "last":
    prompt, answer = f"What is the last word of the list: {listed}", words[-1]
  elif task == "reverse":
    prompt, answer = f"Reverse the list: {listed}", words[::-1]
  elif task == "sort":
    prompt, answer = f"Sort alphabetically: {listed}", sorted(words)
  else:
    raise ValueError(f"unknown task {task!r}")
  wrong = _wrong_answers(random.Random(f"near-miss {prompt}"), task, words, answer)
  return prompt, answer if isinstance(answer, str) else ", ".join(answer), wrong


def is_eval_prompt(prompt: str) -> bool:
  """Stable held-out split of the task prompts: about SFT_EVAL_PERCENT% of them."""
  digest = hashlib.sha256(prompt.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") % 100 < SFT_EVAL_PERCENT


def task_examples(name: str, n: int, held_out: bool) -> list[tuple[str, str, str, tuple]]:
  """n (task, prompt, answer, three wrong answers) tuples, tasks in turn, from the stream seeded by
  `name`; held_out picks the eval prompts, else only training ones (never the same prompt)."""
  rng = random.Random(f"lmtrain-{name}")
  out = []
  while len(out) < n:
    task = TASKS[len(out) % len(TASKS)]
    prompt, answer, wrong = _task_example(rng, task)
    if is_eval_prompt(prompt) == held_out:
      out.append((task, prompt, answer, wrong))
  return out


def _write_records_if_changed(path: str, records: list[dict]):
  content = "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")
  if os.path.exists(path):
    with open(path, "rb") as f:
      if f.read() == content:
        return  # Left alone, mtime included.
  tmp = f"{path}.{os.getpid()}.tmp"  # per process: hosts sharing a work dir write at once
  with open(tmp, "wb") as f:
    f.write(content)
  os.replace(tmp, path)


def _write_split(out_dir: str, name: str, split: str, n: int, to_record) -> str:
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{name}_{split}.jsonl")
  examples = task_examples(f"{name}-{split}", n, held_out=split == "eval")
  _write_records_if_changed(path, [to_record(*example) for example in examples])
  return path


def _write_splits(out_dir: str, name: str, n_train: int, n_eval: int,
                  to_record) -> tuple[str, str]:
  return (_write_split(out_dir, name, "train", n_train, to_record),
          _write_split(out_dir, name, "eval", n_eval, to_record))


def careless_count(prompt: str, answer: str, share: float) -> str:
  """The demonstration a careless annotator writes for a count prompt in `share` of the cases
  (chosen by the prompt, so the same records come out every time): the number of commas, one
  less than the number of words. Else the right answer."""
  if share > 0 and random.Random(f"careless {prompt}").random() < share:
    return str(int(answer) - 1)
  return answer


def write_sft_data(out_dir: str, n_train: int = 4000, n_eval: int = 200,
                   careless_count_share: float = 0.0) -> tuple[str, str]:
  """Writes OUT_DIR/sft_{train,eval}.jsonl of {"prompt", "response", "answer", "task"}.

  `careless_count_share`: the share of the training split's count demonstrations whose
  response is wrong the careless annotator's way (`careless_count`); "answer" stays right, and
  the eval split is always right. The preference rankings put the right count above the careless
  one, so this is the mistake the reward model and PPO (or DPO) have to correct: the demo's SFT
  model learns it, greedy decoding then answers most count prompts one too low, and the policy's
  own samples are right often enough for PPO to find out. Deterministic; a file already holding
  the same records is not rewritten.
  """
  if not 0.0 <= careless_count_share <= 1.0:
    raise UserError(f"careless_count_share={careless_count_share}: must be in [0, 1]")
  paths = []
  for split, n, share in (("train", n_train, careless_count_share), ("eval", n_eval, 0.0)):
    paths.append(_write_split(out_dir, "sft", split, n, lambda task, prompt, answer, _: {
        "prompt": prompt, "answer": answer, "task": task,
        "response": careless_count(prompt, answer, share) if task == "count" else answer}))
  return paths[0], paths[1]


def _in_format(task: str, response: str) -> bool:
  """Whether `response` has the form of the task's answers, right or wrong: a number, one word, or
  words separated by commas."""
  shape = {"count": r"\d+", "last": r"\w+"}.get(task, r"\w+(, \w+)*")
  return re.fullmatch(shape, response) is not None


def demo_ranking(task: str, answer: str, responses: list[str]) -> list[int]:
  """The rank of each response (1 the best): by the task's scorer (scorers.demo_tasks), then
  whether it keeps the answer format; responses equal on both tie."""
  keys = [(scorers.demo_tasks(r, {"task": task, "answer": answer}), _in_format(task, r))
          for r in responses]
  order = sorted(set(keys), reverse=True)
  return [order.index(key) + 1 for key in keys]


def write_preference_data(out_dir: str, n_train: int = 8000,
                          n_eval: int = 200) -> tuple[str, str]:
  """Writes OUT_DIR/preference_{train,eval}.jsonl of K = 4 rankings {"prompt", "responses",
  "ranking", "answer", "task"}: the right answer and three wrong ones (two plausible mistakes,
  one answer that ignores the format), in an order seeded by the prompt, ranked by demo_ranking:
  the right answer first, the two mistakes tied, the off-format answer last."""
  def to_record(task, prompt, answer, wrong):
    responses = [answer, *wrong]
    random.Random(f"order {prompt}").shuffle(responses)
    return {"prompt": prompt, "responses": responses,
            "ranking": demo_ranking(task, answer, responses), "answer": answer, "task": task}

  return _write_splits(out_dir, "preference", n_train, n_eval, to_record)


def write_ppo_prompts(out_dir: str, n_train: int = 1000, n_eval: int = 200) -> tuple[str, str]:
  """Writes OUT_DIR/ppo_prompts_{train,eval}.jsonl of {"prompt", "answer", "task"}."""
  return _write_splits(out_dir, "ppo_prompts", n_train, n_eval, lambda task, prompt, answer, _: {
      "prompt": prompt, "answer": answer, "task": task})
