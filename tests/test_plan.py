"""`lmtrain plan`: parameter and byte counts against published figures and hand arithmetic, fitting,
the GPT-3 compute example, slice names, and the CLI's text and JSON."""

import dataclasses
import json
import subprocess
import sys

import pytest

from lmtrain import plan
from lmtrain.train import memory
from util import ENV


def run_plan(*args):
  proc = subprocess.run([sys.executable, "-m", "lmtrain.cli", "plan", *args], env=ENV,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout


@pytest.fixture(scope="module")
def llama():
  """The JSON plans of llama2_7b and llama3_8b pretraining on a v5p-8 (4 chips, all on fsdp)."""
  return {m: json.loads(run_plan("--model", m, "--slice", "v5p-8", "--seq_len", "4096",
                                 "--batch_size", "8", "--json"))
          for m in ("llama2_7b", "llama3_8b")}


@pytest.mark.parametrize("name,params", [("llama2_7b", 6_738_415_616),
                                         ("llama3_8b", 8_030_261_248)])
def test_llama_parameters_and_state_bytes_by_hand(llama, name, params):
  result = llama[name]
  assert result["model"]["params"] == params
  assert result["hardware"]["chips"] == 4 and result["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  mem = result["memory_per_device_bytes"]
  # fp32 params split 4 ways (every dimension the fsdp axis takes divides by 4), their fp32
  # gradients, and AdamW's two fp32 moments (plus its int32 step count, once per chip).
  assert mem["trained params"] == 4 * params // 4
  assert mem["gradients"] == mem["trained params"]
  assert 0 <= mem["optimizer state"] - 2 * 4 * params // 4 <= 16
  assert mem["frozen models"] == 0
  assert result["fits"] is True
  assert mem["total"] == sum(v for k, v in mem.items() if k != "total")


def test_frozen_roles_and_kv_cache_of_ppo(llama):
  result = json.loads(run_plan("--model", "llama2_7b", "--stage", "ppo", "--slice", "v5p-8",
                               "--seq_len", "1024", "--batch_size", "8", "--json"))
  mem, pretrain = result["memory_per_device_bytes"], llama["llama2_7b"]["memory_per_device_bytes"]
  # The value and reward models: no LM head but a score vector (split) and a scalar bias, whose 4
  # bytes every chip holds.
  scalar_head_split = 6_738_415_616 - 32000 * 4096 + 4096
  assert mem["trained params"] == 4 * (6_738_415_616 + scalar_head_split) // 4 + 4
  # The frozen reference and reward model store their matrices in bf16 (FROZEN_DTYPE auto on a
  # TPU), their norm gains and score vector (65 x 4096 + 4096 numbers) in fp32.
  vectors = 65 * 4096
  policy_matrices = 6_738_415_616 - vectors
  reward_matrices = policy_matrices - 32000 * 4096
  assert mem["frozen models"] == (2 * (policy_matrices + reward_matrices)
                                  + 4 * (2 * vectors + 4096)) // 4 + 4
  # The policy's decode copy: bf16 matrices, whole on every chip (no tensor axis here).
  assert mem["decode weights"] == 2 * policy_matrices + 4 * vectors
  # bf16 keys and values: 2 x 32 layers x 8 rows x 1024 positions x 32 heads x 128, over 4 chips.
  assert mem["KV cache"] == 2 * 32 * 8 * 1024 * 32 * 128 * 2 // 4
  assert mem["trained params"] > pretrain["trained params"]
  fp32 = json.loads(run_plan("--model", "llama2_7b", "--stage", "ppo", "--slice", "v5p-8",
                             "--seq_len", "1024", "--batch_size", "8", "--frozen_dtype",
                             "float32", "--json"))["memory_per_device_bytes"]
  assert fp32["frozen models"] == 4 * (6_738_415_616 + scalar_head_split) // 4 + 4


def test_a_70b_model_does_not_fit_a_v5p_8():
  out = run_plan("--params", "70B", "--slice", "v5p-8")
  assert "DOES NOT FIT in 95.0 GiB" in out
  result = json.loads(run_plan("--params", "70B", "--slice", "v5p-8", "--json"))
  assert result["fits"] is False
  assert result["model"]["params"] == pytest.approx(70e9, rel=0.02)
  mem = result["memory_per_device_bytes"]
  assert mem["trained params"] + mem["gradients"] + mem["optimizer state"] > 95 * memory.GIB


def test_gpt3_on_v100s_takes_about_355_gpu_years():
  """GPT-3 (175B) on 300B tokens: ~3.1e23 FLOPs; at a V100's ~28 TFLOP/s sustained, ~355 years."""
  result = json.loads(run_plan("--params", "175B", "--tokens", "300B", "--hardware", "v100",
                               "--sustained_tflops", "28", "--json"))
  compute = result["compute"]
  assert result["model"]["params"] == pytest.approx(175e9, rel=0.01)
  assert compute["total_flops"] == pytest.approx(3.14e23, rel=0.03)
  assert compute["chip_years"] == pytest.approx(355, rel=0.03)
  assert compute["chinchilla_tokens"] == pytest.approx(20 * result["model"]["params"])
  assert compute["cost"] is None  # no price is assumed
  priced = json.loads(run_plan("--params", "175B", "--tokens", "300B", "--hardware", "v100",
                               "--sustained_tflops", "28", "--price_per_chip_hour", "2", "--json"))
  assert priced["compute"]["cost"] == pytest.approx(2 * compute["chip_hours"])


def test_slice_names_count_chips():
  assert plan.chips_of_slice("v5p-8") == ("v5p", 4)
  assert plan.chips_of_slice("v4-32") == ("v4", 16)
  assert plan.chips_of_slice("v5e-256") == ("v5e", 256)
  assert plan.chips_of_slice("v6e-8") == ("v6e", 8)
  with pytest.raises(Exception, match="expected KIND-N"):
    plan.chips_of_slice("v9-8")


def test_activation_estimate_follows_remat_and_attention():
  from lmtrain.model import transformer
  cfg = transformer.ModelConfig(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32,
                                mlp_dim=11008, dtype="bfloat16")
  none = memory.activation_bytes(cfg, 1, 8192)
  full = memory.activation_bytes(dataclasses.replace(cfg, remat="full"), 1, 8192)
  chunked = memory.activation_bytes(
      dataclasses.replace(cfg, remat="full", attention_impl="chunked"), 1, 8192)
  assert none > full > chunked
  # xla's fp32 scores of one layer at 8k: 32 heads x 8192^2 x 4 bytes, twice (logits, probs).
  assert full - chunked == 2 * 32 * 8192 * (8192 - 512) * 4


@pytest.mark.parametrize("args,message", [
    (["--params", "lots"], "--params 'lots' is not a number"),
    (["--slice", "v100-8"], "--slice 'v100-8': expected KIND-N with KIND one of v4, v5e, v5p, v6e"),
    (["--stage", "rlhf"], "--stage 'rlhf'; choose one of pretrain, sft, reward, dpo, ppo, grpo"),
])
def test_bad_flags_are_one_line_errors(args, message):
  proc = subprocess.run([sys.executable, "-m", "lmtrain.cli", "plan", *args], env=ENV,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().startswith(f"lmtrain: error: {message}")
  assert len(proc.stderr.strip().splitlines()) == 1


def test_lora_dpo_holds_adapter_moments_and_no_reference_copy():
  """llama2_7b DPO with r=8 adapters on all seven weights: AdamW and the gradients cover the
  adapters only, and the base (DPO's reference) is held once."""
  full, lora = (json.loads(run_plan("--model", "llama2_7b", "--stage", "dpo", "--slice", "v5p-8",
                                    "--seq_len", "1024", "--batch_size", "8", "--json", *extra))
                for extra in ((), ("--override", "lora_rank=8")))
  base = 6_738_415_616
  # Per layer: r x (in + out) for q, k, v, o (4096 + 4096 each) and gate, up, down (4096 + 11008).
  adapters = 32 * 8 * (4 * 8192 + 3 * 15104)
  assert lora["model"]["params"] == base + adapters
  mem, before = lora["memory_per_device_bytes"], full["memory_per_device_bytes"]
  # Each adapter matrix is split like its weight along the weight's own dims: those with an embed
  # dim split over fsdp (A of q, k, v, gate, up; B of o, down), the others (heads and mlp dims,
  # on the tensor axis of size 1 here) whole.
  split = 5 * 4096 * 8 + 2 * 8 * 4096
  whole = 4096 * 8 + 11008 * 8 + 3 * 8 * 4096 + 2 * 8 * 11008
  assert 32 * (split + whole) == adapters
  per_device = 4 * 32 * (split // 4 + whole)
  assert mem["trained params"] == mem["gradients"] == per_device
  assert 0 <= mem["optimizer state"] - 2 * per_device <= 16
  # The base once (no reference copy), its matrices in bf16 (LORA_BASE_DTYPE 'auto' on a TPU),
  # the norm scales (65 x 4096) in fp32; --lora_base_dtype float32 holds it all in fp32.
  vectors = 65 * 4096
  assert mem["frozen models"] == (2 * (base - vectors) + 4 * vectors) // 4
  assert before["frozen models"] == before["trained params"] == 4 * base // 4
  assert mem["total"] < before["total"] / 2
  fp32 = json.loads(run_plan("--model", "llama2_7b", "--stage", "dpo", "--slice", "v5p-8",
                             "--seq_len", "1024", "--batch_size", "8", "--json", "--override",
                             "lora_rank=8", "--lora_base_dtype", "float32"))
  assert fp32["memory_per_device_bytes"]["frozen models"] == 4 * base // 4


def test_lora_ppo_trains_adapters_and_value_head_with_no_reference_copy():
  """llama2_7b PPO with r=8 adapters on policy and value: AdamW and the gradients cover the
  adapters and the value head; the frozen models are the two bases and the reward model, their
  matrices in bf16, with no reference copy; the policy still decodes from a (merged) bf16 copy."""
  mem = json.loads(run_plan("--model", "llama2_7b", "--stage", "ppo", "--slice", "v5p-8",
                            "--seq_len", "1024", "--batch_size", "8", "--json", "--override",
                            "lora_rank=8"))["memory_per_device_bytes"]
  # One model's adapters per device, split as in the DPO case; the value model's score vector
  # split, its bias on every chip.
  adapters = 4 * 32 * ((5 * 4096 * 8 + 2 * 8 * 4096) // 4
                       + 4096 * 8 + 11008 * 8 + 3 * 8 * 4096 + 2 * 8 * 11008)
  trained = 2 * adapters + 4 * 4096 // 4 + 4
  assert mem["trained params"] == mem["gradients"] == trained
  assert 0 <= mem["optimizer state"] - 2 * trained <= 64
  vectors = 65 * 4096
  reward_matrices = 6_738_415_616 - vectors - 32000 * 4096
  policy_base = (2 * (6_738_415_616 - vectors) + 4 * vectors) // 4
  value_trunk = (2 * (6_738_415_616 - 32000 * 4096 - vectors) + 4 * vectors) // 4
  reward = (2 * reward_matrices + 4 * (vectors + 4096)) // 4 + 4
  assert mem["frozen models"] == policy_base + value_trunk + reward
  assert mem["decode weights"] == 2 * (6_738_415_616 - vectors) + 4 * vectors
