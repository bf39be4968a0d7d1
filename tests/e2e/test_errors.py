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


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
  """A finished 4-step run with checkpoints 2 and 4; tests take a copy (`copy_of`)."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  first = run_cli(*stage_args(data, workdir, "--gin.TRAIN_STEPS=4", "--gin.CHECKPOINT_EVERY=2"))
  assert first.returncode == 0, first.stderr
  assert sorted(os.listdir(workdir / "pretrain" / "checkpoints")) == ["2", "4"]
  (workdir.parent / "stdout.txt").write_text(first.stdout)
  return workdir


def test_the_run_says_what_it_is_before_the_first_step(trained):
  from lmtrain import config
  out = (trained.parent / "stdout.txt").read_text()
  block = out[out.index("pretrain: starting from fresh weights, 4 steps"):].splitlines()[:6]
  n_params = config.preset_config("tiny").param_count()
  assert block[1] == f"  parameters  {n_params / 1e6:,.2f}M ({n_params / 1e6:,.2f}M trained)"
  assert block[2] == "  mesh        data 1 x fsdp 8 x tensor 1 on 8 cpu device(s) (cpu), 1 process(es)"
  assert block[3] == "  batch       8 x 32 = 256 tokens per step"
  prepared = trained / "data" / "prepared"
  manifest = json.loads(next(prepared.rglob("manifest.json")).read_text())
  assert block[4] == (f"  data        {manifest['documents']:,} documents, {manifest['tokens']:,} "
                      f"tokens; the run reads 1,024 tokens ({1024 / manifest['tokens']:.2f} epochs)")
  assert block[5].startswith("  tokenizer   ") and block[5].endswith("tok300.model")


def copy_of(trained, tmp_path):
  import shutil
  shutil.copytree(trained, tmp_path / "run")
  return tmp_path / "run"


def rerun(data, workdir, *extra, steps=6):
  return run_cli(*stage_args(data, workdir, f"--gin.TRAIN_STEPS={steps}",
                             "--gin.CHECKPOINT_EVERY=2", *extra))


@pytest.mark.slow
def test_bad_config_on_rerun_keeps_checkpoint(data, trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  stage_dir = workdir / "pretrain"
  before = _snapshot(stage_dir)

  # Fails after the stage dir is opened: the mesh does not take the batch.
  line = error_line(rerun(data, workdir, "--gin.BATCH_SIZE=6"))
  assert "BATCH_SIZE=6" in line
  assert _snapshot(stage_dir) == before

  # Fails before the restore: the checkpoints are of another model, batch and data.
  (data["root"] / "other.jsonl").write_text(data["corpus"].read_text())
  line = error_line(rerun(data, workdir, "--gin.MODEL=bench_tiny", "--gin.BATCH_SIZE=16",
                          f"--gin.TRAIN_DATA={data['root'] / 'other.jsonl'}"))
  assert ("resuming with other settings than the checkpoints were trained with: TRAIN_DATA "
          f"{data['corpus']} -> {data['root'] / 'other.jsonl'}; BATCH_SIZE 8 -> 16; MODEL "
          "(d_model 64 -> ") in line
  assert "vocab_size 512 -> 8000" in line
  assert line.endswith("use a new --workdir, or pass --allow_config_change to go on (recorded in "
                       "lineage.json)")
  assert _snapshot(stage_dir) == before


@pytest.mark.slow
def test_a_changed_sequence_length_resumes_only_when_allowed_and_is_recorded(data, trained,
                                                                             tmp_path):
  workdir = copy_of(trained, tmp_path)
  stage_dir = workdir / "pretrain"
  before = _snapshot(stage_dir)
  line = error_line(rerun(data, workdir, "--gin.SEQ_LEN=16"))
  assert "resuming with other settings than the checkpoints were trained with: SEQ_LEN 32 -> 16;" \
      in line
  assert _snapshot(stage_dir) == before

  result = rerun(data, workdir, "--gin.SEQ_LEN=16", "--allow_config_change")
  assert result.returncode == 0, result.stderr
  assert "warning: resuming with a changed SEQ_LEN (--allow_config_change): SEQ_LEN 32 -> 16" \
      in result.stdout
  assert "note: resuming at step 4 with a changed config (" in result.stdout
  lineage = json.loads((stage_dir / "lineage.json").read_text())
  assert lineage["config_changes"] == [{"step": 4, "changed": {"SEQ_LEN": {"from": 32, "to": 16}}}]
  assert lineage["resume_keys"]["SEQ_LEN"] == 16 and lineage["train_steps"] == 6
  assert (stage_dir / "config.4.gin").exists()
  rows = [json.loads(l) for l in (stage_dir / "metrics.jsonl").read_text().splitlines()]
  last = [r for r in rows if r["step"] == 6 and "loss" in r][-1]
  assert last["loss"] > 1.0  # the carried-over chunks were cut to the new length: real batches


def _damage(stage_dir, step, kind):
  state = stage_dir / "checkpoints" / str(step) / "state"
  if kind == "truncated":
    biggest = max((p for p in state.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
      f.truncate(100)
  else:
    (state / "_METADATA").unlink()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["truncated", "missing_metadata"])
def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_one_before(
    data, trained, tmp_path, kind):
  workdir = copy_of(trained, tmp_path)
  stage_dir = workdir / "pretrain"
  _damage(stage_dir, 4, kind)
  damaged = _snapshot(stage_dir / "checkpoints" / "4")
  result = rerun(data, workdir)
  assert result.returncode == 0, result.stderr
  warnings = [l for l in result.stderr.splitlines() if l.startswith("warning: ")]
  assert len(warnings) == 1, result.stderr
  assert warnings[0].startswith(f"warning: checkpoint 4 in {stage_dir / 'checkpoints'} cannot be "
                                "restored (")
  assert warnings[0].endswith(f"); moved it to {stage_dir / 'damaged_checkpoints' / '4'}; "
                              "resuming from checkpoint 2 instead")
  assert "Traceback" not in result.stderr
  assert _snapshot(stage_dir / "damaged_checkpoints" / "4") == damaged  # kept as it was
  assert sorted(os.listdir(stage_dir / "checkpoints")) == ["2", "4", "6"]
  steps = [json.loads(l)["step"] for l in (stage_dir / "metrics.jsonl").read_text().splitlines()]
  assert steps[-1] == 6


FILE_SIZE_LIMIT = """
import resource, signal, subprocess, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.exit(subprocess.run(sys.argv[2:]).returncode)
"""


@pytest.mark.slow
def test_a_failed_checkpoint_save_is_one_line_and_keeps_the_previous_checkpoints(data, trained,
                                                                                 tmp_path):
  """A full disk, as a file-size limit: every checkpoint file over 30 kB fails to write."""
  workdir = copy_of(trained, tmp_path)
  stage_dir = workdir / "pretrain"
  before = _snapshot(stage_dir / "checkpoints")
  script = tmp_path / "limit.py"
  script.write_text(FILE_SIZE_LIMIT)
  # The tests' shared compilation cache would hit the limit too (and say so in a warning).
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", JAX_ENABLE_COMPILATION_CACHE="false")
  args = stage_args(data, workdir, "--gin.TRAIN_STEPS=6", "--gin.CHECKPOINT_EVERY=2")
  result = subprocess.run([sys.executable, str(script), "30000", sys.executable, "-m",
                           "lmtrain.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
  lines = [l for l in result.stderr.splitlines() if l.strip() and "%|" not in l]
  assert len(lines) == 1, result.stderr  # the progress bar, then one line
  line = lines[0]
  assert line == (f"lmtrain: error: saving checkpoint 6 in {stage_dir / 'checkpoints'} failed "
                  "(File too large, errno 27); checkpoints 2, 4 kept; fix the storage and rerun "
                  "to resume")
  assert sorted(os.listdir(stage_dir / "checkpoints")) == ["2", "4"]  # no temporary directory
  assert _snapshot(stage_dir / "checkpoints") == before
  resumed = rerun(data, workdir)  # the storage fixed
  assert resumed.returncode == 0, resumed.stderr
  assert sorted(os.listdir(stage_dir / "checkpoints")) == ["2", "4", "6"]


def test_a_missing_step_a_damaged_or_an_unfinished_parent_is_one_line(data, trained, tmp_path):
  line = error_line(run_cli("convert", "to-hf", "--checkpoint", trained / "pretrain", "--output",
                            tmp_path / "hf", "--step", "99"))
  assert line == (f"lmtrain: error: {trained / 'pretrain'}: no checkpoint at step 99; the steps "
                  "there are 2, 4")
  assert not (tmp_path / "hf").exists()

  from lmtrain.errors import UserError
  from lmtrain.model import transformer
  from lmtrain.train import checkpoint as ckpt_lib
  import jax
  parent = copy_of(trained, tmp_path) / "pretrain"
  lineage = json.loads((parent / "lineage.json").read_text())
  assert lineage["train_steps"] == 4
  ckpt_lib.check_parent_finished(str(parent), 4)  # finished: fine
  lineage["train_steps"] = 10  # as if stopped at step 4 of 10
  (parent / "lineage.json").write_text(json.dumps(lineage))
  with pytest.raises(UserError, match=r"that run is unfinished \(its latest checkpoint is step 4 "
                                      r"of 10\); rerun its command to finish it, or .*"
                                      r"parent_checks.allow_unfinished=True"):
    ckpt_lib.check_parent_finished(str(parent), 4)

  _damage(parent, 4, "missing_metadata")
  cfg = transformer.ModelConfig(**json.loads((parent / "model.json").read_text()))
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one_device),
                          transformer.abstract_model(cfg)[1])
  with pytest.raises(UserError, match=r"checkpoint 4 cannot be restored \("):
    ckpt_lib.restore_params(str(parent), abstract)
  params, step = ckpt_lib.restore_params(str(parent), abstract, step=2)
  assert step == 2 and jax.tree.structure(params) == jax.tree.structure(abstract)


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
           "['pretrain'], ['sft', '--help'], ['pretrain', '--workdir', 'x', '--max_steps', '3']):"
           "\n  try:\n    cli.main(argv)\n  except SystemExit:\n    pass\n"
           "print('jax imported:', 'jax' in sys.modules)\n")
  result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
  assert "jax imported: False" in result.stdout, result.stdout + result.stderr
  import lmtrain
  assert f"lmtrain {lmtrain.__version__}" in result.stdout  # --version
  assert "the following arguments are required: --workdir" in result.stderr
  # `sft --help` lists its macros with the gin files' defaults.
  assert "settings (gin macros; --gin.NAME=VALUE, defaults from gin_configs/stages/sft.gin):" \
      in result.stdout
  assert "  --gin.TRAIN_STEPS " in result.stdout and "  --gin.LEARNING_RATE " in result.stdout
  # An unknown flag that another trainer spells so points to the macro.
  assert ("unrecognized arguments: --max_steps 3 (settings are gin macros: did you mean "
          "--gin.TRAIN_STEPS=...?)") in result.stderr


def test_print_config_prints_the_bindings_and_runs_nothing(tmp_path):
  result = run_cli("pretrain", "--workdir", tmp_path / "run", "--print_config",
                   "--gin.TRAIN_STEPS=7", "--gin.MODEL=tiny")
  assert result.returncode == 0, result.stderr
  assert "TRAIN_STEPS = 7" in result.stdout and "MODEL = 'tiny'" in result.stdout
  assert "LoopConfig.train_steps = %TRAIN_STEPS" in result.stdout
  assert not (tmp_path / "run").exists()
