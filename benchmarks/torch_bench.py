"""Training throughput of lmtrain next to Hugging Face transformers (PyTorch eager and torch.compile)
on the same shapes, in one sitting.

    python benchmarks/torch_bench.py --models bench_tiny bench_small
    python benchmarks/torch_bench.py --attention auto xla chunked --unrolled

For each preset: a LlamaForCausalLM of the same shape (untied, no biases, SwiGLU, RMSNorm, RoPE) in
fp32, AdamW, random tokens, `--steps` timed steps after warm-up, with all CPU threads; then
`lmtrain bench` on one device in a subprocess (fp32, same batch and length, the attention setting
given). Prints tokens/s of each and lmtrain's ratio to the faster PyTorch. Figures only: the machine
is noisy, so compare the ratios of one run. Needs the test extras (torch, transformers).

The `lmtrain` command runs under glibc's huge-page malloc on CPU (lmtrain/malloc.py); PyTorch runs
here under the environment it is given. `GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python
benchmarks/torch_bench.py` gives it the same setting (on this project's CPU it made PyTorch 9%
slower on bench_small and left bench_tiny within the noise); `LMTRAIN_HUGEPAGE_MALLOC=0` takes it
from lmtrain.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import transformers

from lmtrain import config

SEQ = {"bench_tiny": 256, "bench_small": 512}


def hf_model(cfg):
  llama = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_size, rope_theta=cfg.rope_theta,
      rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
      max_position_embeddings=4096, attention_bias=False, mlp_bias=False)
  return transformers.LlamaForCausalLM(llama).float()


def torch_tokens_per_sec(cfg, batch, seq, steps, compiled: bool) -> float:
  torch.manual_seed(0)
  model = hf_model(cfg)
  model.train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
  forward = torch.compile(model) if compiled else model
  tokens = torch.randint(4, cfg.vocab_size, (batch, seq + 1))
  inputs, labels = tokens[:, :-1], tokens[:, 1:]

  def step():
    logits = forward(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             labels.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

  for _ in range(2):  # warm-up (and, compiled, the compilation)
    step()
  start = time.perf_counter()
  for _ in range(steps):
    step()
  return batch * seq * steps / (time.perf_counter() - start)


def lmtrain_tokens_per_sec(model: str, batch: int, seq: int, steps: int, attention: str,
                           scan_layers: bool = True) -> dict:
  cmd = [sys.executable, "-m", "lmtrain.cli", "bench", "--model", model, "--batch_size",
         str(batch), "--seq_len", str(seq), "--steps", str(steps), "--compile_layers", "",
         "--attention_impl", attention, "--mesh", "{'data': 1, 'fsdp': 1, 'tensor': 1}",
         "--json"] + ([] if scan_layers else ["--no_scan_layers"])
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", nargs="+", default=list(SEQ))
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--attention", nargs="+", default=["auto"],
                      help="lmtrain attention implementations to time (auto: causal_blocks on CPU)")
  parser.add_argument("--unrolled", action="store_true",
                      help="also time each with the layers unrolled (--no_scan_layers)")
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{os.cpu_count()} CPU threads; fp32, batch {args.batch_size}, {args.steps} timed steps")
  for name in args.models:
    cfg = config.preset_config(name)
    seq = SEQ.get(name, 512)
    eager = torch_tokens_per_sec(cfg, args.batch_size, seq, args.steps, compiled=False)
    compiled = torch_tokens_per_sec(cfg, args.batch_size, seq, args.steps, compiled=True)
    row = f"{name:<12} seq {seq}: HF eager {eager:,.0f} tok/s, torch.compile {compiled:,.0f}"
    for impl in args.attention:
      for scan in (True, False) if args.unrolled else (True,):
        ours = lmtrain_tokens_per_sec(name, args.batch_size, seq, args.steps, impl, scan)
        label = impl if scan else f"{impl}, unrolled"
        row += (f", lmtrain ({label}) {ours['tokens_per_sec']:,.0f} (MFU {ours['mfu']:.1%}, "
                f"x{ours['tokens_per_sec'] / max(eager, compiled):.2f} of the faster)")
    print(row, flush=True)


if __name__ == "__main__":
  main()
