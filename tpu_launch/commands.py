"""Pure builders of gcloud argument lists and remote shell command strings.

Nothing here runs anything, so every generated command can be tested exactly. Every user value that
goes into a remote `--command=` string passes through `shlex.quote`/`shlex.join`: the remote shell
sees it as one word, whatever quotes, `;`, `$()`, backticks or newlines it holds.
"""

import dataclasses
import re
import shlex

# GCE resource names: lowercase letter first, then lowercase letters, digits and hyphens, at most 63.
_TPU_NAME = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")
# PEP 427 wheel file names, and plain file names for uploads: legacy scp hands the remote path to a
# shell, so only names without shell metacharacters may go there.
_WHEEL_NAME = re.compile(r"[A-Za-z0-9_.+-]+\.whl")
_FILE_NAME = re.compile(r"[A-Za-z0-9_.+-]+")
_PYTHON = re.compile(r"python3(?:\.\d+)?")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# lmtrain exits with 143 after a SIGTERM (preemption notice, maintenance) that saved a checkpoint.
PREEMPTED_EXIT = 143
VM_READY = "READY"
QUEUED_READY = "ACTIVE"
# States from which a resource never returns to ready on its own: it must be deleted and recreated.
DEAD_STATES = frozenset({"PREEMPTED", "TERMINATED", "FAILED", "SUSPENDED"})

_TPUS = ["gcloud", "compute", "tpus"]


class LaunchError(ValueError):
  """Bad input: main prints the message as one line and exits 1."""


@dataclasses.dataclass(frozen=True)
class Target:
  """Where commands go: a TPU VM, or a queued resource holding `node_count` slices.

  A queued resource has the ID `name`; its one node is also `name`, or with several slices the
  nodes are `name-0`, `name-1`, ... (gcloud's --node-prefix naming).
  """

  name: str
  zone: str
  project: str | None = None
  queued: bool = False
  node_count: int = 1

  def __post_init__(self):
    if not _TPU_NAME.fullmatch(self.name):
      raise LaunchError(f"bad TPU name {self.name!r}: use lowercase letters, digits and hyphens, "
                        "starting with a letter, at most 63 characters")
    if self.node_count < 1:
      raise LaunchError(f"--node_count must be at least 1, got {self.node_count}")
    if self.node_count > 1 and not self.queued:
      raise LaunchError("several slices (--node_count > 1) need a queued resource: add --queued")
    if len(self.nodes()[-1]) > 63:
      raise LaunchError(f"TPU name {self.name!r} is too long for {self.node_count} node names")

  def nodes(self) -> list[str]:
    if self.node_count == 1:
      return [self.name]
    return [f"{self.name}-{i}" for i in range(self.node_count)]

  def location(self) -> list[str]:
    flags = [f"--zone={self.zone}"]
    if self.project:
      flags.append(f"--project={self.project}")
    return flags


def create_command(target: Target, accelerator_type: str, runtime_version: str, *,
                   spot: bool = False, preemptible: bool = False,
                   reserved: bool = False) -> list[str]:
  """`tpu-vm create`, or `queued-resources create` for a queued resource (one or more slices)."""
  if spot and preemptible:
    raise LaunchError("choose one of --spot and --preemptible")
  if target.queued:
    if preemptible:
      raise LaunchError("queued resources have no --preemptible: use --spot")
    args = [*_TPUS, "queued-resources", "create", target.name, *target.location()]
    if target.node_count == 1:
      args.append(f"--node-id={target.name}")
    else:
      args += [f"--node-count={target.node_count}", f"--node-prefix={target.name}"]
    args += [f"--accelerator-type={accelerator_type}", f"--runtime-version={runtime_version}"]
  else:
    args = [*_TPUS, "tpu-vm", "create", target.name, *target.location(),
            f"--accelerator-type={accelerator_type}", f"--version={runtime_version}"]
  if spot:
    args.append("--spot")
  if preemptible:
    args.append("--preemptible")
  if reserved:
    args.append("--reserved")
  return args


def ssh_command(target: Target, node: str, command: str, worker: str = "all") -> list[str]:
  return [*_TPUS, "tpu-vm", "ssh", node, *target.location(), f"--worker={worker}",
          f"--command={command}"]


def scp_command(target: Target, node: str, local_path: str, remote_name: str) -> list[str]:
  """Copies a local file into the home directory of every worker of `node`."""
  if not _FILE_NAME.fullmatch(remote_name):
    raise LaunchError(f"file name {remote_name!r} may hold only letters, digits and '_.+-'")
  return [*_TPUS, "tpu-vm", "scp", local_path, f"{node}:{remote_name}", *target.location(),
          "--worker=all"]


def describe_command(target: Target, node: str | None = None, state_only: bool = False) -> list[str]:
  """Describes the queued resource, or the VM `node`; `state_only` prints just the state word."""
  if target.queued:
    args = [*_TPUS, "queued-resources", "describe", target.name, *target.location()]
    return args + ["--format=value(state.state)"] if state_only else args
  args = [*_TPUS, "tpu-vm", "describe", node or target.name, *target.location()]
  return args + ["--format=value(state)"] if state_only else args


