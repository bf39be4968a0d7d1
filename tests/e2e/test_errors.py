"""Every bad input ends in one `lmtrain: error:` line on stderr and exit code 1, through the real CLI.

Each case is a subprocess (a few seconds of imports), so the cases share one corpus and tokenizers.
"""

import hashlib
import json
import os
import random
import subprocess
import sys

import pytest

from lmtrain.data import tokenizer as tokenizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = ["--gin.MODEL=tiny", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=32"]


def run_cli(*args, timeout=300):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "lmtrain.cli", *map(str, args)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def error_line(result) -> str:
  """The one error line; fails unless it is alone on stderr, exit 1, with no traceback."""
  assert "Traceback" not in result.stderr, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("lmtrain: error: "), result.stderr
  assert result.returncode == 1, (result.returncode, result.stderr)
  return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """A small JSONL corpus of made-up words (enough distinct pieces for a 600-piece vocab)."""
  root = tmp_path_factory.mktemp("data")
  rng = random.Random(0)
  syllables = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]
  corpus = root / "corpus.jsonl"
  with open(corpus, "w") as f:
    for _ in range(40):
      words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(40)]
      f.write(json.dumps({"text": " ".join(words) + "."}) + "\n")
  tok300 = tokenizer_lib.train_tokenizer([str(corpus)], 300, str(root / "tok300.model"))
  tok600 = tokenizer_lib.train_tokenizer([str(corpus)], 600, str(root / "tok600.model"))
  return {"root": root, "corpus": corpus, "tok300": tok300, "tok600": tok600}


def stage_args(data, workdir, *extra, train_data=None, tokenizer=None):
  return ["pretrain", "--workdir", workdir, *SMALL,
          f"--gin.TRAIN_DATA={train_data or data['corpus']}",
          f"--gin.TOKENIZER={tokenizer or data['tok300']}", *extra]


def test_mesh_does_not_fit_devices(data, tmp_path):
  line = error_line(run_cli(*stage_args(
      data, tmp_path / "run", "--gin.MESH_SHAPE={'data': 3, 'fsdp': 1, 'tensor': 1}")))
  assert "MESH_SHAPE=" in line
  assert "needs 3 devices but 8 are available" in line


def test_missing_data_file(data, tmp_path):
  missing = tmp_path / "nope.jsonl"
  line = error_line(run_cli(*stage_args(data, tmp_path / "run", train_data=missing)))
  assert line == f"lmtrain: error: {missing}: file not found"


def test_empty_data_file(data, tmp_path):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n\n")  # blank lines only: still no records
  line = error_line(run_cli(*stage_args(data, tmp_path / "run", train_data=empty)))
  assert line == f"lmtrain: error: {empty}: no records"


def test_malformed_jsonl_names_file_and_line(data, tmp_path):
  bad = tmp_path / "bad.jsonl"
  # The blank line 3 still counts: the number is the line in the file as an editor shows it.
  bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n\n{"text": broken}\n{"text": "ok"}\n')
  line = error_line(run_cli(*stage_args(data, tmp_path / "run", train_data=bad)))
  assert line.startswith(f"lmtrain: error: {bad}:4: invalid JSON")


def test_tokenizer_larger_than_model_vocab(data, tmp_path):
  line = error_line(run_cli(*stage_args(data, tmp_path / "run", tokenizer=data["tok600"])))
  assert f"tokenizer {data['tok600']} has 600 pieces" in line
  assert "vocab_size is 512" in line


def test_unknown_macro_suggests_close_match(data, tmp_path):
  line = error_line(run_cli(*stage_args(data, tmp_path / "run", "--gin.TRAIN_STEP=3")))
  assert line.startswith("lmtrain: error: --gin.TRAIN_STEP: unknown macro; did you mean TRAIN_STEPS")


@pytest.mark.parametrize("binding, expected", [
    ("LoopConfg.train_steps = 3",
     "unknown gin configurable 'LoopConfg'; did you mean LoopConfig"),
    ("LoopConfig.train_step = 3",
     "'LoopConfig' has no parameter 'train_step'; did you mean train_steps"),
], ids=["configurable", "parameter"])
def test_unknown_gin_param_suggests_close_match(data, tmp_path, binding, expected):
  line = error_line(run_cli(*stage_args(data, tmp_path / "run", "--gin_param", binding)))
  assert f"--gin_param {binding!r}" in line
  assert expected in line


