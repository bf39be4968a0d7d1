"""`lmtrain sample`: completions from a stage's latest checkpoint, with the KV-cache generator.

The model shape comes from DIR/STAGE/model.json and the tokenizer from its lineage.json; prompts to
an SFT (or later) checkpoint go through the chat template the model was tuned with. `StageSampler`
(a stage's params on a mesh, and samplers over them) also serves `lmtrain candidates`.
"""

import os
from typing import NamedTuple

from lmtrain import fileio
from lmtrain.errors import UserError
from lmtrain.stages import REGISTRY


def add_arguments(p):
  p.add_argument("--checkpoint", required=True, help="a stage directory, e.g. runs/demo/sft")
  p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
  p.add_argument("--prompts_file", help='JSONL of {"prompt": ...} records (or SFT records)')
  add_sampling_arguments(p)


def add_sampling_arguments(p):
  """The flags that choose how tokens are drawn, and the chat template switch (check_sampling)."""
  p.add_argument("--max_new_tokens", type=int, default=64, help="at least 1")
  p.add_argument("--temperature", type=float, default=1.0,
                 help="> 0 samples from softmax(logits / T); 0 is greedy (as --greedy)")
  p.add_argument("--top_k", type=int, default=0, help="sample among the k likeliest (0: all)")
  p.add_argument("--top_p", type=float, default=1.0, help="nucleus mass in (0, 1] (1: all)")
  p.add_argument("--greedy", action="store_true")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--chat", choices=("auto", "yes", "no"), default="auto",
                 help="apply the chat template (auto: for every stage after pretrain)")


def load_stage(stage_dir: str):
  """(ModelConfig, Tokenizer, lineage) of a trained stage directory."""
  model_json = os.path.join(stage_dir, "model.json")
  lineage_json = os.path.join(stage_dir, "lineage.json")
  for path in (model_json, lineage_json):
    if not fileio.exists(path):
      raise UserError(f"--checkpoint {stage_dir}: {os.path.basename(path)} is missing; is this a "
                      f"stage directory written by lmtrain?")
  # Imported after the checks, so a wrong directory is reported before jax loads.
  from lmtrain.data import tokenizer as tokenizer_lib
  from lmtrain.model import transformer
  cfg = transformer.ModelConfig(**fileio.read_json(model_json))
  lineage = fileio.read_json(lineage_json)
  tok_path = lineage.get("tokenizer") or os.path.join(os.path.dirname(stage_dir), "tokenizer.model")
  return cfg, tokenizer_lib.Tokenizer.load(tok_path), lineage


def _prompts(args):
  texts = list(args.prompt)
  if args.prompts_file:
    from lmtrain.data import formats
    texts.extend(formats.iter_records(args.prompts_file,
                                      lambda r: formats.require_str(r, "prompt")))
  if not texts:
    raise UserError("give at least one --prompt or a --prompts_file")
  return texts


def check_sampling(args):
  """Refuses sampling flags out of range (one line naming the flag); returns (temperature, greedy):
  temperature 0 means greedy, as in the OpenAI API and vLLM."""
  if args.max_new_tokens < 1:
    raise UserError(f"--max_new_tokens {args.max_new_tokens}: must be at least 1")
  if not args.temperature >= 0:  # also NaN
    raise UserError(f"--temperature {args.temperature}: must be 0 (greedy) or above")
  if args.top_k < 0:
    raise UserError(f"--top_k {args.top_k}: must be 0 (all tokens) or above")
  if not 0 < args.top_p <= 1:
    raise UserError(f"--top_p {args.top_p}: must be in (0, 1]")
  if args.temperature == 0:
    return 1.0, True
  return args.temperature, args.greedy


class Completion(NamedTuple):
  text: str  # the generated tokens decoded, up to (not including) the first EOS
  tokens: int  # tokens generated, the EOS included


