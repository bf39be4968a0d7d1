"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
  """A 512-piece tokenizer of the demo corpus, trained once for the whole session."""
  from lmtrain.data import demo, tokenizer
  d = tmp_path_factory.mktemp("tok")
  train, _ = demo.write_pretrain_corpus(str(d / "data"))
  return tokenizer.train_tokenizer([train], 512, str(d / "tokenizer.model"))
