"""`python -m tpu_launch`: the life of an lmtrain run on Cloud TPU VMs, through gcloud.

Subcommands: create, setup, run, logs, status, stop, delete. `--dry_run` prints every gcloud command
(shell-quoted, one per line) instead of running it. Exit codes: gcloud's (or lmtrain's, for a
foreground run); 1 bad input (one line on stderr); 2 usage.
"""

import argparse
import concurrent.futures
import os
import shlex
import subprocess
import sys
import time

from tpu_launch import commands
from tpu_launch.commands import LaunchError


class Shell:
  """Runs argument lists with subprocess (never through a local shell)."""

  dry_run = False

  def call(self, args: list[str]) -> int:
    return subprocess.run(args, check=False).returncode

  def call_all(self, cmds: list[list[str]]) -> list[int]:
    """Runs the commands at once (one per slice) and returns their exit codes."""
    if len(cmds) == 1:
      return [self.call(cmds[0])]
    with concurrent.futures.ThreadPoolExecutor(len(cmds)) as pool:
      return list(pool.map(self.call, cmds))

  def capture(self, args: list[str]) -> tuple[int, str]:
    done = subprocess.run(args, check=False, capture_output=True, text=True)
    return done.returncode, done.stdout.strip()

  def sleep(self, seconds: float):
    time.sleep(seconds)


class DryRunShell(Shell):
  """Prints each command instead of running it, as if it succeeded."""

  dry_run = True

  def call(self, args: list[str]) -> int:
    print(shlex.join(args), flush=True)
    return 0

  def call_all(self, cmds: list[list[str]]) -> list[int]:
    return [self.call(c) for c in cmds]  # in order, so the printout is stable


def _first_failure(codes: list[int]) -> int:
  """0 when all succeeded; else 143 if any worker was preempted (the others then fail as a
  consequence), else the first failure's code."""
  failed = [c for c in codes if c != 0]
  if commands.PREEMPTED_EXIT in failed:
    return commands.PREEMPTED_EXIT
  return failed[0] if failed else 0


def run_steps(shell: Shell, steps: list[list[list[str]]]) -> int:
  """Runs each step's commands at once; stops at the first step that fails."""
  for step in steps:
    code = _first_failure(shell.call_all(step))
    if code:
      return code
  return 0


def _state(shell: Shell, target: commands.Target) -> str:
  code, out = shell.capture(commands.describe_command(target, state_only=True))
  return out if code == 0 else "UNKNOWN"


def wait_until_ready(shell: Shell, target: commands.Target, poll_seconds: float,
                     timeout_seconds: float):
  """Polls `describe` until the VM is READY (queued resource: ACTIVE) again."""
  ready = commands.ready_state(target)
  waited = 0.0
  while True:
    state = _state(shell, target)
    if state == ready:
      return
    if state in commands.DEAD_STATES:
      raise LaunchError(f"{target.name} is {state} and will not come back: delete it, create and "
                        "set it up again, then rerun (lmtrain resumes from its latest checkpoint)")
    if waited >= timeout_seconds:
      raise LaunchError(f"{target.name} not {ready} after {timeout_seconds:g}s (last state {state})")
    print(f"tpu_launch: {target.name} is {state}; waiting for {ready}", file=sys.stderr, flush=True)
    shell.sleep(poll_seconds)
    waited += poll_seconds


def run_with_restarts(shell: Shell, target: commands.Target, job: list[list[str]],
                      max_restarts: int, poll_seconds: float = 30,
                      wait_timeout: float = 3600) -> int:
  """Runs the foreground job; reruns it after a preemption, at most `max_restarts` times.

  A preemption is lmtrain's exit code 143 (SIGTERM after a checkpoint) or any failure while the
  VM/queued resource is not ready. Any other failure ends the loop with its exit code.
  """
  restarts = 0
  while True:
    code = _first_failure(shell.call_all(job))
    if code == 0:
      return 0
    if code != commands.PREEMPTED_EXIT and _state(shell, target) == commands.ready_state(target):
      return code
    if restarts >= max_restarts:
      print(f"tpu_launch: preempted again after {restarts} restarts; giving up", file=sys.stderr)
      return code
    restarts += 1
    print(f"tpu_launch: job preempted (exit {code}); restart {restarts}/{max_restarts}",
          file=sys.stderr, flush=True)
    wait_until_ready(shell, target, poll_seconds, wait_timeout)


