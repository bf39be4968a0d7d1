"""`lmtrain candidates` from the CLI: K responses per prompt with their source, determinism, greedy
decoding as `lmtrain sample` does it on any mesh and process count, duplicates, and bad input."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from lmtrain.feedback import candidates as candidates_lib
from util import ENV, lmtrain

TINY = ["--gin.MODEL=tiny", "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=64", "--gin.EVAL_EVERY=0",
        "--gin.EVAL_STEPS=1", "--gin.WARMUP_STEPS=1", "--gin.LEARNING_RATE=0.01"]
SFT_STEPS = 4
PROMPTS = ["Reverse the list: thread, wheel, extra, host, sort",
           "Sort alphabetically: row, date, day, size, pair",
           "What is the last word of the list: array, block, heap, tag, lock",
           "How many words are in the list: data, entry, star, zero"]
# The three record forms, with fields of their own that the output must carry through.
RECORDS = [{"prompt": PROMPTS[0], "answer": "sort, host, extra, wheel, thread", "task": "reverse"},
           {"instruction": "Sort alphabetically:", "input": "row, date, day, size, pair",
            "answer": "date, day, pair, row, size"},
           {"messages": [{"role": "user", "content": PROMPTS[2]}], "id": 7},
           {"prompt": PROMPTS[3], "response": "4"}]
SUMMARY = re.compile(r"candidates: (\d+) prompts x K=(\d+) = (\d+) responses written to (.+); "
                     r"duplicates: (\d+) resampled in (\d+) round\(s\), (\d+) left.*; "
                     r"([\d,]+) new tokens in [\d.]+s = ([\d,]+) tokens/s\n")


def write_jsonl(path, records):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  return str(path)


@pytest.fixture(scope="module")
def stage(tmp_path_factory, tokenizer_path):
  """(work dir, prompts file, plain prompts file): a tiny pretrain, then SFT on the demo tasks
  (checkpoints at steps 2 and 4), both at a learning rate that leaves the weights near their random
  start, whose greedy answers differ from prompt to prompt: a few real steps teach a tiny model one
  frequent answer for every prompt (20 pretraining and 8 SFT steps did in one CI run), which would
  leave the comparisons below unable to tell prompts apart. The
  work dir also holds bad.jsonl (a record with no prompt on line 2) and empty.jsonl."""
  workdir = str(tmp_path_factory.mktemp("candidates"))
  lmtrain("pretrain", "--workdir", workdir, *TINY, "--gin.TRAIN_STEPS=2",
          "--gin.LEARNING_RATE=1e-6", f"--gin.TOKENIZER={tokenizer_path}")
  lmtrain("sft", "--workdir", workdir, *TINY, f"--gin.TRAIN_STEPS={SFT_STEPS}",
          "--gin.LEARNING_RATE=1e-6", "--gin.CHECKPOINT_EVERY=2",
          f"--gin.TOKENIZER={tokenizer_path}")
  prompts = write_jsonl(os.path.join(workdir, "prompts.jsonl"), RECORDS)
  plain = write_jsonl(os.path.join(workdir, "plain.jsonl"), [{"prompt": p} for p in PROMPTS])
  write_jsonl(os.path.join(workdir, "bad.jsonl"), [{"prompt": "x"}, {"answer": "y"}])
  write_jsonl(os.path.join(workdir, "empty.jsonl"), [])
  return workdir, prompts, plain


def candidates(workdir, prompts, output, *flags, env=None):
  """Runs `lmtrain candidates` on the SFT stage; (records written, the summary's numbers)."""
  args = [sys.executable, "-m", "lmtrain.cli", "candidates", "--checkpoint",
          os.path.join(workdir, "sft"), "--prompts", prompts, "--output", str(output), *flags]
  proc = subprocess.run(args, env=env or ENV, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = SUMMARY.search(proc.stdout)
  assert summary, proc.stdout
  with open(output) as f:
    return [json.loads(line) for line in f], summary.groups()


def sample_completions(workdir, *flags):
  """The completions `lmtrain sample` prints for PROMPTS, in order."""
  args = ["sample", "--checkpoint", os.path.join(workdir, "sft"), *flags]
  for prompt in PROMPTS:
    args += ["--prompt", prompt]
  # Each prompt prints as "\n>>> PROMPT\nCOMPLETION\n".
  pieces = lmtrain(*args).stdout.split("\n>>> ")[1:]
  assert [piece.partition("\n")[0] for piece in pieces] == PROMPTS
  return [piece.partition("\n")[2][:-1] for piece in pieces]


def as_printed(text):
  """`text` as a subprocess's stdout read in text mode shows it (universal newlines)."""
  return text.replace("\r\n", "\n").replace("\r", "\n")


@pytest.mark.slow
def test_k_responses_per_prompt_with_their_source_and_the_records_fields(stage, tmp_path):
  workdir, prompts, _ = stage
  output = tmp_path / "c.jsonl"
  records, summary = candidates(workdir, prompts, output, "--k", "3", "--max_new_tokens", "8",
                                "--temperature", "0.9", "--top_p", "0.95", "--top_k", "50",
                                "--seed", "5")
  assert summary[:4] == ("4", "3", "12", str(output))
  assert int(summary[7].replace(",", "")) > 0 and int(summary[8].replace(",", "")) > 0
  stage_dir = os.path.join(workdir, "sft")
  with open(os.path.join(stage_dir, "lineage.json")) as f:
    lineage = json.load(f)
  assert lineage["parent"]["stage"] == "pretrain"
  source = {"checkpoint": stage_dir, "stage": "sft", "step": SFT_STEPS, "lineage": lineage,
            "sampling": {"temperature": 0.9, "top_p": 0.95, "top_k": 50, "max_new_tokens": 8,
                         "seed": 5}}
  assert [r["prompt"] for r in records] == [
      PROMPTS[0], "Sort alphabetically:\n\nrow, date, day, size, pair", PROMPTS[2], PROMPTS[3]]
  for record, given in zip(records, RECORDS):
    assert len(record["responses"]) == 3
    assert all(isinstance(text, str) for text in record["responses"])
    assert record["source"] == source
    assert {k: v for k, v in record.items() if k not in ("prompt", "responses", "source")} == {
        k: v for k, v in given.items() if k != "prompt"}
  assert any(len(set(r["responses"])) > 1 for r in records)


@pytest.mark.slow
def test_step_picks_an_earlier_checkpoint(stage, tmp_path):
  workdir, _, plain = stage
  records, _ = candidates(workdir, plain, tmp_path / "c.jsonl", "--k", "1", "--step", "2",
                          "--max_new_tokens", "2")
  assert {r["source"]["step"] for r in records} == {2}


@pytest.mark.slow
def test_the_same_seed_writes_the_same_file_and_another_seed_other_responses(stage, tmp_path):
  workdir, prompts, _ = stage
  files = {}
  for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
    files[name] = tmp_path / f"{name}.jsonl"
    candidates(workdir, prompts, files[name], "--k", "2", "--max_new_tokens", "6", "--seed", seed)
  assert files["a"].read_bytes() == files["b"].read_bytes()
  responses = {name: [r["responses"] for r in map(json.loads, open(path))]
               for name, path in files.items()}
  assert responses["a"] != responses["c"]


@pytest.mark.slow
def test_greedy_responses_are_sample_greedy_completions_on_one_and_eight_devices(stage, tmp_path):
  workdir, _, plain = stage
  eight, one = tmp_path / "eight.jsonl", tmp_path / "one.jsonl"
  records, summary = candidates(workdir, plain, eight, "--k", "2", "--max_new_tokens", "10",
                                "--temperature", "0")
  expected = sample_completions(workdir, "--max_new_tokens", "10", "--greedy")
  assert len(set(expected)) > 1  # the prompts get different answers: the comparison means something
  assert [[as_printed(t) for t in r["responses"]] for r in records] == [[e, e] for e in expected]
  # Each second response repeats the first: counted, not resampled.
  assert summary[4:7] == ("0", "0", "4")
  assert records[0]["source"]["sampling"]["temperature"] == 0.0
  candidates(workdir, plain, one, "--k", "2", "--max_new_tokens", "10", "--greedy",
             env={**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
  assert one.read_bytes() == eight.read_bytes()


def test_duplicate_slots_redraw_the_later_of_equal_responses_and_never_one_that_stayed():
  assert candidates_lib.duplicate_slots([["a", " a\n", "b", "a"], ["x", "y"]]) == [(0, 1), (0, 3)]
  # Slot 2 was drawn again and now equals slot 3, which stayed: slot 2 goes again, not 3.
  assert candidates_lib.duplicate_slots([["a", "b", "c", "c"]], redrawn=[(0, 2)]) == [(0, 2)]
  assert candidates_lib.duplicate_slots([["a", "b", "c", "c"]]) == [(0, 3)]


@pytest.mark.slow
def test_duplicates_are_drawn_again_until_they_differ(stage, tmp_path):
  workdir, prompts, _ = stage
  # Four responses of three tokens, each among the three likeliest: equal ones are common at first.
  flags = ["--k", "4", "--max_new_tokens", "3", "--top_k", "3", "--seed", "3"]
  kept, summary = candidates(workdir, prompts, tmp_path / "kept.jsonl", *flags,
                             "--max_resample", "0")
  left = int(summary[6])
  assert summary[4:6] == ("0", "0") and left > 0
  redrawn, summary = candidates(workdir, prompts, tmp_path / "redrawn.jsonl", *flags,
                                "--max_resample", "50")
  assert int(summary[4]) >= left and summary[6] == "0"
  for before, after in zip(kept, redrawn):
    assert len({t.strip() for t in after["responses"]}) == 4
    # The first draw is the same; only the repeats were replaced.
    firsts = {}
    for slot, text in enumerate(before["responses"]):
      firsts.setdefault(text.strip(), slot)
    for slot in firsts.values():
      assert after["responses"][slot] == before["responses"][slot]


@pytest.mark.slow
def test_duplicates_that_stay_equal_are_kept_and_counted(stage, tmp_path):
  workdir, prompts, _ = stage
  # Sampling among the likeliest token only: every draw is the same text, round after round.
  records, summary = candidates(workdir, prompts, tmp_path / "c.jsonl", "--k", "3",
                                "--max_new_tokens", "6", "--top_k", "1", "--max_resample", "2")
  assert summary[4:7] == (str(2 * 2 * 4), "2", str(2 * 4))
  for record in records:
    assert len(record["responses"]) == 3 and len(set(record["responses"])) == 1


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_sample_as_one_and_only_process_0_writes(stage, tmp_path):
  workdir, _, plain = stage
  flags = ["--k", "2", "--max_new_tokens", "8", "--temperature", "0"]
  candidates(workdir, plain, tmp_path / "one.jsonl", *flags)
  port = free_port()
  env = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "LMTRAIN_HEARTBEAT_TIMEOUT": "10"}
  procs = [subprocess.Popen(
      [sys.executable, "-m", "lmtrain.cli", "candidates", "--checkpoint",
       os.path.join(workdir, "sft"), "--prompts", plain, "--output", str(tmp_path / f"{i}.jsonl"),
       *flags, "--coordinator_address", f"localhost:{port}", "--num_processes", "2",
       "--process_id", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  assert (tmp_path / "0.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
  assert not (tmp_path / "1.jsonl").exists()
  assert "responses written" in outs[0] and "responses written" not in outs[1]


@pytest.mark.slow
@pytest.mark.parametrize("flags,message", [
    (["--checkpoint", "{workdir}/nope"], "--checkpoint {workdir}/nope: model.json is missing"),
    (["--k", "0"], "--k 0: must be at least 1"),
    (["--output", "{workdir}"], "--output {workdir}: cannot write there (Is a directory)"),
    (["--output", "{prompts}/c.jsonl"],
     "--output {prompts}/c.jsonl: cannot write there (Not a directory)"),
    (["--prompts", "{workdir}/empty.jsonl"], "{workdir}/empty.jsonl: no records"),
    (["--prompts", "{workdir}/bad.jsonl"], '{workdir}/bad.jsonl:2: expected "prompt"'),
    (["--top_p", "0"], "--top_p 0.0: must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature -1.0: must be 0 (greedy) or above"),
    (["--max_new_tokens", "0"], "--max_new_tokens 0: must be at least 1"),
    (["--max_resample", "-1"], "--max_resample -1: must be 0"),
    (["--step", "5"], "{workdir}/sft: no checkpoint at step 5; the steps there are 2, 4"),
])
def test_bad_input_is_one_line(stage, tmp_path, flags, message):
  workdir, prompts, _ = stage
  fill = lambda text: text.format(workdir=workdir, prompts=prompts)
  output = str(tmp_path / "c.jsonl")
  args = {"--checkpoint": os.path.join(workdir, "sft"), "--prompts": prompts, "--k": "2",
          "--output": output}
  args.update(zip(map(fill, flags[::2]), map(fill, flags[1::2])))
  proc = lmtrain("candidates", *[part for pair in args.items() for part in pair], check=False)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert proc.stderr.startswith(f"lmtrain: error: {fill(message)}"), proc.stderr
  assert proc.stderr.count("\n") == 1
  assert not os.path.exists(output)


def test_the_loop_closes_candidates_label_export_reward(stage, tmp_path, tokenizer_path):
  """SFT checkpoint -> `lmtrain candidates` -> `lmtrain label init/add-rater` -> a rater ranks every
  task in the app -> `lmtrain label export` -> `lmtrain reward` trains on the export."""
  from starlette.testclient import TestClient

  from label_fakes import Rater
  from lmtrain.feedback import app as label_app
  from lmtrain.feedback import db

  workdir, _, plain = stage
  records, _ = candidates(workdir, plain, tmp_path / "c.jsonl", "--k", "3", "--seed", "3",
                          "--max_resample", "50")
  # A record with two equal responses and one left with a single distinct one: init drops them.
  write_jsonl(tmp_path / "c.jsonl", records + [
      {"prompt": "extra", "responses": ["same", "same ", "other"]},
      {"prompt": "lonely", "responses": ["x", " x"]}])
  url = f"sqlite:///{tmp_path / 'labels.db'}"
  init = lmtrain("label", "init", "--db", url, "--candidates", str(tmp_path / "c.jsonl"),
                 "--overlap", "0").stdout
  assert "added 5 tasks (0 of them go to two raters)" in init, init
  assert "2 responses equal to another of their prompt's were left out; 1 records kept fewer than " \
         "2 distinct responses" in init, init
  link = lmtrain("label", "add-rater", "--db", url, "ann").stdout
  token = re.search(r"/rate\?token=(\S+)", link).group(1)

  engine = db.open_db(url)
  rater = Rater(TestClient(label_app.create_app(engine), base_url="http://127.0.0.1"), token)
  ranked = {}
  while rater.current()[0] is not None:
    task_id, _ = rater.current()
    k = rater.page.count('class="card"')
    ranking = [1] + [2] * (k - 2) + [3] if k > 2 else [1, 2]
    _, response = rater.rank(ranking)
    assert response.status_code == 303, response.text
    ranked[task_id] = ranking
  engine.dispose()
  assert len(ranked) == 5

  lmtrain("label", "export", "--db", url, "--output", str(tmp_path / "rankings.jsonl"))
  with open(tmp_path / "rankings.jsonl") as f:
    exported = [json.loads(line) for line in f]
  assert sorted(r["task_id"] for r in exported) == sorted(ranked)
  sft_lineage = json.load(open(os.path.join(workdir, "sft", "lineage.json")))
  from_model = [r for r in exported if r["prompt"] in {p["prompt"] for p in records}]
  assert len(from_model) == 4 and all(r["source"]["lineage"] == sft_lineage for r in from_model)
  assert all(r["rater"] == "ann" and r["ranking"] == ranked[r["task_id"]] for r in exported)

  out = lmtrain("reward", "--workdir", workdir, *TINY, "--gin.TRAIN_STEPS=4",
                f"--gin.TRAIN_DATA={tmp_path / 'rankings.jsonl'}", "--gin.NORMALIZATION=preference",
                "--gin.CHECKPOINT_EVERY=4", f"--gin.TOKENIZER={tokenizer_path}").stdout
  pairs = sum(sum(a < b for a in r["ranking"] for b in r["ranking"]) for r in exported)
  said = re.search(r"5 rankings of [\w ]+ responses \((\d+) ordered pairs\)", out)
  assert said and int(said.group(1)) == pairs, out
  # Each ranking reads up to 3 responses of SEQ_LEN tokens.
  assert "  batch       8 x 3 sequences x 64 = 1,536 tokens per step" in out, out
  rows = [json.loads(line) for line in open(os.path.join(workdir, "reward", "metrics.jsonl"))]
  assert [r["step"] for r in rows if "loss" in r][-1] == 4
  assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows if "accuracy" in r)
  lineage = json.load(open(os.path.join(workdir, "reward", "lineage.json")))
  assert lineage["parent"]["stage"] == "sft"