def test_unwritable_workdir(data, tmp_path):
  # Tests run as root, where permissions do not stop writes; a parent that is a file does.
  (tmp_path / "afile").write_text("not a directory\n")
  workdir = tmp_path / "afile" / "run"
  line = error_line(run_cli(*stage_args(data, workdir)))
  assert line.startswith(f"lmtrain: error: --workdir {workdir}: cannot write there")


def test_unknown_model_suggests_preset(data, tmp_path):
  line = error_line(run_cli(*stage_args(data, tmp_path / "run", "--gin.MODEL=tinyy")))
  assert "MODEL='tinyy' is not a preset" in line
  assert "did you mean ['tiny']" in line


def test_batch_not_divisible_by_mesh(data, tmp_path):
  line = error_line(run_cli(*stage_args(data, tmp_path / "run", "--gin.BATCH_SIZE=6")))
  assert "BATCH_SIZE=6" in line
  assert "not divisible by the data x fsdp mesh size 8" in line


def _snapshot(directory) -> dict:
  """Relative path -> sha256 of every file under `directory`."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.mark.slow
def test_bad_config_on_rerun_keeps_checkpoint(data, tmp_path):
  workdir = tmp_path / "run"
  first = run_cli(*stage_args(data, workdir))
  assert first.returncode == 0, first.stderr
  stage_dir = workdir / "pretrain"
  assert os.listdir(stage_dir / "checkpoints") == ["2"]
  before = _snapshot(stage_dir)

  # Fails after the stage dir is opened: the mesh does not take the batch.
  line = error_line(run_cli(*stage_args(data, workdir, "--gin.TRAIN_STEPS=4",
                                        "--gin.BATCH_SIZE=6")))
  assert "BATCH_SIZE=6" in line
  assert _snapshot(stage_dir) == before

  # Fails at restore: the checkpoint is of another model shape.
  line = error_line(run_cli(*stage_args(data, workdir, "--gin.TRAIN_STEPS=4",
                                        "--gin.MODEL=bench_tiny")))
  assert "checkpoint does not fit the model" in line
  assert "vocab size 512 in the checkpoint vs 8000 in the model config" in line
  assert _snapshot(stage_dir) == before


@pytest.mark.parametrize("args, expected", [
    ([], "the following arguments are required"),
    (["pretrain", "--workdir", "x", "--no_such_flag"], "unrecognized arguments: --no_such_flag"),
], ids=["no_subcommand", "unknown_flag"])
def test_usage_errors_exit_2(args, expected):
  result = run_cli(*args)
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("lmtrain: error: ")
  assert expected in result.stderr


HANGING_RUN = """
import json, sys, time
from lmtrain import config
from lmtrain.model import transformer
from lmtrain.stages import pretrain
from lmtrain.train import loop
workdir, corpus, tok = sys.argv[1:4]
text = config.setup("pretrain", macros={
    "MODEL": "tiny", "TRAIN_STEPS": "6", "BATCH_SIZE": "8", "SEQ_LEN": "32",
    "CHECKPOINT_EVERY": "2", "EVAL_EVERY": "0", "HANG_TIMEOUT": "3", "TRAIN_DATA": repr(corpus), "TOKENIZER": repr(tok)})
stage = pretrain.build(workdir, transformer.model_config(), loop.LoopConfig())
make = stage.train_data


class Stalls:  # the third batch never comes, as from a host stuck in a collective
  def __init__(self, it):
    self.it, self.n = it, 0
  def __next__(self):
    self.n += 1
    if self.n == 3:
      time.sleep(600)
    return next(self.it)
  def get_state(self):  # bytes: the checkpointer stores a non-grain iterator's state raw
    return json.dumps(self.it.get_state()).encode()
  def set_state(self, state):
    self.it.set_state(json.loads(state.decode()))


