"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import atexit
import os
import shutil
import sys
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One XLA compilation cache for the whole session, shared with the CLI runs and worker processes
# the tests start (they inherit the environment): the e2e tests compile the same tiny programs many
# times over (the suite's largest cost on 2 cores). Fresh per session, removed at its end.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="lmtrain-test-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

import pytest  # noqa: E402

# The shared helpers (util, fake_gcs, multihost_worker) sit here, beside the test folders.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def pytest_collection_modifyitems(items):
  """Everything under e2e/ (whole CLI runs) is slow; CI still runs it."""
  e2e = os.path.join(HERE, "e2e") + os.sep
  for item in items:
    if str(item.fspath).startswith(e2e):
      item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
  """A 512-piece tokenizer of the demo corpus, trained once for the whole session."""
  from lmtrain.data import demo, tokenizer
  d = tmp_path_factory.mktemp("tok")
  train, _ = demo.write_pretrain_corpus(str(d / "data"))
  return tokenizer.train_tokenizer([train], 512, str(d / "tokenizer.model"))