class StageSampler:
  """A trained stage to sample from: its params restored onto a mesh of every device (FSDP over
  all of them), its tokenizer and lineage, and whether prompts take the chat template.

  Args:
    checkpoint: the stage directory (DIR/STAGE).
    chat: "yes", "no", or "auto": the template for every stage whose registry entry says it was
      tuned with one (any stage after pretrain).
    step: the checkpoint step to restore (default: the latest).
  """

  def __init__(self, checkpoint: str, chat: str = "auto", step: int | None = None):
    from lmtrain import parallel
    from lmtrain.model import transformer
    from lmtrain.train import checkpoint as ckpt_lib
    self.stage_dir = fileio.absolute(checkpoint.rstrip("/"))
    self.cfg, self.tokenizer, self.lineage = load_stage(self.stage_dir)
    spec = REGISTRY.get(self.lineage["stage"])
    self.chat = chat == "yes" or (chat == "auto" and (spec is None or spec.chat))
    self.mesh = parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    self.rules = parallel.axis_rules()
    _, abstract_params, names = transformer.abstract_model(self.cfg)
    shardings = parallel.tree_shardings(self.mesh, abstract_params, names, self.rules)
    self.params, self.step = ckpt_lib.restore_params(
        self.stage_dir, parallel.with_shardings(abstract_params, shardings), step)

  def encode(self, turns) -> list[int]:
    """The ids to continue after `turns` ((role, content) pairs): through the chat template up to
    the assistant prefix, or BOS and the contents as plain text."""
    from lmtrain.data import sft as sft_data
    if self.chat:
      return list(sft_data.encode_prompt(turns, self.tokenizer, sft_data.ChatTemplate()))
    text = "\n\n".join(content for _, content in turns)
    return [self.tokenizer.bos_id] + self.tokenizer.encode(text)

  def batch_size(self, rows: int) -> int:
    """`rows` rounded up to fill every batch shard of the mesh."""
    from lmtrain import parallel
    shards = parallel.batch_shard_count(self.mesh)
    return -(-rows // shards) * shards

  def sampler(self, batch_size: int, prompt_len: int, **sampling):
    """A function (prompts, rng) -> [Completion per prompt], compiled once for up to `batch_size`
    prompts (lists of ids) of at most `prompt_len` ids each; rows left over repeat the first
    prompt. `sampling` are make_generate's keyword arguments (max_new_tokens, temperature, ...).
    Every process must make the same calls; each gets every completion back."""
    import jax
    from lmtrain import parallel
    from lmtrain.model import generate as generate_lib
    tok = self.tokenizer
    generate = generate_lib.make_generate(self.mesh, self.rules, self.cfg, batch_size, prompt_len,
                                          eos_id=tok.eos_id, pad_id=tok.pad_id, **sampling)

    def run(prompts, rng):
      filled = list(prompts) + [prompts[0]] * (batch_size - len(prompts))
      ids, lengths = generate_lib.pad_prompts(filled, prompt_len, pad_id=tok.pad_id)
      out = jax.tree.map(parallel.to_host, generate(self.params, ids, lengths, rng))
      return [Completion(tok.decode([int(t) for t, m in zip(out.tokens[i], out.mask[i])
                                    if m and t != tok.eos_id]), int(out.lengths[i]))
              for i in range(len(prompts))]

    return run


def run(args):
  temperature, greedy = check_sampling(args)
  import jax
  texts = _prompts(args)
  model = StageSampler(args.checkpoint, args.chat)
  ids = [model.encode([("user", text)]) for text in texts]
  batch_size = model.batch_size(len(ids))
  sampler = model.sampler(batch_size, max(map(len, ids)), max_new_tokens=args.max_new_tokens,
                          temperature=temperature, top_k=args.top_k, top_p=args.top_p,
                          greedy=greedy)
  completions = sampler(ids, jax.random.PRNGKey(args.seed))
  print(f"# {model.lineage['stage']} checkpoint step {model.step} ({model.stage_dir})")
  for text, completion in zip(texts, completions):
    print(f"\n>>> {text}\n{completion.text}")