def delete_commands(target: Target) -> list[list[str]]:
  if target.queued:
    # --force deletes the queued resource's nodes along with it.
    return [[*_TPUS, "queued-resources", "delete", target.name, *target.location(), "--force",
             "--quiet"]]
  return [[*_TPUS, "tpu-vm", "delete", node, *target.location(), "--quiet"]
          for node in target.nodes()]


def stop_vm_commands(target: Target) -> list[list[str]]:
  if target.queued:
    raise LaunchError("nodes of a queued resource cannot be stopped: delete it instead")
  return [[*_TPUS, "tpu-vm", "stop", node, *target.location()] for node in target.nodes()]


def ready_state(target: Target) -> str:
  return QUEUED_READY if target.queued else VM_READY


def wheel_name(path: str) -> str:
  name = path.replace("\\", "/").rsplit("/", 1)[-1]
  if not _WHEEL_NAME.fullmatch(name):
    raise LaunchError(f"{path!r} is not a wheel file name (NAME-VERSION-...-PLATFORM.whl)")
  return name


def git_requirement(url: str, rev: str) -> str:
  return f"lmtrain[tpu] @ git+{url}@{rev}"


def wheel_requirement(name: str) -> str:
  # The wheel is copied into the home directory, where ssh commands start.
  return f"./{name}[tpu]"


def setup_remote_command(requirement: str, venv: str, python: str, apt: bool) -> str:
  """Creates the venv and installs lmtrain; idempotent, so a rerun upgrades in place."""
  if not _PYTHON.fullmatch(python):
    raise LaunchError(f"--python must look like python3 or python3.11, got {python!r}")
  pip = shlex.quote(f"{venv}/bin/pip")
  steps = []
  if apt:
    steps += ["sudo apt-get -qq update",
              "sudo env DEBIAN_FRONTEND=noninteractive apt-get -qq install -y "
              f"{python} {python}-venv"]
  steps += [f"{python} -m venv {shlex.quote(venv)}",
            f"{pip} install -q -U pip",
            # Uninstall first: pip keeps an installed lmtrain of the same version, even from a new rev.
            f"{pip} uninstall -q -y lmtrain",
            f"{pip} install {shlex.quote(requirement)}"]
  return " && ".join(steps)


def experiment_name(workdir: str, experiment: str | None) -> str:
  """The experiment name (log file name); by default the last component of the work dir."""
  if not re.fullmatch(r"gs://[^/]+/.+", workdir, flags=re.DOTALL):
    raise LaunchError(f"--workdir must be a bucket path like gs://BUCKET/runs/EXP, got {workdir!r}: "
                      "every worker must see the same checkpoints")
  name = workdir.rstrip("/").rsplit("/", 1)[-1] if experiment is None else experiment
  if not name or "/" in name or "\0" in name:
    raise LaunchError(f"bad experiment name {name!r}: it must be non-empty and hold no '/'")
  return name


def log_file(experiment: str) -> str:
  """Log file of a run on each worker, relative to the home directory."""
  return f"lmtrain-{experiment}.log"


def lmtrain_args(args: list[str], workdir: str) -> list[str]:
  if not args:
    raise LaunchError("give the lmtrain command after --, e.g. -- pretrain --gin_file F.gin")
  if any(a == "--workdir" or a.startswith("--workdir=") for a in args):
    raise LaunchError("give the work dir as tpu_launch's --workdir, not after --")
  return [*args, "--workdir", workdir]


def run_remote_command(args: list[str], log: str, venv: str, env: dict[str, str] | None = None,
                       background: bool = True) -> str:
  """The same lmtrain command for every worker; its output is appended to `log`.

  In the background the job survives the ssh session (nohup, every stream redirected so that ssh
  returns at once). In the foreground ssh returns lmtrain's own exit code (pipefail through tee).
  """
  prefix = []
  if env:
    for key in env:
      if not _ENV_KEY.fullmatch(key):
        raise LaunchError(f"bad environment variable name {key!r}")
    prefix = ["env", *(f"{key}={value}" for key, value in env.items())]
  job = shlex.join([*prefix, f"{venv}/bin/lmtrain", *args])
  if background:
    return f"nohup {job} >> {shlex.quote(log)} 2>&1 < /dev/null &"
  return f"set -o pipefail; {job} 2>&1 | tee -a {shlex.quote(log)}"


def logs_remote_command(log: str, lines: int, follow: bool) -> str:
  if lines < 0:
    raise LaunchError(f"--lines must be at least 0, got {lines}")
  # -F keeps following when the log file appears only later.
  return shlex.join(["tail", "-n", str(lines), *(["-F"] if follow else []), log])


# pkill -x matches the process name, which for a console script is "lmtrain": matching the whole
# command line (-f) would also match the remote shell that runs pkill.
STOP_REMOTE_COMMAND = "pkill -TERM -x lmtrain || echo 'no lmtrain process on this worker'"
