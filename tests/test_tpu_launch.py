"""tpu_launch: exact gcloud commands from dry runs, quoting of hostile values, the restart loop.

Nothing here may reach gcloud: subprocess.run is replaced by a function that fails the test.
"""

import shlex
import subprocess

import pytest

from tpu_launch import cli, commands

ZONE = "us-west4-a"
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
REAL_RUN = subprocess.run
HOSTILE = "x; rm -rf ~ \"dq\" 'sq' $(whoami) `id` two words\nsecond line"


@pytest.fixture(autouse=True)
def no_gcloud(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError(f"a test tried to run {args}")
  monkeypatch.setattr(subprocess, "run", refuse)


def dry_run(capsys, *argv) -> list[list[str]]:
  """Runs main with --dry_run and returns the printed commands, split back into argument lists."""
  assert cli.main([argv[0], "--dry_run", *argv[1:]]) == 0
  return [shlex.split(line) for line in capsys.readouterr().out.splitlines()]


def remote(cmd: list[str]) -> list[str]:
  """The words the remote shell sees in an ssh command's --command= string."""
  (command,) = [a for a in cmd if a.startswith("--command=")]
  return shlex.split(command[len("--command="):])


def test_create_spot_vm(capsys):
  assert dry_run(capsys, "create", "my-tpu", "--zone", ZONE, "--project", "proj",
                 "--accelerator_type", "v5litepod-8", "--runtime_version", "v2-alpha-tpuv5-lite",
                 "--spot") == [
      ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", f"--zone={ZONE}",
       "--project=proj", "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite",
       "--spot"]]


def test_create_multislice_queued_resource(capsys):
  assert dry_run(capsys, "create", "big", "--zone", ZONE, "--queued", "--node_count", "2",
                 "--accelerator_type", "v5litepod-256", "--runtime_version", "v2-alpha-tpuv5-lite",
                 "--spot", "--reserved") == [
      ["gcloud", "compute", "tpus", "queued-resources", "create", "big", f"--zone={ZONE}",
       "--node-count=2", "--node-prefix=big", "--accelerator-type=v5litepod-256",
       "--runtime-version=v2-alpha-tpuv5-lite", "--spot", "--reserved"]]


def test_create_single_queued_resource_uses_node_id():
  target = commands.Target("q", ZONE, queued=True)
  assert commands.create_command(target, "v5p-64", "v2-alpha-tpuv5") == [
      "gcloud", "compute", "tpus", "queued-resources", "create", "q", f"--zone={ZONE}",
      "--node-id=q", "--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5"]


def test_setup_from_git(capsys):
  script = ("sudo apt-get -qq update && sudo env DEBIAN_FRONTEND=noninteractive apt-get -qq "
            "install -y python3.11 python3.11-venv && python3.11 -m venv lmtrain-venv && "
            "lmtrain-venv/bin/pip install -q -U pip && lmtrain-venv/bin/pip uninstall -q -y "
            "lmtrain && lmtrain-venv/bin/pip install "
            "'lmtrain[tpu] @ git+https://github.com/org/lmtrain@v0.1'")
  assert dry_run(capsys, "setup", "big", "--zone", ZONE, "--queued", "--node_count", "2",
                 "--git_url", "https://github.com/org/lmtrain", "--git_rev", "v0.1") == [
      [*SSH, "big-0", f"--zone={ZONE}", "--worker=all", f"--command={script}"],
      [*SSH, "big-1", f"--zone={ZONE}", "--worker=all", f"--command={script}"]]


def test_setup_from_wheel_copies_it_first(capsys, tmp_path):
  wheel = tmp_path / "lmtrain-0.1.0-py3-none-any.whl"
  wheel.write_bytes(b"")
  cmds = dry_run(capsys, "setup", "my-tpu", "--zone", ZONE, "--wheel", str(wheel), "--skip_apt")
  assert cmds[0] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", str(wheel),
                     "my-tpu:lmtrain-0.1.0-py3-none-any.whl", f"--zone={ZONE}", "--worker=all"]
  assert remote(cmds[1])[-3:] == ["lmtrain-venv/bin/pip", "install",
                                  "./lmtrain-0.1.0-py3-none-any.whl[tpu]"]
  assert "apt-get" not in remote(cmds[1])


def test_run_in_background(capsys):
  assert dry_run(capsys, "run", "my-tpu", "--zone", ZONE, "--workdir", "gs://bkt/runs/exp1",
                 "--", "pretrain", "--gin_file", "exp.gin", "--gin.TRAIN_STEPS=100") == [
      [*SSH, "my-tpu", f"--zone={ZONE}", "--worker=all",
       "--command=nohup lmtrain-venv/bin/lmtrain pretrain --gin_file exp.gin "
       "--gin.TRAIN_STEPS=100 --workdir gs://bkt/runs/exp1 >> lmtrain-exp1.log 2>&1 "
       "< /dev/null &"]]


