"""Memory benchmark: compile-time temporary memory of one training gradient at long context.

    python benchmarks/memory_bench.py --lengths 2048 4096 8192

A 7B-width model (llama2_7b with 2 layers: d 4096, 32 heads, MLP 11008, vocab 32000; and the same with
llama3_8b's vocab 128256) in float32 on one CPU device, remat "full", batch 1: the gradient of the
mean LM loss is compiled (not run) for each attention implementation and cross-entropy setting, and
XLA's memory analysis gives the temporary bytes (activations and workspace; the parameters, their
gradients and the batch are the arguments and outputs, listed apart). Figures are printed, never
asserted.
"""

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from lmtrain.losses import lm_loss
from lmtrain.model import transformer

GIB = 2**30
SETTINGS = {  # name: ModelConfig overrides
    "xla": {"attention_impl": "xla"},
    "chunked": {"attention_impl": "chunked"},
    "chunked+ce256": {"attention_impl": "chunked", "logits_chunk": 256},
}


def width_model(vocab: int) -> transformer.ModelConfig:
  return transformer.ModelConfig(vocab_size=vocab, d_model=4096, num_layers=2, num_heads=32,
                                 mlp_dim=11008, remat="full", dtype="float32")


def compiled_memory(cfg: transformer.ModelConfig, length: int) -> dict:
  graphdef, abstract_params, _ = transformer.abstract_model(cfg)
  tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
  batch = {"inputs": tokens, "targets": tokens, "segment_ids": tokens, "positions": tokens,
           "loss_mask": jax.ShapeDtypeStruct((1, length), jnp.float32)}

  def loss(params, batch):
    total, weight, _ = lm_loss(transformer.merge(graphdef, params), batch, None)
    return total / weight

  start = time.perf_counter()
  compiled = jax.jit(jax.grad(loss)).lower(abstract_params, batch).compile()
  seconds = time.perf_counter() - start
  stats = compiled.memory_analysis()
  return {"temp_gib": stats.temp_size_in_bytes / GIB,
          "args_gib": stats.argument_size_in_bytes / GIB,
          "out_gib": stats.output_size_in_bytes / GIB, "compile_s": seconds}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
  parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128256])
  parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
  args = parser.parse_args()
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; d 4096, 2 layers, fp32, "
        f"remat full, batch 1; temp = XLA's compile-time temporary bytes")
  print(f"{'vocab':>7} {'setting':>14} " + " ".join(f"{'T=' + str(t):>10}" for t in args.lengths)
        + "   growth per doubling   (params+grads GiB)")
  for vocab in args.vocabs:
    for name in args.settings:
      cfg = dataclasses.replace(width_model(vocab), **SETTINGS[name])
      rows = [compiled_memory(cfg, t) for t in args.lengths]
      temps = [r["temp_gib"] for r in rows]
      growth = [b / a for a, b in zip(temps, temps[1:])]
      print(f"{vocab:>7} {name:>14} " + " ".join(f"{t:>8.2f}Gi" for t in temps)
            + "   " + " ".join(f"{g:.2f}x" for g in growth)
            + f"   ({rows[0]['args_gib'] + rows[0]['out_gib']:.1f}; compile "
            + f"{np.mean([r['compile_s'] for r in rows]):.0f} s)", flush=True)


if __name__ == "__main__":
  main()