def _parse_env(items: list[str]) -> dict[str, str]:
  env = {}
  for item in items:
    key, eq, value = item.partition("=")
    if not eq:
      raise LaunchError(f"--env takes KEY=VALUE, got {item!r}")
    env[key] = value
  return env


def _local_file(path: str) -> str:
  if not os.path.isfile(path):
    raise LaunchError(f"no such file: {path}")
  # Absolute, so that gcloud scp never reads a leading '-' as a flag.
  return os.path.abspath(path)


def cmd_create(args, target, shell):
  return shell.call(commands.create_command(
      target, args.accelerator_type, args.runtime_version, spot=args.spot,
      preemptible=args.preemptible, reserved=args.reserved))


def cmd_setup(args, target, shell):
  nodes = target.nodes()
  steps = []
  if args.wheel:
    name = commands.wheel_name(args.wheel)
    local = _local_file(args.wheel)
    steps.append([commands.scp_command(target, n, local, name) for n in nodes])
    requirement = commands.wheel_requirement(name)
  else:
    requirement = commands.git_requirement(args.git_url, args.git_rev)
  remote = commands.setup_remote_command(requirement, args.venv, args.python, not args.skip_apt)
  steps.append([commands.ssh_command(target, n, remote) for n in nodes])
  return run_steps(shell, steps)


def cmd_run(args, target, shell):
  experiment = commands.experiment_name(args.workdir, args.experiment)
  log = commands.log_file(experiment)
  background = not (args.foreground or args.restart_on_preemption)
  remote = commands.run_remote_command(
      commands.lmtrain_args(args.lmtrain_args, args.workdir), log, args.venv,
      _parse_env(args.env), background=background)
  nodes = target.nodes()
  uploads = [[commands.scp_command(target, n, _local_file(f), os.path.basename(f)) for n in nodes]
             for f in args.upload]
  job = [commands.ssh_command(target, n, remote) for n in nodes]
  code = run_steps(shell, uploads)
  if code:
    return code
  if args.restart_on_preemption:
    return run_with_restarts(shell, target, job, args.max_restarts, args.poll_seconds,
                             args.wait_timeout)
  code = run_steps(shell, [job])
  if background and code == 0 and not shell.dry_run:
    print(f"tpu_launch: started on every worker; log ~/{log}; follow it with: python -m tpu_launch "
          f"logs {target.name} --zone={target.zone} --experiment={shlex.quote(experiment)}",
          file=sys.stderr)
  return code


def cmd_logs(args, target, shell):
  if not 0 <= args.slice < target.node_count:
    raise LaunchError(f"--slice must be in [0, {target.node_count}), got {args.slice}")
  if args.worker < 0:
    raise LaunchError(f"--worker must be at least 0, got {args.worker}")
  remote = commands.logs_remote_command(commands.log_file(args.experiment), args.lines,
                                        not args.no_follow)
  node = target.nodes()[args.slice]
  return shell.call(commands.ssh_command(target, node, remote, worker=str(args.worker)))


def cmd_status(args, target, shell):
  if target.queued:
    return shell.call(commands.describe_command(target))
  return run_steps(shell, [[commands.describe_command(target, n)] for n in target.nodes()])


def cmd_stop(args, target, shell):
  steps = [[commands.ssh_command(target, n, commands.STOP_REMOTE_COMMAND)
            for n in target.nodes()]]
  if args.vm:
    steps.append(commands.stop_vm_commands(target))
  return run_steps(shell, steps)


def cmd_delete(args, target, shell):
  return run_steps(shell, [commands.delete_commands(target)])