def test_run_in_foreground_on_every_slice_with_upload(capsys, tmp_path):
  gin = tmp_path / "exp.gin"
  gin.write_text("")
  cmds = dry_run(capsys, "run", "big", "--zone", ZONE, "--queued", "--node_count", "2",
                 "--workdir", "gs://bkt/runs/e", "--experiment", "e2", "--upload", str(gin),
                 "--env", "LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2", "--foreground",
                 "--", "pipeline", "--gin_file", "exp.gin")
  script = ("set -o pipefail; env 'LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2' lmtrain-venv/bin/lmtrain "
            "pipeline --gin_file exp.gin --workdir gs://bkt/runs/e 2>&1 | tee -a lmtrain-e2.log")
  assert cmds == [
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", str(gin), "big-0:exp.gin", f"--zone={ZONE}",
       "--worker=all"],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", str(gin), "big-1:exp.gin", f"--zone={ZONE}",
       "--worker=all"],
      [*SSH, "big-0", f"--zone={ZONE}", "--worker=all", f"--command={script}"],
      [*SSH, "big-1", f"--zone={ZONE}", "--worker=all", f"--command={script}"]]


def test_logs_status_stop_delete(capsys):
  assert dry_run(capsys, "logs", "big", "--zone", ZONE, "--queued", "--node_count", "2",
                 "--slice", "1", "--worker", "3", "--experiment", "e") == [
      [*SSH, "big-1", f"--zone={ZONE}", "--worker=3", "--command=tail -n 100 -F lmtrain-e.log"]]
  assert dry_run(capsys, "status", "big", "--zone", ZONE, "--queued") == [
      ["gcloud", "compute", "tpus", "queued-resources", "describe", "big", f"--zone={ZONE}"]]
  assert dry_run(capsys, "stop", "my-tpu", "--zone", ZONE, "--vm") == [
      [*SSH, "my-tpu", f"--zone={ZONE}", "--worker=all",
       f"--command={commands.STOP_REMOTE_COMMAND}"],
      ["gcloud", "compute", "tpus", "tpu-vm", "stop", "my-tpu", f"--zone={ZONE}"]]
  assert dry_run(capsys, "delete", "my-tpu", "--zone", ZONE) == [
      ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu", f"--zone={ZONE}", "--quiet"]]
  assert dry_run(capsys, "delete", "big", "--zone", ZONE, "--queued", "--node_count", "2") == [
      ["gcloud", "compute", "tpus", "queued-resources", "delete", "big", f"--zone={ZONE}",
       "--force", "--quiet"]]


@pytest.mark.parametrize("foreground", [[], ["--foreground"]])
def test_hostile_values_arrive_as_one_argument(foreground):
  # The argument lists handed to the runner (a dry run's printout spans lines: HOSTILE has a newline).
  shell = FakeShell([0, 0])
  workdir = f"gs://bkt/runs/{HOSTILE}"
  assert cli.main(["run", "my-tpu", "--zone", ZONE, "--workdir", workdir, *foreground, "--env",
                   f"K={HOSTILE}", "--", "pretrain", f"--gin.MODEL={HOSTILE}", HOSTILE], shell) == 0
  assert cli.main(["logs", "my-tpu", "--zone", ZONE, "--experiment", HOSTILE], shell) == 0
  run_cmd, logs_cmd = shell.calls
  words = remote(run_cmd)
  assert f"--gin.MODEL={HOSTILE}" in words
  assert HOSTILE in words
  assert f"K={HOSTILE}" in words
  assert words[words.index("--workdir") + 1] == workdir
  assert f"lmtrain-{HOSTILE}.log" in words  # the experiment name defaults to the workdir's end
  assert "rm" not in words and "$(whoami)" not in words
  assert remote(logs_cmd) == ["tail", "-n", "100", "-F", f"lmtrain-{HOSTILE}.log"]


def test_a_real_shell_receives_hostile_values_intact(tmp_path):
  """Runs the remote command in bash (the workers' shell) with a fake lmtrain that echoes argv."""
  fake = tmp_path / "venv" / "bin" / "lmtrain"
  fake.parent.mkdir(parents=True)
  fake.write_text('#!/bin/sh\nprintf "%s\\0" "$K" "$@"\n')
  fake.chmod(0o755)
  log = f"log-{HOSTILE}"
  script = commands.run_remote_command(["pretrain", f"--gin.MODEL={HOSTILE}"], log,
                                       str(tmp_path / "venv"), {"K": HOSTILE}, background=False)
  out = REAL_RUN(["bash", "-c", script], cwd=tmp_path, capture_output=True, check=True).stdout
  assert out.split(b"\0") == [HOSTILE.encode(), b"pretrain", f"--gin.MODEL={HOSTILE}".encode(), b""]
  assert (tmp_path / log).read_bytes() == out


@pytest.mark.parametrize("name", ["My-TPU", "tpu;rm", "tpu name", "tpu_a", "tpu-", "9tpu", "a" * 64])
def test_invalid_tpu_name_is_a_one_line_error(capsys, name):
  assert cli.main(["delete", name, "--zone", ZONE]) == 1
  err = capsys.readouterr().err
  assert err.startswith("tpu_launch: error: bad TPU name") and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["run", "t", "--zone", ZONE, "--workdir", "/local/dir", "--", "pretrain"], "bucket path"),
    (["run", "t", "--zone", ZONE, "--workdir", "gs://b/e"], "after --"),
    (["run", "t", "--zone", ZONE, "--workdir", "gs://b/e", "--", "sft", "--workdir", "x"],
     "tpu_launch's --workdir"),
    (["run", "t", "--zone", ZONE, "--workdir", "gs://b/e", "--env", "A B=1", "--", "sft"],
     "environment variable"),
    (["create", "t", "--zone", ZONE, "--accelerator_type", "v5p-8", "--runtime_version", "v",
      "--queued", "--preemptible"], "--spot"),
    (["status", "t", "--zone", ZONE, "--node_count", "2"], "--queued"),
    (["setup", "t", "--zone", ZONE, "--wheel", "bad name.whl"], "wheel"),
    (["setup", "t", "--zone", ZONE, "--git_url", "u", "--python", "python3; id"], "--python"),
])
def test_bad_input_is_a_one_line_error(capsys, argv, message):
  assert cli.main(argv) == 1
  err = capsys.readouterr().err
  assert message in err and err.count("\n") == 1


