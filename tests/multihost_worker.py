"""One process of a multi-process run on one machine (started by test_multihost.py).

usage: multihost_worker.py WORKDIR TOKENIZER NUM_PROCESSES PROCESS_ID PORT MODE [STEPS]
MODE: `train` (the real per-host data shards), `merged` (a single process reading both hosts' shards
and concatenating them, i.e. the same global batches as a 2-process run), `fail` (process 1 dies at
the first step boundary); `ppo` and `ppo-merged`: the same for PPO (from WORKDIR/pretrain, with the
demo prompts and the rule-based scorer as the reward, so the host-side scoring gathers every
host's responses); `grpo` and `grpo-merged`: the same for GRPO (groups of 2 samples per prompt);
`sft` and `sft-merged`: SFT on the demo tasks, with its generated-answer eval; `reward` and
`reward-merged`: the reward model on the demo pairs, with its normalisation on the policy's samples.
"""

import json
import os
import sys

workdir, tokenizer, nproc, pid, port, mode = sys.argv[1:7]
steps = int(sys.argv[7]) if len(sys.argv) > 7 else 4
nproc, pid = int(nproc), int(pid)
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // nproc}"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("LMTRAIN_HEARTBEAT_TIMEOUT", "10")

import numpy as np  # noqa: E402

from lmtrain import config, parallel  # noqa: E402

if nproc > 1:
  parallel.maybe_initialize_distributed(f"localhost:{port}", nproc, pid)

import jax  # noqa: E402

from lmtrain.model import transformer  # noqa: E402
from lmtrain.stages import grpo, ppo, pretrain, reward, sft  # noqa: E402
from lmtrain.train import loop  # noqa: E402

common = {"MODEL": "tiny", "BATCH_SIZE": "8", "TRAIN_STEPS": str(steps), "LOG_EVERY": "1",
          "EVAL_EVERY": "0", "CHECKPOINT_EVERY": "2", "WARMUP_STEPS": "1",
          "TOKENIZER": repr(tokenizer), "MESH_SHAPE": "{'data': 2, 'fsdp': 2, 'tensor': 2}"}
init_from = repr(os.path.join(workdir, "pretrain"))
if mode.startswith(("ppo", "grpo")):
  name = mode.split("-")[0]
  config_text = config.setup(name, macros={
      **common, "LEARNING_RATE": "0.001", "REWARD": "'scorer'", "INIT_FROM": init_from,
      "PROMPT_LEN": "48", "MAX_NEW_TOKENS": "8", "GROUP_SIZE": "2" if name == "grpo" else "1"},
      params=[f"{name}.build.eval_examples = 8"])
  build = ppo.build if name == "ppo" else grpo.build
elif mode.startswith("reward"):
  config_text = config.setup("reward", macros={
      **common, "SEQ_LEN": "64", "LEARNING_RATE": "0.003", "INIT_FROM": init_from},
      params=["reward.build.normalization_pairs = 6"])  # 6 prompts on 4 batch shards: padded
  build = reward.build
elif mode.startswith("sft"):
  config_text = config.setup("sft", macros={
      **common, "SEQ_LEN": "64", "LEARNING_RATE": "0.003", "INIT_FROM": init_from},
      params=["sft.build.eval_examples = 8"])
  build = sft.build
else:
  config_text = config.setup("pretrain", macros={
      **common, "SEQ_LEN": "32", "LEARNING_RATE": "0.01",
      "HANG_TIMEOUT": "40" if mode == "fail" else "None"})
  build = pretrain.build
model_cfg = transformer.model_config()
loop_cfg = loop.LoopConfig()
stage = build(workdir, model_cfg, loop_cfg)
seen = []
host_iterator = stage.train_data


class Recording:
  """Feeds the loop from one or more per-host iterators (rows concatenated) and records the first
  tokens of every row fed, to check that hosts read disjoint shards."""

  def __init__(self, parts):
    self.parts = parts

  def __next__(self):
    batches = [next(p) for p in self.parts]
    batch = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    key = next(k for k in ("inputs", "prompt", "chosen_inputs") if k in batch)
    seen.extend(batch[key][:, -8:].tolist())
    if mode == "fail" and pid == 1 and len(seen) > 8:
      os._exit(7)  # dies without a word, as a crashed host would
    return batch

  # bytes: grain's checkpoint handler stores non-grain iterators' state raw. One part stores its
  # state as it is, so that a run with another process count finds the loader's own states.
  def get_state(self):
    states = [p.get_state() for p in self.parts]
    return json.dumps(states[0] if len(states) == 1 else states).encode()

  def set_state(self, state):
    if isinstance(state, dict):  # the old hosts' states, from a run with another process count
      self.parts[0].set_state(state)
      return
    states = json.loads(state.decode())
    for p, s in zip(self.parts, states if isinstance(states, list) else [states]):
      p.set_state(s)

  def start_prefetch(self):
    pass


def recording(process_index, process_count):
  if mode.endswith("merged"):
    return Recording([host_iterator(i, 2) for i in range(2)])
  return Recording([host_iterator(process_index, process_count)])


stage.train_data = recording
summary = loop.train(stage, workdir, loop_cfg, config_text)
with open(os.path.join(workdir, f"seen_{pid}_of_{nproc}.json"), "w") as f:
  json.dump({"rows": seen, "devices": jax.device_count(), "processes": jax.process_count(),
             "loss": summary["loss"]}, f)
