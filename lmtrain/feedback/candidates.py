"""`lmtrain candidates`: K sampled responses per prompt from a stage's checkpoint, for raters.

Each prompt record (`{"prompt": ...}`, or an SFT record; its response, if any, is not used) becomes
one output line, in the prompts file's order:
  {"prompt": str, "responses": [K str],
   "source": {"checkpoint", "stage", "step", "lineage",
              "sampling": {"temperature", "top_p", "top_k", "max_new_tokens", "seed"}},
   ...the record's other fields ("answer", "task", ...)}
`lmtrain label init` loads these, and its export carries `source` into the reward data, so a label
names the checkpoint (and, through its lineage, the whole chain) that wrote the text. A chat record's
"prompt" is its last turn before the response (the whole chat stays in its "messages").

The K copies of each prompt are rows of the same batches of the jitted KV-cache sampler that
`lmtrain sample` uses (sample.StageSampler). Of responses to one prompt with the same text
(whitespace stripped) the first stays and the others are drawn again with fresh keys, up to
--max_resample rounds; raters learn nothing from ranking two equal texts. What is still equal after
that is kept and counted. Greedy decoding would only repeat itself, so it is not resampled.

Sampler call c draws with fold_in(PRNGKey(seed), c), so a seed gives the same file again on the same
number of batch shards; another mesh batches the rows differently, which changes the samples but not
greedy responses. Every process makes the same calls and sees every response; only process 0
writes.
"""

import itertools
import json
import os
import time

from lmtrain import fileio
from lmtrain import sample
from lmtrain.errors import UserError


def add_arguments(subparsers):
  p = subparsers.add_parser("candidates", help="K sampled responses per prompt, for raters to rank")
  p.add_argument("--checkpoint", required=True, help="a stage directory, e.g. runs/demo/sft")
  p.add_argument("--step", type=int, help="the checkpoint step to sample (default: the latest)")
  p.add_argument("--prompts", required=True,
                 help='JSONL of {"prompt": ...} records (or SFT records); other fields are kept')
  p.add_argument("--k", type=int, required=True, help="responses per prompt (at least 1)")
  p.add_argument("--output", required=True, help="the JSONL file to write")
  p.add_argument("--max_resample", type=int, default=4,
                 help="rounds of drawing duplicate responses again (0: keep them)")
  p.add_argument("--batch_size", type=int, default=64,
                 help="rows per sampler call, rounded up to fill the mesh's batch shards")
  sample.add_sampling_arguments(p)
  p.add_argument("--coordinator_address", help="multi-process runs off TPU: host:port of process 0")
  p.add_argument("--num_processes", type=int)
  p.add_argument("--process_id", type=int)


def duplicate_slots(responses: list[list[str]], redrawn=()) -> list[tuple[int, int]]:
  """(prompt, slot) of every response whose text, whitespace stripped, another response to the
  same prompt that stays already has. Of equal responses the first stays, those in `redrawn` (the
  slots just drawn again) counting after all others, so a response that stayed once never changes.
  """
  redrawn, slots = set(redrawn), []
  for i, texts in enumerate(responses):
    seen = set()
    for j in sorted(range(len(texts)), key=lambda j: (i, j) in redrawn):
      if texts[j].strip() in seen:
        slots.append((i, j))
      seen.add(texts[j].strip())
  return sorted(slots)


def _check_writable(path: str):
  """Fails now rather than after sampling when a local --output cannot be written (a bucket write
  is checked when it happens)."""
  if fileio.is_remote(path):
    return
  existed = os.path.exists(path)
  try:
    with open(path, "a", encoding="utf-8"):
      pass
  except OSError as e:
    raise UserError(f"--output {path}: cannot write there ({e.strerror})") from None
  if not existed:
    os.remove(path)


