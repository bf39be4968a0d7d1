"""Hugging Face TRL's GRPOTrainer on CPU, on the shape of rollout_bench.py's GRPO iteration.

    python benchmarks/trl_grpo_bench.py                 # bench_tiny, 8 steps, the first 2 dropped
    python benchmarks/trl_grpo_bench.py --steps 12 --warmup 2

The other half of the README's TRL comparison: run it in the same sitting as rollout_bench.py and
compare its "grpo iteration" rollouts/s with the rollouts/s printed here. Needs the bench extra
(pip install -e ".[test,bench]": trl, datasets). Nothing is downloaded (HF_HUB_OFFLINE=1).

The shape (rollout_bench.py's defaults):
  policy: LlamaForCausalLM of the preset's shape (bench_tiny: vocab 8000, d 256, 4 layers, 4 heads,
    4 KV heads, MLP 768, untied, RMSNorm eps and rope theta from lmtrain's ModelConfig), fp32,
    random init (seed 0), saved to a temporary folder and loaded from there (TRL builds the
    reference model from the policy's `name_or_path`, so it needs one on disk);
  reward model: LlamaForSequenceClassification of the same shape, num_labels=1 (seed 1), fp32;
  tokenizer: built in code (`tokenizers` WordLevel: "</s>" = id 0, "t1".."t7999" = ids 1..7999,
    split on whitespace); "</s>" is the only special token (EOS and pad);
  per optimizer step: one 224-token prompt (random ids 4..7999, checked to tokenize back to exactly
    those ids, no BOS/EOS added) x num_generations=8 rollouts of 32 new tokens each.

TRL settings (GRPOConfig) and why:
  per_device_train_batch_size=8, num_generations=8, gradient_accumulation_steps=1: one prompt x 8
    generations per optimizer step (generation_batch_size 8, steps_per_generation 1);
  num_iterations=1: one epoch over each batch (ours: 1 epoch, 1 minibatch); TRL then runs no
    separate "old log-probs" forward (the loss's ratio is the training forward's own, detached);
  beta=0.04: a non-zero KL coefficient makes TRL keep a reference model and run its forward every
    step (k3 KL in the loss), as our GRPO iteration does (ours: kl_coef 0.05; the value changes
    nothing in the cost). With beta=0.0 (TRL's default) there is no reference model at all;
  max_completion_length=32 and generation_kwargs={"min_new_tokens": 32}: EOS is masked out of the
    sampling distribution for all 32 tokens, so every rollout generates all 32 (ours: eos_id=-1);
    the mean/min/max completion length and the reward model's input length are printed to show it;
  temperature=1.0, top_p=1.0, top_k=0 (plain sampling), loss_type="dapo" (token-mean over the
    batch, our "token" aggregation), epsilon=0.2 (our clip_eps), learning_rate=1e-5, AdamW,
    max_grad_norm=1.0;
  bf16=False (TRL's config defaults to bf16=True, which on CPU would autocast to bf16) and
    gradient_checkpointing=False (TRL's default is True): plain fp32, no recomputation;
  use_cpu=True, use_vllm=False (generation with transformers' `generate`), report_to="none",
    logging_strategy="no", save_strategy="no", disable_tqdm=True, torch threads = CPU cores.

Timing: a TrainerCallback records the wall time of each optimizer step (on_step_begin to
on_step_end: generation, reward model, reference and policy forwards, backward, AdamW step); the
first --warmup steps are dropped; rollouts/s = 8 / mean seconds per step. Figures are printed,
never asserted.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="bench_tiny", help="lmtrain preset giving the shape")
  parser.add_argument("--rollouts", type=int, default=8, help="generations of the one prompt")
  parser.add_argument("--prompt_len", type=int, default=224)
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--steps", type=int, default=8, help="optimizer steps, warm-up included")
  parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the mean")
  parser.add_argument("--beta", type=float, default=0.04, help="KL coefficient (0: no reference)")
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  args = parser.parse_args()
  if args.steps <= args.warmup:
    parser.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")
  run(args)


def hf_llama_config(cfg, **kwargs):
  import transformers
  return transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_size, rope_theta=cfg.rope_theta,
      rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
      max_position_embeddings=4096, attention_bias=False, mlp_bias=False,
      bos_token_id=None, eos_token_id=0, pad_token_id=0, **kwargs)


def make_tokenizer(vocab_size: int):
  """A word-level tokenizer of `vocab_size` ids: "</s>" (0, EOS and pad), "t1".."t{V-1}"."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  vocab = {"</s>": 0, **{f"t{i}": i for i in range(1, vocab_size)}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>",
                                 model_max_length=4096)


