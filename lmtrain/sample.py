"""`lmtrain sample`: completions from a stage's latest checkpoint, with the KV-cache generator.

The model shape comes from DIR/STAGE/model.json and the tokenizer from its lineage.json; prompts to
an SFT (or later) checkpoint go through the chat template the model was tuned with.
"""

import os

from lmtrain import fileio
from lmtrain.errors import UserError
from lmtrain.stages import REGISTRY



def add_arguments(p):
  p.add_argument("--checkpoint", required=True, help="a stage directory, e.g. runs/demo/sft")
  p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
  p.add_argument("--prompts_file", help='JSONL of {"prompt": ...} records (or SFT records)')
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
  from lmtrain.data import tokenizer as tokenizer_lib
  from lmtrain.model import transformer
  model_json = os.path.join(stage_dir, "model.json")
  lineage_json = os.path.join(stage_dir, "lineage.json")
  for path in (model_json, lineage_json):
    if not fileio.exists(path):
      raise UserError(f"--checkpoint {stage_dir}: {os.path.basename(path)} is missing; is this a "
                      f"stage directory written by lmtrain?")
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


def run(args):
  temperature, greedy = check_sampling(args)
  import jax
  from lmtrain import parallel
  from lmtrain.data import sft as sft_data
  from lmtrain.model import generate as generate_lib
  from lmtrain.model import transformer
  from lmtrain.train import checkpoint as ckpt_lib
  stage_dir = fileio.absolute(args.checkpoint.rstrip("/"))
  cfg, tok, lineage = load_stage(stage_dir)
  texts = _prompts(args)
  spec = REGISTRY.get(lineage["stage"])
  chat = args.chat == "yes" or (args.chat == "auto" and (spec is None or spec.chat))
  if chat:
    template = sft_data.ChatTemplate()
    ids = [sft_data.encode_prompt([("user", t)], tok, template) for t in texts]
  else:
    ids = [[tok.bos_id] + tok.encode(t) for t in texts]
  mesh = parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  rules = parallel.axis_rules()
  shards = parallel.batch_shard_count(mesh)
  batch = -(-len(ids) // shards) * shards
  prompts, lengths = generate_lib.pad_prompts(ids + [ids[0]] * (batch - len(ids)),
                                              pad_id=tok.pad_id)
  _, abstract_params, names = transformer.abstract_model(cfg)
  shardings = parallel.tree_shardings(mesh, abstract_params, names, rules)
  abstract = parallel.with_shardings(abstract_params, shardings)
  params, step = ckpt_lib.restore_params(stage_dir, abstract)
  sampler = generate_lib.make_generate(
      mesh, rules, cfg, batch, prompts.shape[1], max_new_tokens=args.max_new_tokens,
      temperature=temperature, top_k=args.top_k, top_p=args.top_p, greedy=greedy,
      eos_id=tok.eos_id, pad_id=tok.pad_id)
  out = jax.device_get(sampler(params, prompts, lengths, jax.random.PRNGKey(args.seed)))
  print(f"# {lineage['stage']} checkpoint step {step} ({stage_dir})")
  for i, text in enumerate(texts):
    completion = [int(t) for t, m in zip(out.tokens[i], out.mask[i]) if m and t != tok.eos_id]
    print(f"\n>>> {text}\n{tok.decode(completion)}")