def _write(path: str, text: str):
  """Writes `text` whole: locally through a temporary file renamed over `path`, so an interrupted
  run never leaves half a file for `lmtrain label init` to load."""
  if fileio.is_remote(path):
    fileio.write_text(path, text)
    return
  partial = f"{path}.partial"
  try:
    with open(partial, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(partial, path)
  except OSError as e:
    raise UserError(f"--output {path}: cannot write there ({e.strerror})") from None


def run(args):
  temperature, greedy = sample.check_sampling(args)
  if args.k < 1:
    raise UserError(f"--k {args.k}: must be at least 1")
  if args.max_resample < 0:
    raise UserError(f"--max_resample {args.max_resample}: must be 0 (keep duplicates) or above")
  if args.batch_size < 1:
    raise UserError(f"--batch_size {args.batch_size}: must be at least 1")
  import jax
  from lmtrain.data import sft as sft_data
  writer = jax.process_index() == 0
  if writer:
    _check_writable(args.output)
  examples = list(sft_data.iter_sft_records(args.prompts, training=False))
  model = sample.StageSampler(args.checkpoint, args.chat, args.step)
  if model.cfg.head != "lm":
    raise UserError(f"--checkpoint {model.stage_dir}: a {model.lineage['stage']} model scores "
                    f"text and writes none; give a stage with a language-model head (e.g. sft)")
  ids = [model.encode(example.prompt_turns) for example in examples]
  k = args.k
  rows = [(i, j) for i in range(len(examples)) for j in range(k)]
  batch_size = model.batch_size(min(args.batch_size, len(rows)))
  calls = -(-len(rows) // batch_size)
  if writer:
    print(f"candidates: {len(examples)} prompts x {k} from {model.lineage['stage']} step "
          f"{model.step} ({model.stage_dir}), {calls} sampler call(s) of {batch_size} rows")
  sampler = model.sampler(batch_size, max(map(len, ids)), max_new_tokens=args.max_new_tokens,
                          temperature=temperature, top_k=args.top_k, top_p=args.top_p,
                          greedy=greedy)
  seed_key = jax.random.PRNGKey(args.seed)
  keys = (jax.random.fold_in(seed_key, c) for c in itertools.count())
  responses = [[""] * k for _ in examples]

  def draw(slots) -> int:
    """Samples a response for each (prompt, slot), in batches; returns the tokens generated."""
    tokens = 0
    for start in range(0, len(slots), batch_size):
      chunk = slots[start:start + batch_size]
      for (i, j), completion in zip(chunk, sampler([ids[i] for i, _ in chunk], next(keys))):
        responses[i][j] = completion.text
        tokens += completion.tokens
    return tokens

  started = time.perf_counter()
  new_tokens = draw(rows)
  duplicates, resampled, rounds = duplicate_slots(responses), 0, 0
  while duplicates and not greedy and rounds < args.max_resample:
    rounds += 1
    resampled += len(duplicates)
    new_tokens += draw(duplicates)
    duplicates = duplicate_slots(responses, duplicates)
  seconds = time.perf_counter() - started
  if not writer:
    return

  sampling = {"temperature": 0.0 if greedy else temperature, "top_p": args.top_p,
              "top_k": args.top_k, "max_new_tokens": args.max_new_tokens, "seed": args.seed}
  source = {"checkpoint": model.stage_dir, "stage": model.lineage["stage"], "step": int(model.step),
            "lineage": model.lineage, "sampling": sampling}
  lines = []
  for example, texts in zip(examples, responses):
    others = {key: value for key, value in example.record.items()
              if key not in ("prompt", "responses", "source")}
    record = {"prompt": example.prompt_turns[-1][1], "responses": texts, "source": source,
              **others}
    lines.append(json.dumps(record, ensure_ascii=False) + "\n")
  _write(args.output, "".join(lines))
  left = f"{len(duplicates)} left in the file though equal"
  if greedy:
    left += " (greedy decoding repeats itself: not resampled)"
  print(f"candidates: {len(examples)} prompts x K={k} = {len(rows)} responses written to "
        f"{args.output}; duplicates: {resampled} resampled in {rounds} round(s), {left}; "
        f"{new_tokens:,} new tokens in {seconds:.2f}s = {new_tokens / seconds:,.0f} tokens/s")