def make_step_timer():
  """A TrainerCallback recording each optimizer step's wall time and its completion lengths."""
  import transformers

  class StepTimer(transformers.TrainerCallback):
    def __init__(self):
      self.trainer, self.begin, self.seconds, self.lengths = None, None, [], []

    def on_step_begin(self, args, state, control, **kwargs):
      self.begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
      self.seconds.append(time.perf_counter() - self.begin)
      metrics = self.trainer._metrics["train"]  # kept until the next log (none before the end)
      self.lengths.append(tuple(metrics[f"completions/{k}_length"][-1]
                                for k in ("mean", "min", "max")))

  return StepTimer()


def run(args):
  import warnings

  import datasets
  import numpy as np
  import torch
  import transformers
  import trl

  warnings.filterwarnings("ignore", category=FutureWarning)  # gradient_checkpointing's new name
  transformers.utils.logging.disable_progress_bar()

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from lmtrain import config

  torch.set_num_threads(args.threads)
  cfg = config.preset_config(args.model)
  rows, width, new = args.rollouts, args.prompt_len, args.new_tokens

  tokenizer = make_tokenizer(cfg.vocab_size)
  rng = np.random.default_rng(0)
  prompt_ids = rng.integers(4, cfg.vocab_size, (args.steps, width))
  prompts = [" ".join(f"t{i}" for i in ids) + " " for ids in prompt_ids]
  # TRL scores `prompt + completion` as one string: the trailing space keeps the prompt's last
  # word apart from the completion's first. Check the round trip.
  for ids, text in zip(prompt_ids, prompts):
    back = tokenizer(text, add_special_tokens=False)["input_ids"]
    if back != ids.tolist() or tokenizer(text)["input_ids"] != back:
      raise RuntimeError(f"prompt round trip: {len(back)} ids, not the {width} given")
  dataset = datasets.Dataset.from_dict({"prompt": prompts})

  with tempfile.TemporaryDirectory(prefix="trl_grpo_bench_") as tmp:
    torch.manual_seed(0)
    policy_dir = os.path.join(tmp, "policy")
    transformers.LlamaForCausalLM(hf_llama_config(cfg)).float().save_pretrained(policy_dir)
    policy = transformers.LlamaForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    torch.manual_seed(1)
    reward = transformers.LlamaForSequenceClassification(
        hf_llama_config(cfg, num_labels=1)).float()
    reward.eval()
    reward_lengths = []
    reward.register_forward_pre_hook(
        lambda module, a, kw: reward_lengths.extend(kw["attention_mask"].sum(-1).tolist()),
        with_kwargs=True)

    grpo_args = trl.GRPOConfig(
        output_dir=os.path.join(tmp, "out"), use_cpu=True, report_to="none",
        logging_strategy="no", save_strategy="no", disable_tqdm=True,
        bf16=False, fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=rows, gradient_accumulation_steps=1,
        num_generations=rows, num_iterations=1, max_steps=args.steps, shuffle_dataset=False,
        max_completion_length=new, generation_kwargs={"min_new_tokens": new},
        temperature=1.0, top_p=1.0, top_k=0, beta=args.beta, epsilon=0.2, loss_type="dapo",
        learning_rate=1e-5, lr_scheduler_type="constant", max_grad_norm=1.0, seed=0,
        dataloader_num_workers=0, use_vllm=False)
    timer = make_step_timer()
    trainer = trl.GRPOTrainer(model=policy, reward_funcs=reward, args=grpo_args,
                              train_dataset=dataset, processing_class=tokenizer,
                              reward_processing_classes=tokenizer, callbacks=[timer])
    timer.trainer = trainer
    print(f"{args.model}: {sum(p.numel() for p in policy.parameters()):,} policy parameters, "
          f"reference model {'kept' if trainer.ref_model is not None else 'none'} "
          f"(beta {args.beta}), {rows} rollouts of {new} new tokens after {width}-token prompts, "
          f"fp32, {torch.get_num_threads()} torch threads")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl "
          f"{trl.__version__}, accelerate {__import__('accelerate').__version__}, datasets "
          f"{datasets.__version__}", flush=True)
    trainer.train()

  steps = timer.seconds
  timed = steps[args.warmup:]
  seconds = statistics.mean(timed)
  print(f"  step seconds: {' '.join(f'{s:.2f}' for s in steps)} (first {args.warmup} dropped)")
  print(f"  completion length: mean {statistics.mean(m for m, _, _ in timer.lengths):.2f}, min "
        f"{min(m for _, m, _ in timer.lengths):.0f}, max {max(m for _, _, m in timer.lengths):.0f} "
        f"over {len(timer.lengths)} steps x {rows} rollouts; "
        f"reward model inputs: {min(reward_lengths)}..{max(reward_lengths)} tokens over "
        f"{len(reward_lengths)} rollouts")
  spread = statistics.stdev(timed) if len(timed) > 1 else 0.0
  print(f"  trl grpo iteration (num_iterations 1, 1 step): {1 / seconds:6.3f} iterations/s = "
        f"{rows / seconds:7.2f} rollouts/s, {seconds:.3f} s each (+- {spread:.3f} s over "
        f"{len(timed)} steps)")


if __name__ == "__main__":
  main()
