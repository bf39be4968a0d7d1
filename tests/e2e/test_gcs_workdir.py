"""A gs:// work dir end to end, against a fake GCS server on 127.0.0.1 (tests/fake_gcs.py).

Every client lmtrain's files go through talks to that server: gcsfs (etils.epath with EPATH_USE_TF
off: our files, orbax's metadata, grain's iterator state), tensorstore (orbax's arrays) and
google-cloud-storage (tensorboardX's event file). Nothing leaves the machine: tensorstore gets a test
token, the others go anonymous, and the GCE metadata-server probe is switched off.
"""

import json
import os
import subprocess
import sys

import gcsfs.core
import pytest

import fake_gcs

BUCKET = "lmtrain-test"
SMALL = ["--gin.MODEL=tiny", "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=32", "--gin.LOG_EVERY=1",
         "--gin.EVAL_STEPS=1", "--gin.CHECKPOINT_EVERY=2"]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """(environment for lmtrain subprocesses, gcsfs client, scratch dir) of a fresh fake GCS."""
  server, url = fake_gcs.start(BUCKET)
  scratch = tmp_path_factory.mktemp("gcs")
  (scratch / "tmp").mkdir()
  env = {k: v for k, v in os.environ.items() if k != "GOOGLE_APPLICATION_CREDENTIALS"}
  env.update(
      XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
      STORAGE_EMULATOR_HOST=url,  # gcsfs and google-cloud-storage
      TENSORSTORE_GCS_HTTP_URL=url, GOOGLE_AUTH_TOKEN_FOR_TESTING="test",  # tensorstore
      EPATH_USE_TF="false",  # epath through gcsfs, even with TensorFlow installed (seqio)
      GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",  # no bucket-layout RPCs to the real control API
      FSSPEC_GCS_TOKEN="anon",  # gcsfs: no credential search (and no warning about its failure)
      NO_GCE_CHECK="true", GCE_METADATA_HOST="127.0.0.1:9", GCE_METADATA_IP="127.0.0.1:9",
      CLOUDSDK_CONFIG=str(scratch / "gcloud"),  # no application-default credentials of the user
      TMPDIR=str(scratch / "tmp"))  # where the demo data of a bucket work dir goes
  # The plain client: gcsfs.GCSFileSystem may be the extended one, which asks the control API.
  fs = gcsfs.core.GCSFileSystem(endpoint_url=url, token="anon", skip_instance_cache=True,
                                use_listings_cache=False)
  yield env, fs, scratch
  server.stop()