class FakeShell(cli.Shell):
  """Returns scripted exit codes for the job and a fixed state for describe."""

  def __init__(self, codes, state="READY"):
    self.codes, self.state, self.calls, self.sleeps = list(codes), state, [], 0

  def call(self, args):
    self.calls.append(args)
    return self.codes.pop(0)

  def call_all(self, cmds):
    return [self.call(c) for c in cmds]  # in order, so the scripted codes match their slices

  def capture(self, args):
    assert "describe" in args
    return 0, self.state

  def sleep(self, seconds):
    self.sleeps += 1


RUN = ["run", "my-tpu", "--zone", ZONE, "--workdir", "gs://b/runs/e", "--restart_on_preemption",
       "--", "pretrain"]


def test_restart_after_preemption_until_success():
  shell = FakeShell([143, 143, 0])
  assert cli.main(RUN, shell) == 0
  assert len(shell.calls) == 3 and shell.calls[0] == shell.calls[2]
  assert "set -o pipefail" in shell.calls[0][-1]  # restarts need the job's exit code


def test_other_failure_stops_at_once():
  shell = FakeShell([1, 0])
  assert cli.main(RUN, shell) == 1
  assert len(shell.calls) == 1


def test_failure_while_tpu_is_down_waits_and_restarts():
  shell = FakeShell([255, 0], state="PROVISIONING")
  states = iter(["PROVISIONING", "PROVISIONING", "READY"])
  shell.capture = lambda args: (0, next(states))
  assert cli.main(RUN, shell) == 0
  assert len(shell.calls) == 2 and shell.sleeps == 1


def test_max_restarts_is_respected():
  shell = FakeShell([143] * 10)
  assert cli.main([*RUN[:-2], "--max_restarts", "2", "--", "pretrain"], shell) == 143
  assert len(shell.calls) == 3


def test_dead_tpu_is_not_waited_for(capsys):
  shell = FakeShell([143, 0], state="PREEMPTED")
  assert cli.main(RUN, shell) == 1
  assert "PREEMPTED" in capsys.readouterr().err and len(shell.calls) == 1


def test_multislice_preemption_wins_over_consequent_failures():
  shell = FakeShell([1, 143, 0, 0], state="ACTIVE")
  argv = ["run", "big", "--zone", ZONE, "--queued", "--node_count", "2", "--workdir", "gs://b/r/e",
          "--restart_on_preemption", "--", "pretrain"]
  assert cli.main(argv, shell) == 0
  assert [c[5] for c in shell.calls] == ["big-0", "big-1", "big-0", "big-1"]
