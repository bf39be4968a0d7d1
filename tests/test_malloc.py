"""glibc's huge-page malloc for CPU runs (lmtrain/malloc.py): when it applies, and that the command
really re-executes itself under it."""

import os
import platform
import subprocess
import sys

import pytest

from lmtrain import cli, malloc

GLIBC = ("glibc", "2.36")
CPU = {"JAX_PLATFORMS": "cpu", "HOME": "/home/x"}


def test_applies_on_a_cpu_run_and_keeps_the_rest_of_the_environment():
  env = malloc.hugepage_env(CPU, GLIBC, "madvise", accelerators=True)
  assert env == {"JAX_PLATFORMS": "cpu", "HOME": "/home/x",
                 "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  # Without JAX_PLATFORMS it goes by the host's device nodes.
  assert malloc.hugepage_env({}, GLIBC, "madvise", accelerators=False) == {
      "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  assert malloc.hugepage_env({"JAX_PLATFORMS": "cpu,tpu"}, ("glibc", "2.35"), "madvise",
                             accelerators=True)["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_other_tunables_are_kept():
  env = malloc.hugepage_env(dict(CPU, GLIBC_TUNABLES="glibc.malloc.arena_max=2"), GLIBC,
                            "madvise", accelerators=False)
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("environ,libc,thp,accelerators", [
    (dict(CPU, LMTRAIN_HUGEPAGE_MALLOC="0"), GLIBC, "madvise", False),  # turned off
    (dict(CPU, GLIBC_TUNABLES="glibc.malloc.hugetlb=0"), GLIBC, "madvise", False),  # the user's
    (dict(CPU, GLIBC_TUNABLES="glibc.malloc.hugetlb=1"), GLIBC, "madvise", False),  # re-executed
    (CPU, ("glibc", "2.34"), "madvise", False),  # no such tunable before 2.35
    (CPU, ("", ""), "madvise", False),  # not glibc (musl)
    (CPU, GLIBC, "always", False),  # huge pages already
    (CPU, GLIBC, "never", False),
    (CPU, GLIBC, None, False),  # no THP in this kernel
    ({"JAX_PLATFORMS": "tpu"}, GLIBC, "madvise", True),
    ({"JAX_PLATFORMS": "cuda,cpu"}, GLIBC, "madvise", True),
    ({}, GLIBC, "madvise", True),  # an accelerator host
])
def test_left_as_is(environ, libc, thp, accelerators):
  assert malloc.hugepage_env(environ, libc, thp, accelerators) is None


def test_thp_mode_and_device_nodes(tmp_path):
  mode = tmp_path / "enabled"
  mode.write_text("always [madvise] never\n")
  assert malloc.thp_mode(str(mode)) == "madvise"
  mode.write_text("[always] madvise never\n")
  assert malloc.thp_mode(str(mode)) == "always"
  assert malloc.thp_mode(str(tmp_path / "missing")) is None

  dev = tmp_path / "dev"
  (dev / "vfio").mkdir(parents=True)
  (dev / "vfio" / "vfio").touch()  # the VFIO control node alone is no TPU
  (dev / "null").touch()
  assert not malloc.accelerator_present(str(dev))
  (dev / "vfio" / "0").touch()  # v5e and newer TPU VMs
  assert malloc.accelerator_present(str(dev))
  (dev / "vfio" / "0").unlink()
  (dev / "accel0").touch()  # v4 TPU VMs
  assert malloc.accelerator_present(str(dev))
  (dev / "accel0").unlink()
  (dev / "nvidia0").touch()
  assert malloc.accelerator_present(str(dev))


# A child that re-executes itself where it applies, then mallocs and touches 64 MiB through libc
# and reports its pid, its GLIBC_TUNABLES and the anonymous huge pages backing its memory.
CHILD = """
import ctypes, os
from lmtrain import malloc
malloc.reexec_with_hugepages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 64 << 20
block = libc.malloc(ctypes.c_size_t(size))
ctypes.memset(block, 1, size)
huge = [l for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages:")]
print(os.getpid(), os.environ.get("GLIBC_TUNABLES", "-"), int(huge[0].split()[1]) if huge else 0)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc tunables and /proc are Linux's")
@pytest.mark.parametrize("opt_out", ["", "0"])
def test_the_process_reexecutes_itself_under_the_tunable(opt_out):
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env["JAX_PLATFORMS"] = "cpu"
  env[malloc.OPT_OUT] = opt_out or "1"
  expected = malloc.hugepage_env(env, platform.libc_ver(), malloc.thp_mode(),
                                 malloc.accelerator_present())
  proc = subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE,
                          text=True)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0
  pid, tunables, huge_kb = out.split()
  assert int(pid) == proc.pid  # the same process, its image replaced
  if opt_out == "0":
    assert expected is None and tunables == "-"
  elif expected is not None:  # glibc >= 2.35, THP madvise: the tunable is set and takes effect
    assert tunables == "glibc.malloc.hugetlb=1"
    assert int(huge_kb) >= 2048
  else:
    assert tunables == "-"


def test_the_command_reexecutes_and_a_call_from_python_does_not(monkeypatch, capsys):
  calls = []
  monkeypatch.setattr(malloc, "reexec_with_hugepages", lambda: calls.append(True))
  monkeypatch.setattr(sys, "argv", ["lmtrain", "--help"])
  with pytest.raises(SystemExit):
    cli.command()
  assert calls == [True]
  with pytest.raises(SystemExit):
    cli.main()  # sys.argv, in this process
  with pytest.raises(SystemExit):
    cli.main(["--help"])
  assert calls == [True]
  assert "usage: lmtrain" in capsys.readouterr().out