def lmtrain(env, cwd, *args, check=True):
  proc = subprocess.run([sys.executable, "-m", "lmtrain.cli", *map(str, args)], env=env, cwd=cwd,
                        capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
  return proc


def rows(fs, path):
  return [json.loads(line) for line in fs.cat_file(path).decode().splitlines() if line.strip()]


def steps_saved(fs, stage):
  """Checkpoint steps that orbax finished (on a bucket it marks them with commit_success.txt)."""
  return sorted(int(p.rsplit("/", 1)[1]) for p in fs.ls(f"{stage}/checkpoints", detail=False)
                if p.rsplit("/", 1)[1].isdigit() and fs.exists(f"{p}/commit_success.txt"))


@pytest.mark.slow
def test_pretrain_resume_sample_and_report_in_a_bucket(gcs):
  env, fs, scratch = gcs
  workdir = f"gs://{BUCKET}/runs/tiny"
  stage = f"{BUCKET}/runs/tiny/pretrain"
  cwd = scratch / "cwd"
  cwd.mkdir()
  lmtrain(env, cwd, "pretrain", "--workdir", workdir, *SMALL, "--gin.TRAIN_STEPS=4")

  # Everything of the stage is in the bucket: the tokenizer it trained, config, lineage, metrics,
  # TensorBoard events and orbax checkpoints (arrays through tensorstore, iterator state by grain).
  assert fs.exists(f"{BUCKET}/runs/tiny/tokenizer.model")
  names = {p.rsplit("/", 1)[1] for p in fs.ls(stage, detail=False)}
  assert {"config.gin", "model.json", "lineage.json", "metrics.jsonl", "tb",
          "checkpoints"} <= names, names
  assert not [n for n in names if n.startswith(".write_test")], names  # the probes are removed
  assert "run.lock" not in names, names  # the run's lock object is deleted at its end
  lineage = json.loads(fs.cat_file(f"{stage}/lineage.json"))
  assert lineage["stage"] == "pretrain" and lineage["parent"] is None
  assert lineage["tokenizer"] == f"{workdir}/tokenizer.model"
  assert "MODEL" in fs.cat_file(f"{stage}/config.gin").decode()
  assert json.loads(fs.cat_file(f"{stage}/model.json"))["num_layers"] >= 1
  first = rows(fs, f"{stage}/metrics.jsonl")
  assert [r["step"] for r in first if "loss" in r] == [1, 2, 3, 4]
  assert any("eval_loss" in r for r in first)
  events = [p for p in fs.ls(f"{stage}/tb", detail=True)
            if p["name"].rsplit("/", 1)[1].startswith("events.out.tfevents")]
  assert events and all(int(e["size"]) > 0 for e in events)
  assert steps_saved(fs, stage) == [2, 4]
  data_state = fs.ls(f"{stage}/checkpoints/4/data", detail=False)
  assert any(p.endswith("process_0-of-1.json") for p in data_state), data_state
  # The demo data went to a local directory under TMPDIR, and no path was taken for a local one.
  assert list((scratch / "tmp" / "lmtrain").glob("*/data/pretrain_train.jsonl"))
  assert os.listdir(cwd) == []

  # A longer schedule resumes from the bucket's step-4 checkpoint; metrics.jsonl keeps its rows.
  proc = lmtrain(env, cwd, "pretrain", "--workdir", workdir, *SMALL, "--gin.TRAIN_STEPS=6")
  resumed = rows(fs, f"{stage}/metrics.jsonl")
  assert resumed[:len(first)] == first
  assert [r["step"] for r in resumed[len(first):] if "loss" in r] == [5, 6]
  assert steps_saved(fs, stage) == [2, 4, 6]
  assert f"{workdir}/pretrain/checkpoints" in proc.stdout

  # `sample` reads model.json, lineage.json, the tokenizer and the params from the bucket.
  proc = lmtrain(env, cwd, "sample", "--checkpoint", f"{workdir}/pretrain", "--prompt", "The",
                 "--max_new_tokens", "4", "--greedy")
  assert f"pretrain checkpoint step 6 ({workdir}/pretrain)" in proc.stdout

  # `report` reads the stage directories and writes its PNGs and summary.md into the bucket.
  lmtrain(env, cwd, "report", workdir)
  report = {p.rsplit("/", 1)[1] for p in fs.ls(f"{BUCKET}/runs/tiny/report", detail=False)}
  assert {"loss.png", "summary.md"} <= report, report
  assert fs.cat_file(f"{BUCKET}/runs/tiny/report/loss.png")[:8] == b"\x89PNG\r\n\x1a\n"
  assert os.listdir(cwd) == []


def test_missing_bucket_is_a_one_line_error(gcs, tokenizer_path):
  env, _, scratch = gcs
  workdir = "gs://no-such-bucket/run"
  proc = lmtrain(env, scratch, "pretrain", "--workdir", workdir, *SMALL, "--gin.TRAIN_STEPS=2",
                 f"--gin.TOKENIZER={tokenizer_path}", check=False)
  assert "Traceback" not in proc.stderr, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1 and len(lines) == 1, proc.stderr
  assert lines[0] == (f"lmtrain: error: --workdir {workdir}: cannot write there "
                      f"(no such bucket or object)"), lines


@pytest.mark.slow
def test_prepare_into_a_bucket_and_pretrain_from_it(gcs, tokenizer_path, tmp_path):
  """A corpus in a bucket (gzip JSONL) is prepared into the bucket, and pretraining streams its
  shards from there by ranged reads: nothing is copied to the machine by hand."""
  import gzip  # pylint: disable=g-import-not-at-top
  env, fs, scratch = gcs
  lines = [json.dumps({"text": f"Document {i}: the quick brown fox jumps over dog {i % 7}."})
           for i in range(300)]
  for part in range(2):
    fs.pipe_file(f"{BUCKET}/raw/part-{part}.jsonl.gz",
                 gzip.compress("\n".join(lines[part::2]).encode() + b"\n"))
  corpus = f"gs://{BUCKET}/corpora/fox"
  proc = lmtrain(env, scratch, "prepare", "--input", f"gs://{BUCKET}/raw/*.jsonl.gz",
                 "--tokenizer", tokenizer_path, "--output", corpus, "--num_workers", "1",
                 "--num_shards", "3")
  summary = json.loads(proc.stdout)
  assert summary["documents"] == 300, summary
  manifest = json.loads(fs.cat_file(f"{BUCKET}/corpora/fox/manifest.json"))
  assert manifest["documents"] == 300 and len(manifest["shards"]) == 3
  assert sorted(s["path"] for s in manifest["sources"]) == [
      f"gs://{BUCKET}/raw/part-0.jsonl.gz", f"gs://{BUCKET}/raw/part-1.jsonl.gz"]
  names = {p.rsplit("/", 1)[1] for p in fs.ls(f"{BUCKET}/corpora/fox", detail=False)}
  assert {"manifest.json", "tokenizer.model", "shard-00000-of-00003.tokens",
          "shard-00002-of-00003.index"} <= names, names
  assert sum(s["tokens"] for s in manifest["shards"]) == manifest["tokens"]

  workdir = tmp_path / "run"
  lmtrain(env, scratch, "pretrain", "--workdir", workdir, *SMALL, "--gin.TRAIN_STEPS=2",
          f"--gin.TRAIN_DATA='{corpus}'", f"--gin.EVAL_DATA='{corpus}'",
          f"--gin.TOKENIZER='{tokenizer_path}'")
  metrics = [json.loads(line) for line in open(workdir / "pretrain" / "metrics.jsonl")]
  assert [r["step"] for r in metrics if "loss" in r] == [1, 2]
  assert any("eval_loss" in r for r in metrics)
  # Trained from the bucket's shards, with no local copy of the corpus.
  assert not list(workdir.rglob("*.tokens"))
