"""Transparent huge pages for glibc's malloc in CPU runs, set before the process starts.

XLA:CPU allocates each execution's temporaries afresh, and glibc serves large blocks with mmap and
unmaps them on free, so every training step faults its working set back in, 4 KiB at a time
(bench_small: ~730k page faults a step; bench_tiny ~85k). glibc 2.35 and later can advise the kernel
to back its mappings with 2 MiB transparent huge pages (the tunable `glibc.malloc.hugetlb=1`), which
cuts the process's page faults 8-25-fold (bench_tiny, bench_small). That needs the kernel's THP mode
to be `madvise` (as on this project's machines; under `always` the pages are huge already, under
`never` nothing can be done), and the tunable is read only when a process starts: so the `lmtrain`
command, before it imports anything heavy, executes its own command line once more with the tunable
added to `GLIBC_TUNABLES` (same process id, same arguments). Measured on a 2-core CPU: bench_tiny
+6-13% tokens/s, bench_small 0-2% (README "Benchmarks").

It applies only where JAX will run on the CPU (`JAX_PLATFORMS` names cpu first, or, unset, the host
has no TPU or GPU device node): on accelerator hosts the step's memory is the device's, and the
setting is unmeasured there. `LMTRAIN_HUGEPAGE_MALLOC=0` turns it off; a `GLIBC_TUNABLES` that sets
`glibc.malloc.hugetlb` already is left as it is.
"""

import glob
import os
import platform
import re
import sys

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "LMTRAIN_HUGEPAGE_MALLOC"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
# TPU VMs expose their chips as /dev/accel* (v4 and older) or /dev/vfio/<n> (v5e and newer);
# NVIDIA GPUs as /dev/nvidia<n>.
ACCELERATOR_NODES = ("accel[0-9]*", "vfio/[0-9]*", "nvidia[0-9]*")


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
  """The kernel's transparent-huge-page mode (`always`, `madvise`, `never`), None if unknown."""
  try:
    with open(path, encoding="ascii") as f:
      match = re.search(r"\[(\w+)\]", f.read())
  except (OSError, UnicodeDecodeError):
    return None
  return match.group(1) if match else None


def accelerator_present(dev: str = "/dev") -> bool:
  return any(glob.glob(os.path.join(dev, pattern)) for pattern in ACCELERATOR_NODES)


def hugepage_env(environ, libc: tuple[str, str], thp: str | None, accelerators: bool):
  """The environment to run under instead of `environ`, or None to run as is (module docstring)."""
  if environ.get(OPT_OUT, "1").strip() == "0":
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if TUNABLE in tunables:
    return None
  name, version = libc
  release = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
  if name != "glibc" or len(release) < 2 or release < (2, 35) or thp != "madvise":
    return None
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  on_cpu = platforms.split(",")[0].strip() == "cpu" if platforms else not accelerators
  if not on_cpu:
    return None
  setting = f"{TUNABLE}=1"
  return dict(environ, GLIBC_TUNABLES=f"{tunables}:{setting}" if tunables else setting)


def reexec_with_hugepages():
  """Executes this process's own command line again under `hugepage_env` where it applies (does
  not return then); otherwise returns and the process goes on as it is."""
  if sys.platform != "linux":
    return
  env = hugepage_env(os.environ, platform.libc_ver(), thp_mode(), accelerator_present())
  if env is None or not sys.orig_argv:  # an embedded interpreter has no command line to repeat
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)