def build_parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("name", help="TPU name (queued resource ID and node name, or node prefix)")
  common.add_argument("--zone", required=True, help="e.g. us-west4-a")
  common.add_argument("--project", help="Google Cloud project (default: gcloud's configured one)")
  common.add_argument("--queued", action="store_true", help="the TPU is a queued resource")
  common.add_argument("--node_count", type=int, default=1,
                      help="slices of a multi-slice queued resource (nodes NAME-0, NAME-1, ...)")
  common.add_argument("--dry_run", action="store_true",
                      help="print the gcloud commands instead of running them")

  parser = argparse.ArgumentParser(prog="python -m tpu_launch", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("create", parents=[common], help="create a TPU VM or a queued resource")
  p.add_argument("--accelerator_type", required=True, help="e.g. v5litepod-8, v5p-64")
  p.add_argument("--runtime_version", required=True, help="TPU software version, e.g. v2-alpha-tpuv5")
  p.add_argument("--spot", action="store_true", help="Spot capacity: cheaper, can be preempted")
  p.add_argument("--preemptible", action="store_true", help="legacy preemptible TPU VM")
  p.add_argument("--reserved", action="store_true", help="use reserved capacity")
  p.set_defaults(func=cmd_create)

  p = sub.add_parser("setup", parents=[common], help="install lmtrain in a venv on every worker")
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--git_url", help="install lmtrain[tpu] from this git repository")
  source.add_argument("--wheel", help="copy this lmtrain wheel to every worker and install it")
  p.add_argument("--git_rev", default="main", help="branch, tag or commit of --git_url")
  p.add_argument("--venv", default="lmtrain-venv", help="venv path (relative: to the home dir)")
  p.add_argument("--python", default="python3.11", help="Python of the venv (lmtrain needs 3.11+)")
  p.add_argument("--skip_apt", action="store_true", help="do not apt-get install the Python first")
  p.set_defaults(func=cmd_setup)

  p = sub.add_parser("run", parents=[common], help="run `lmtrain ARGS` on every worker",
                     usage="%(prog)s NAME --zone ZONE --workdir gs://BUCKET/runs/EXP [options] "
                           "-- LMTRAIN_ARGS...")
  p.add_argument("--workdir", required=True, help="gs://BUCKET/runs/EXP, passed to lmtrain")
  p.add_argument("--experiment", help="log name (~/lmtrain-EXP.log); default: last part of workdir")
  p.add_argument("--venv", default="lmtrain-venv", help="venv made by setup")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="environment variable for lmtrain (repeatable)")
  p.add_argument("--upload", action="append", default=[], metavar="FILE",
                 help="copy a local file (e.g. a gin file) to the home dir of every worker first")
  p.add_argument("--foreground", action="store_true",
                 help="wait for the job and stream its output (default: background, nohup)")
  p.add_argument("--restart_on_preemption", action="store_true",
                 help="run in the foreground and rerun the job after a preemption")
  p.add_argument("--max_restarts", type=int, default=3)
  p.add_argument("--poll_seconds", type=float, default=30,
                 help="describe interval while waiting for the TPU to be ready again")
  p.add_argument("--wait_timeout", type=float, default=3600,
                 help="seconds to wait for the TPU to be ready again")
  p.set_defaults(func=cmd_run)

  p = sub.add_parser("logs", parents=[common], help="show (and follow) a worker's log")
  p.add_argument("--experiment", required=True)
  p.add_argument("--worker", type=int, default=0, help="worker index within the slice")
  p.add_argument("--slice", type=int, default=0, help="slice index of a multi-slice resource")
  p.add_argument("--lines", type=int, default=100, help="lines of history to show first")
  p.add_argument("--no_follow", action="store_true", help="print and exit instead of following")
  p.set_defaults(func=cmd_logs)

  p = sub.add_parser("status", parents=[common], help="describe the TPU VM or queued resource")
  p.set_defaults(func=cmd_status)

  p = sub.add_parser("stop", parents=[common],
                     help="SIGTERM lmtrain on every worker (it saves a checkpoint and exits 143)")
  p.add_argument("--vm", action="store_true", help="then also stop the TPU VM (not queued ones)")
  p.set_defaults(func=cmd_stop)

  p = sub.add_parser("delete", parents=[common], help="delete the TPU VM or queued resource")
  p.set_defaults(func=cmd_delete)
  return parser


def main(argv: list[str] | None = None, shell: Shell | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  # Everything after the first `--` is the lmtrain command line, untouched by argparse.
  extra = []
  if "--" in argv:
    split = argv.index("--")
    argv, extra = argv[:split], argv[split + 1:]
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.command == "run":
    args.lmtrain_args = extra
  elif extra:
    parser.error(f"only `run` takes arguments after --, not `{args.command}`")
  if args.command == "run" and args.max_restarts < 0:
    parser.error("--max_restarts must be at least 0")
  shell = shell or (DryRunShell() if args.dry_run else Shell())
  try:
    target = commands.Target(args.name, args.zone, args.project, args.queued, args.node_count)
    return args.func(args, target, shell)
  except LaunchError as e:
    print(f"tpu_launch: error: {e}", file=sys.stderr)
    return 1
  except FileNotFoundError as e:
    print(f"tpu_launch: error: {e.filename or 'gcloud'} not found: install the Google Cloud CLI",
          file=sys.stderr)
    return 1