stage.train_data = lambda i, n: Stalls(make(i, n))
loop.train(stage, workdir, loop.LoopConfig(), text)
"""


def test_a_hung_step_exits_with_code_4_and_keeps_the_checkpoint(data, tmp_path):
  script = tmp_path / "hang.py"
  script.write_text(HANGING_RUN)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), str(data["corpus"]),
                           str(data["tok300"])], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 4, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("lmtrain: error: pretrain: step 2 (last checkpoint: step 2): no progress"
                         " for "), last
  assert "LoopConfig.hang_timeout_s=3" in last
  assert os.listdir(tmp_path / "run" / "pretrain" / "checkpoints") == ["2"]


def test_a_run_that_cannot_fit_device_memory_is_refused_before_allocating(data, tmp_path):
  workdir = str(tmp_path / "w")
  line = error_line(run_cli(*stage_args(data, workdir, "--gin_param",
                                        "LoopConfig.device_memory_gib = 0.0001")))
  assert line.startswith("lmtrain: error: pretrain: needs about ")
  assert "per device but a cpu has 0.0001 GiB" in line and "lmtrain plan" in line
  assert "LoopConfig.check_memory=False" in line
  assert not os.path.exists(os.path.join(workdir, "pretrain", "checkpoints", "0"))
  ok = run_cli(*stage_args(data, workdir, "--gin_param", "LoopConfig.device_memory_gib = 0.0001",
                           "--gin_param", "LoopConfig.check_memory = False"))
  assert ok.returncode == 0, ok.stderr[-2000:]


@pytest.mark.parametrize("macro, expected", [
    ("--gin.BATCH_SIZE=abc", "BATCH_SIZE='abc': must be a whole number"),
    ("--gin.HANG_TIMEOUT=abc", "HANG_TIMEOUT='abc': must be a number"),
], ids=["BATCH_SIZE", "HANG_TIMEOUT"])
def test_a_wrong_type_setting_is_refused_before_anything_runs(data, tmp_path, macro, expected):
  line = error_line(run_cli(*stage_args(data, tmp_path / "run", macro)))
  assert expected in line
  assert not (tmp_path / "run" / "pretrain").exists()


def test_a_second_run_on_a_stage_directory_in_use_is_refused(data, tmp_path):
  from lmtrain.train.lock import StageLock
  stage_dir = tmp_path / "run" / "pretrain"
  stage_dir.mkdir(parents=True)
  with StageLock(str(stage_dir)):  # as a run in progress holds it
    line = error_line(run_cli(*stage_args(data, tmp_path / "run")))
  assert "another run is using this stage directory" in line
  assert f"pid {os.getpid()}" in line
  assert not (stage_dir / "checkpoints").exists()


def test_a_child_stage_refuses_a_parent_trained_with_another_tokenizer(data, tmp_path):
  from lmtrain.errors import UserError
  from lmtrain.train import checkpoint as ckpt_lib
  parent = tmp_path / "pretrain"
  parent.mkdir()
  lineage = ckpt_lib.write_lineage(str(parent), "pretrain", "", tokenizer=data["tok300"])
  assert lineage["tokenizer_sha256"] == hashlib.sha256(open(data["tok300"], "rb").read()).hexdigest()
  ckpt_lib.check_parent_tokenizer(str(parent), data["tok300"])  # the same: fine
  with pytest.raises(UserError, match=r"trained with tokenizer .*tok300.model \(sha256 .*\), but "
                                      r"this run's TOKENIZER .*tok600.model has sha256"):
    ckpt_lib.check_parent_tokenizer(str(parent), data["tok600"])


def test_help_version_and_usage_errors_answer_without_importing_jax():
  probe = ("import sys\nfrom lmtrain import cli\nfor argv in (['--help'], ['--version'], "
           "['pretrain']):\n  try:\n    cli.main(argv)\n  except SystemExit:\n    pass\n"
           "print('jax imported:', 'jax' in sys.modules)\n")
  result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
  assert "jax imported: False" in result.stdout, result.stdout + result.stderr
  import lmtrain
  assert f"lmtrain {lmtrain.__version__}" in result.stdout  # --version
  assert "the following arguments are required: --workdir" in result.stderr
