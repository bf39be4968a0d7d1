"""`lmtrain convert`: LLaMA-family checkpoints between Hugging Face `transformers` and lmtrain.

    lmtrain convert from-hf --input HF_DIR --output CKPT_DIR
    lmtrain convert to-hf --checkpoint DIR/STAGE --output HF_DIR

from-hf reads `config.json` (LlamaForCausalLM, MistralForCausalLM without biases, or a one-label
LlamaForSequenceClassification, which becomes a scalar-head reward model) and safetensors weights
(`model.safetensors`, or shards listed in `model.safetensors.index.json`) with the numpy API, one
tensor at a time; it never unpickles, so a `.bin`/`.pt` model is refused. It writes a stage-like
directory that `INIT_FROM` (and `lmtrain sample`, and to-hf) accepts:

    CKPT_DIR/checkpoints/0/state   orbax; {"params": ...} at float32, lmtrain's parameter dtype
    CKPT_DIR/model.json            the ModelConfig, as a training run writes it
    CKPT_DIR/model.gin             `model_config.overrides` giving any MODEL preset this shape
    CKPT_DIR/lineage.json          stage "from_hf", with the source directory and files
    CKPT_DIR/tokenizer.model       copied when the source has one

Peak memory is the float32 output plus one source tensor (and the page cache of the memory-mapped
source): each parameter kind is stacked over layers into its [layers, ...] array as it is read.

to-hf takes the model shape from DIR/STAGE/model.json (written by every run, read by `lmtrain sample`)
and the tokenizer from lineage.json (or DIR/tokenizer.model); it writes `config.json`, safetensors
shards (float32 by default, exact; or --dtype bfloat16/float16) with their index when there are
several, `tokenizer.model`, `tokenizer.json` and a `tokenizer_config.json` that `AutoTokenizer`
loads with the tokenizer's own special ids (lmtrain's: pad 0, eos 1, bos 2, unk 3; LLaMA's: unk 0,
bos 1, eos 2, and unk again as pad). tokenizer.json, the `tokenizers` library's fast tokenizer
built from the sentencepiece model's pieces and scores (unigram, or BPE with merges ranked by
score), encodes and decodes as sentencepiece does, so transformers needs neither sentencepiece nor
protobuf to load it; a model it cannot express (a word or char model, say) gets a note instead.
It holds the float32 params in host memory plus one shard.

A scalar-head (reward or value) checkpoint exports as LlamaForSequenceClassification with one label:
its `score` Linear is lmtrain's head weight, and config.json's pad_token_id makes HF read the score
at the last non-pad token, where lmtrain's reward stage reads it. HF's score layer has no bias, so
lmtrain's scalar bias goes into config.json as "lmtrain_score_bias" (the pairwise reward loss leaves
it at its initial 0; a note says when it is not), and reward_normalization.json is copied alongside.
from-hf reads that key back (0 without it), so the round trip is exact.

RoPE scaling maps between HF's `rope_scaling` (or transformers 5's `rope_parameters`) {"rope_type":
"linear", "factor"} or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
"original_max_position_embeddings"} and ModelConfig's rope_scaling* fields; other types are refused.

Weight mapping (HF Linear weights are [out, in]; L layers, N heads, K kv heads, H head size):

    model.embed_tokens.weight [V, D]                      embed [V, D]
    model.layers.i.self_attn.q_proj.weight [N*H, D]        layers.attn.q[i] [D, N, H]  (transpose)
    model.layers.i.self_attn.k_proj.weight [K*H, D]        layers.attn.k[i] [D, K, H]  (transpose)
    model.layers.i.self_attn.v_proj.weight [K*H, D]        layers.attn.v[i] [D, K, H]  (transpose)
    model.layers.i.self_attn.o_proj.weight [D, N*H]        layers.attn.o[i] [N, H, D]  (transpose)
    model.layers.i.mlp.gate_proj.weight [M, D]             layers.mlp.gate[i] [D, M]   (transpose)
    model.layers.i.mlp.up_proj.weight [M, D]               layers.mlp.up[i] [D, M]     (transpose)
    model.layers.i.mlp.down_proj.weight [D, M]             layers.mlp.down[i] [M, D]   (transpose)
    model.layers.i.input_layernorm.weight [D]              layers.attn_norm.scale[i] [D]
    model.layers.i.post_attention_layernorm.weight [D]     layers.mlp_norm.scale[i] [D]
    model.norm.weight [D]                                  final_norm.scale [D]
    lm_head.weight [V, D] (untied only)                    lm_head [D, V]              (transpose)
    score.weight [1, D] (sequence classifier)              score [D]; score_bias []: config.json

RoPE needs no permutation of q/k: lmtrain rotates the pairs (i, i + H/2) with frequencies
theta^(-i/(H/2)), exactly HF's rotate_half, the layout HF's LLaMA checkpoints are stored in.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys

import numpy as np

from lmtrain.errors import UserError
from lmtrain.train import roles

SEQUENCE_CLASSIFIER = "LlamaForSequenceClassification"
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", SEQUENCE_CLASSIFIER)
# In the config.json of an exported reward model: the scalar head's bias, which HF's score lacks.
SCORE_BIAS_KEY = "lmtrain_score_bias"
ROPE_SCALINGS = ("linear", "llama3")  # HF rope types lmtrain runs, besides the default
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tensors some exports carry that hold no weights: recomputed from the config.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One HF tensor kind and where it lives in lmtrain's params."""
  hf: str  # name; "{i}" stands for the layer index
  path: tuple[str, ...]  # keys in lmtrain's pure-dict params
  transpose: bool  # HF [out, in] vs lmtrain [in, ...]

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf


_LAYER = "model.layers.{i}."
TENSORS = (
    _Tensor("model.embed_tokens.weight", ("embed",), False),
    _Tensor(_LAYER + "self_attn.q_proj.weight", ("layers", "attn", "q"), True),
    _Tensor(_LAYER + "self_attn.k_proj.weight", ("layers", "attn", "k"), True),
    _Tensor(_LAYER + "self_attn.v_proj.weight", ("layers", "attn", "v"), True),
    _Tensor(_LAYER + "self_attn.o_proj.weight", ("layers", "attn", "o"), True),
    _Tensor(_LAYER + "mlp.gate_proj.weight", ("layers", "mlp", "gate"), True),
    _Tensor(_LAYER + "mlp.up_proj.weight", ("layers", "mlp", "up"), True),
    _Tensor(_LAYER + "mlp.down_proj.weight", ("layers", "mlp", "down"), True),
    _Tensor(_LAYER + "input_layernorm.weight", ("layers", "attn_norm", "scale"), False),
    _Tensor(_LAYER + "post_attention_layernorm.weight", ("layers", "mlp_norm", "scale"), False),
    _Tensor("model.norm.weight", ("final_norm", "scale"), False),
    _Tensor("lm_head.weight", ("lm_head",), True),
    _Tensor("score.weight", ("score",), False),
)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _tensors(cfg) -> list[tuple[_Tensor, tuple[int, ...], tuple[int, ...]]]:
  """(tensor kind, HF shape, lmtrain shape of one layer's slice) for the kinds `cfg` has."""
  from lmtrain.model import transformer
  _, abstract, _ = transformer.abstract_model(cfg)
  out = []
  for t in TENSORS:
    if t.path[0] not in abstract:  # lm_head when tied or under a scalar head; score on an LM
      continue
    shape = tuple(_get(abstract, t.path).shape)
    lm_shape = shape[1:] if t.per_layer else shape
    if t.path == ("score",):
      hf_shape = (1, *lm_shape)  # a Linear to one label
    elif t.transpose:
      # The input axis is lmtrain's first for q/k/v/gate/up/down/lm_head (the rest flatten into HF's
      # out axis) and its last for o ([N, H, D] flattens its leading axes into HF's in axis).
      split = len(lm_shape) - 1 if t.path[-1] == "o" else 1
      hf_shape = (math.prod(lm_shape[split:]), math.prod(lm_shape[:split]))
    else:
      hf_shape = lm_shape
    out.append((t, hf_shape, lm_shape))
  return out


def _to_lmtrain(w: np.ndarray, t: _Tensor, lm_shape) -> np.ndarray:
  return (w.T if t.transpose else w).reshape(lm_shape)


def _to_hf(w: np.ndarray, t: _Tensor, hf_shape) -> np.ndarray:
  if t.transpose:
    return np.ascontiguousarray(w.reshape(hf_shape[::-1]).T)
  return w.reshape(hf_shape)


# ----------------------------------------------------------------------------------------- from-hf


def model_config_from_hf(hf: dict, where: str):
  """The ModelConfig of an HF LLaMA-family config.json, refusing what lmtrain's model cannot run."""
  from lmtrain.model import transformer
  arch = (hf.get("architectures") or [None])[0]
  if arch not in ARCHITECTURES:
    raise UserError(f"{where}: architecture {arch!r} is not supported; lmtrain converts "
                    f"{' and '.join(ARCHITECTURES)}")

  def need(key):
    if hf.get(key) is None:
      raise UserError(f"{where}: '{key}' is missing")
    return hf[key]

  if hf.get("hidden_act", "silu") != "silu":
    raise UserError(f"{where}: hidden_act={hf['hidden_act']!r}; lmtrain's MLP is SwiGLU (silu)")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      raise UserError(f"{where}: {key}=true; lmtrain's layers have no biases")
  head = "lm"
  if arch == SEQUENCE_CLASSIFIER:
    labels = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)
    if labels != 1:
      raise UserError(f"{where}: {arch} with {labels} labels; lmtrain's scalar head (a reward "
                      f"model) converts num_labels=1 only")
    head = "scalar"
  # transformers 5 folds rope_theta and rope_scaling into rope_parameters; older files have both.
  rope = hf.get("rope_parameters") or {}
  rope_fields = _rope_scaling_from_hf(hf.get("rope_scaling") or rope, hf, where)
  if hf.get("sliding_window"):
    print(f"note: {where}: sliding_window={hf['sliding_window']} is ignored; lmtrain attends over "
          f"the whole context (the same for sequences up to that length)", file=sys.stderr)
  d, heads = need("hidden_size"), need("num_attention_heads")
  head_dim = hf.get("head_dim") or d // heads
  try:
    return transformer.ModelConfig(
        vocab_size=need("vocab_size"), d_model=d, num_layers=need("num_hidden_layers"),
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=None if head_dim * heads == d else head_dim, mlp_dim=need("intermediate_size"),
        rope_theta=float(rope.get("rope_theta") or hf.get("rope_theta") or 10000.0),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), head=head,
        **rope_fields).validate()
  except UserError as e:
    raise UserError(f"{where}: {e}") from None


def _rope_scaling_from_hf(scaling: dict, hf: dict, where: str) -> dict:
  """ModelConfig's rope_scaling* fields for HF's rope scaling dict ({} when unscaled)."""
  rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
  if rope_type not in ("default", *ROPE_SCALINGS):
    raise UserError(f"{where}: rope scaling {rope_type!r} is not supported; lmtrain runs default, "
                    f"{' and '.join(ROPE_SCALINGS)}")
  partial = scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor")) or 1.0
  if partial != 1.0:
    raise UserError(f"{where}: partial_rotary_factor={partial}; lmtrain rotates the whole head")
  if rope_type == "default":
    return {}

  def number(key, fallback=None):
    value = scaling.get(key, fallback)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise UserError(f"{where}: {rope_type} rope scaling needs a number '{key}', got {value!r}")
    return value

  fields = {"rope_scaling": rope_type, "rope_scaling_factor": float(number("factor"))}
  if rope_type == "llama3":
    # transformers falls back to max_position_embeddings for the original context length.
    fields.update(
        rope_low_freq_factor=float(number("low_freq_factor")),
        rope_high_freq_factor=float(number("high_freq_factor")),
        rope_original_max_len=int(number("original_max_position_embeddings",
                                         hf.get("max_position_embeddings"))))
  return fields


def _rope_scaling_to_hf(cfg) -> dict | None:
  """HF's rope_scaling dict for a ModelConfig (None when unscaled)."""
  if cfg.rope_scaling == "none":
    return None
  out = {"rope_type": cfg.rope_scaling, "factor": cfg.rope_scaling_factor}
  if cfg.rope_scaling == "llama3":
    out.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
               original_max_position_embeddings=cfg.rope_original_max_len)
  return out


def _weight_files(input_dir: str) -> dict[str, str]:
  """Tensor name -> safetensors file path, checking every file the index names exists."""
  index = os.path.join(input_dir, INDEX_FILE)
  if os.path.exists(index):
    with open(index) as f:
      try:
        weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise UserError(f"{index}: not a safetensors index ({e})") from None
    for name in sorted(set(weight_map.values())):
      if not os.path.exists(os.path.join(input_dir, name)):
        raise UserError(f"{index} names {name}, which is missing from {input_dir}")
    return {tensor: os.path.join(input_dir, name) for tensor, name in weight_map.items()}
  single = os.path.join(input_dir, SINGLE_FILE)
  if os.path.exists(single):
    with _open_safetensors(single) as f:
      return {name: single for name in f.keys()}
  pickled = sorted(n for n in os.listdir(input_dir) if n.endswith((".bin", ".pt", ".pth")))
  if pickled:
    raise UserError(f"{input_dir}: only PyTorch pickle weights ({pickled[0]}); lmtrain reads "
                    f"safetensors only: re-save with save_pretrained(safe_serialization=True)")
  raise UserError(f"{input_dir}: no {SINGLE_FILE} or {INDEX_FILE} there")


def _open_safetensors(path: str):
  from safetensors import SafetensorError, safe_open
  try:
    return safe_open(path, framework="np")
  except SafetensorError as e:
    raise UserError(f"{path}: not a readable safetensors file ({e})") from None


def from_hf(input_dir: str, output_dir: str):
  """Converts an HF model directory into an lmtrain checkpoint directory; returns its ModelConfig."""
  import jax
  from lmtrain.train import checkpoint as ckpt_lib
  input_dir, output_dir = os.path.abspath(input_dir), os.path.abspath(output_dir)
  config_path = os.path.join(input_dir, "config.json")
  if not os.path.exists(config_path):
    raise UserError(f"--input {input_dir}: no config.json there")
  with open(config_path) as f:
    try:
      hf = json.load(f)
    except json.JSONDecodeError as e:
      raise UserError(f"{config_path}: not JSON ({e})") from None
  cfg = model_config_from_hf(hf, config_path)
  arch = hf["architectures"][0]
  files = _weight_files(input_dir)
  if os.path.exists(os.path.join(output_dir, "checkpoints")):
    raise UserError(f"--output {output_dir}: already holds checkpoints/; choose a new directory")

  biases = sorted(n for n in files if n.endswith(".bias"))
  if biases:
    raise UserError(f"{files[biases[0]]}: tensor {biases[0]}: lmtrain's layers have no biases")
  plan = _tensors(cfg)
  expected = {t.hf.format(i=i) for t, _, _ in plan
              for i in (range(cfg.num_layers) if t.per_layer else [None])}
  missing = sorted(expected - set(files))
  if missing:
    raise UserError(f"{input_dir}: tensor {missing[0]} is missing"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  # Some exports save the tied LM head too: it is the embedding, so it is not read.
  unknown = sorted(n for n in set(files) - expected - {"lm_head.weight"}
                   if not n.endswith(IGNORED_SUFFIXES))
  if unknown:
    raise UserError(f"{files[unknown[0]]}: unexpected tensor {unknown[0]} for {arch}")

  # Host-memory jax arrays: orbax saves them without the extra copy it makes of numpy arrays, and on
  # an accelerator host they stay off the accelerator.
  host = jax.local_devices(backend="cpu")[0]
  params = {}
  with contextlib.ExitStack() as stack:
    handles = {}

    def read(name, hf_shape):
      path = files[name]
      if path not in handles:
        handles[path] = stack.enter_context(_open_safetensors(path))
      # Shape first, from the header: a mismatch is reported before reading the data.
      shape = tuple(handles[path].get_slice(name).get_shape())
      if shape != tuple(hf_shape):
        raise UserError(f"{path}: tensor {name} has shape {list(shape)}, config.json implies "
                        f"{list(hf_shape)}")
      return handles[path].get_tensor(name)

    for t, hf_shape, lm_shape in plan:
      if t.per_layer:
        stacked = np.empty((cfg.num_layers, *lm_shape), np.float32)
        for i in range(cfg.num_layers):
          stacked[i] = _to_lmtrain(read(t.hf.format(i=i), hf_shape), t, lm_shape)
      else:
        stacked = _to_lmtrain(read(t.hf, hf_shape), t, lm_shape).astype(np.float32)
      _set(params, t.path, jax.device_put(stacked, host))
      del stacked
  if cfg.head == "scalar":
    bias = hf.get(SCORE_BIAS_KEY, 0.0)
    if isinstance(bias, bool) or not isinstance(bias, (int, float)):
      raise UserError(f"{config_path}: {SCORE_BIAS_KEY} must be a number, got {bias!r}")
    params["score_bias"] = jax.device_put(np.asarray(bias, np.float32), host)

  os.makedirs(output_dir, exist_ok=True)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(output_dir, "checkpoints"), async_save=False)
  checkpointer.save(0, {"step": np.zeros((), np.int32), "params": params})
  checkpointer.close()

  tokenizer = None
  source_tokenizer = os.path.join(input_dir, "tokenizer.model")
  if os.path.exists(source_tokenizer):
    tokenizer = os.path.join(output_dir, "tokenizer.model")
    shutil.copyfile(source_tokenizer, tokenizer)
    _note_special_ids(tokenizer)
  if cfg.head == "scalar" and os.path.exists(os.path.join(input_dir, roles.NORMALIZATION_FILE)):
    shutil.copyfile(os.path.join(input_dir, roles.NORMALIZATION_FILE),
                    os.path.join(output_dir, roles.NORMALIZATION_FILE))
  gin_text = _model_gin(cfg, input_dir, output_dir)
  with open(os.path.join(output_dir, "model.gin"), "w") as f:
    f.write(gin_text)
  with open(os.path.join(output_dir, "model.json"), "w") as f:
    json.dump(dataclasses.asdict(cfg), f, indent=2)
  lineage = ckpt_lib.write_lineage(output_dir, "from_hf", gin_text, tokenizer=tokenizer)
  lineage["source"] = {"path": input_dir, "architecture": arch,
                       "files": sorted({os.path.basename(p) for p in files.values()})}
  with open(os.path.join(output_dir, "lineage.json"), "w") as f:
    json.dump(lineage, f, indent=2)
  return cfg


def _note_special_ids(path: str):
  """Says what lmtrain makes of an imported tokenizer's special ids (LLaMA's have no pad piece)."""
  from lmtrain.data import tokenizer as tokenizer_lib
  try:
    tok = tokenizer_lib.Tokenizer.load(path)
  except UserError as e:
    print(f"note: {e}; lmtrain's stages will refuse this tokenizer", file=sys.stderr)
    return
  if tok.pad_id == tok.unk_id:
    print(f"note: {path} has no pad piece; lmtrain pads with its unk id {tok.unk_id} (padding is "
          f"always masked); eos {tok.eos_id}, bos {tok.bos_id}", file=sys.stderr)


def _model_gin(cfg, input_dir: str, output_dir: str) -> str:
  fields = ["vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "mlp_dim", "rope_theta", "norm_eps", "tie_embeddings", "rope_scaling"]
  if cfg.rope_scaling != "none":
    fields.append("rope_scaling_factor")
  if cfg.rope_scaling == "llama3":
    fields.extend(["rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len"])
  overrides = {k: getattr(cfg, k) for k in fields if getattr(cfg, k) is not None}
  body = ",\n".join(f"    {k!r}: {v!r}" for k, v in overrides.items())
  return (f"# Converted from {input_dir}.\n"
          f"# Start a stage from it: --gin_file {output_dir}/model.gin --gin.INIT_FROM={output_dir}\n"
          f"# (these overrides give any MODEL preset this shape; the preset still sets remat/dtype).\n"
          f"model_config.overrides = {{\n{body},\n}}\n")


# ------------------------------------------------------------------------------------------- to-hf


def _load_stage(stage_dir: str):
  """(ModelConfig, tokenizer path or None) of a stage directory."""
  from lmtrain.model import transformer
  model_json = os.path.join(stage_dir, "model.json")
  if not os.path.exists(model_json):
    raise UserError(f"--checkpoint {stage_dir}: model.json is missing; is this a stage directory "
                    f"written by lmtrain?")
  with open(model_json) as f:
    cfg = transformer.ModelConfig(**json.load(f))
  tokenizer = None
  lineage_json = os.path.join(stage_dir, "lineage.json")
  if os.path.exists(lineage_json):
    with open(lineage_json) as f:
      tokenizer = json.load(f).get("tokenizer")
  tokenizer = tokenizer or os.path.join(os.path.dirname(stage_dir), "tokenizer.model")
  return cfg, tokenizer if os.path.exists(tokenizer) else None


def _hf_config(cfg, special: dict, dtype: str, max_positions: int, score_bias: float) -> dict:
  classifier = {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
                SCORE_BIAS_KEY: score_bias} if cfg.head == "scalar" else {}
  return {
      "architectures": [SEQUENCE_CLASSIFIER if cfg.head == "scalar" else "LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.kv_heads,
      "head_dim": cfg.head_size,
      "hidden_act": "silu",
      "max_position_embeddings": max_positions,
      "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": _rope_scaling_to_hf(cfg),
      "tie_word_embeddings": cfg.tie_embeddings,
      "attention_bias": False,
      "mlp_bias": False,
      **{f"{role}_token_id": special[role][0] if role in special else None
         for role in ("bos", "eos", "pad")},
      "torch_dtype": dtype,
      **classifier,
  }


PEFT_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                "down": "mlp.down_proj"}


def _write_peft_adapter(cfg, adapters, adapter_dir: str, base_dir: str, np_dtype) -> list[str]:
  """A PEFT LoRA adapter directory: adapter_config.json and adapter_model.safetensors, whose
  lora_A [r, in] and lora_B [out, r] per layer and module are lmtrain's A [*in, r] and B [r, *out]
  flattened as to-hf flattens their weight. PEFT's scale is lora_alpha / r, as lmtrain's."""
  from safetensors.numpy import save_file
  if os.path.exists(os.path.join(adapter_dir, "adapter_config.json")):
    raise UserError(f"--adapter {adapter_dir}: already holds adapter_config.json; choose a new "
                    f"directory")
  tensors = {}
  for target, adapter in adapters.items():
    a, b = np.asarray(adapter["a"], np.float32), np.asarray(adapter["b"], np.float32)
    for i in range(cfg.num_layers):
      name = f"base_model.model.model.layers.{i}.{PEFT_MODULES[target]}"
      tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(
          a[i].reshape(-1, cfg.lora_rank).T).astype(np_dtype)
      tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(
          b[i].reshape(cfg.lora_rank, -1).T).astype(np_dtype)
  os.makedirs(adapter_dir, exist_ok=True)
  save_file(tensors, os.path.join(adapter_dir, "adapter_model.safetensors"),
            metadata={"format": "pt"})
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM" if cfg.head == "lm" else "SEQ_CLS",
            "base_model_name_or_path": base_dir, "r": cfg.lora_rank,
            "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout, "bias": "none",
            "target_modules": sorted(PEFT_MODULES[t].split(".")[1] for t in adapters),
            "fan_in_fan_out": False, "use_rslora": False, "inference_mode": True}
  with open(os.path.join(adapter_dir, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return ["adapter_config.json", "adapter_model.safetensors"]


def to_hf(stage_dir: str, output_dir: str, step: int | None = None, dtype: str = "float32",
          max_shard_bytes: int = 5 * 2**30, max_positions: int = 4096,
          adapter_dir: str | None = None) -> list[str]:
  """Writes the checkpoint in `stage_dir` as an HF directory, LlamaForCausalLM or (scalar head)
  LlamaForSequenceClassification; returns the names of the files written. A LoRA checkpoint is
  written with its adapters merged into the weights, or with `adapter_dir` as its base there and
  its adapters as a PEFT adapter directory in `adapter_dir`."""
  import jax
  from safetensors.numpy import save_file

  from lmtrain.model import lora, transformer
  from lmtrain.train import checkpoint as ckpt_lib
  stage_dir, output_dir = os.path.abspath(stage_dir.rstrip("/")), os.path.abspath(output_dir)
  cfg, tokenizer = _load_stage(stage_dir)
  if os.path.exists(os.path.join(output_dir, "config.json")):
    raise UserError(f"--output {output_dir}: already holds config.json; choose a new directory")
  np_dtype = {"float32": np.float32, "float16": np.float16}.get(dtype)
  if np_dtype is None:
    import ml_dtypes
    np_dtype = ml_dtypes.bfloat16

  _, abstract, _ = transformer.abstract_model(cfg)
  host = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=host), abstract)
  params, _ = ckpt_lib.restore_params(stage_dir, abstract, step)
  if adapter_dir and not lora.has_adapters(params):
    raise UserError(f"--adapter: {stage_dir} has no LoRA adapters (it was trained with "
                    f"LORA_RANK=0)")
  if adapter_dir:  # the base here, the adapters for PEFT there
    _write_peft_adapter(cfg, params[lora.KEY], os.path.abspath(adapter_dir), output_dir,
                        np_dtype)
    params, cfg = lora.without_adapters(params), lora.base_config(cfg)
  elif lora.has_adapters(params):  # the adapters folded into the weights they adapt
    params, cfg = jax.jit(lambda p: lora.merged(p, cfg.lora_scale))(params), lora.base_config(cfg)

  # Shard plan first (sizes come from the shapes), so file names can say "-of-N".
  items = []
  for t, hf_shape, _ in _tensors(cfg):
    for i in range(cfg.num_layers) if t.per_layer else [None]:
      items.append((t, i, hf_shape))
  items.sort(key=lambda item: (item[1] is not None, item[1] or 0))  # embeddings, then layer by layer
  itemsize = np.dtype(np_dtype).itemsize
  shards, size = [[]], 0
  for item in items:
    nbytes = math.prod(item[2]) * itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(item)
    size += nbytes

  os.makedirs(output_dir, exist_ok=True)
  names = ([SINGLE_FILE] if len(shards) == 1 else
           [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
  weight_map, total = {}, 0
  for name, shard in zip(names, shards):
    tensors = {}
    for t, i, hf_shape in shard:
      stacked = _get(params, t.path)
      w = np.asarray(stacked[i] if t.per_layer else stacked)
      hf_name = t.hf.format(i=i)
      tensors[hf_name] = _to_hf(w, t, hf_shape).astype(np_dtype)
      weight_map[hf_name] = name
      total += tensors[hf_name].nbytes
    save_file(tensors, os.path.join(output_dir, name), metadata={"format": "pt"})
  written = list(names)
  if len(shards) > 1:
    with open(os.path.join(output_dir, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    written.append(INDEX_FILE)

  score_bias = 0.0
  if cfg.head == "scalar":
    score_bias = float(np.asarray(params["score_bias"]))
    if score_bias:
      print(f"note: HF's score layer has no bias: add config.json's {SCORE_BIAS_KEY} "
            f"({score_bias:g}) to its logits to get lmtrain's rewards", file=sys.stderr)
    normalization = os.path.join(stage_dir, roles.NORMALIZATION_FILE)
    if os.path.exists(normalization):
      shutil.copyfile(normalization, os.path.join(output_dir, roles.NORMALIZATION_FILE))
      written.append(roles.NORMALIZATION_FILE)
  special = _special_tokens(tokenizer)
  with open(os.path.join(output_dir, "config.json"), "w") as f:
    json.dump(_hf_config(cfg, special, dtype, max_positions, score_bias), f, indent=2)
  written.append("config.json")
  if tokenizer:
    written.extend(_write_tokenizer(tokenizer, special, output_dir))
  else:
    print(f"note: no tokenizer found for {stage_dir}; wrote the model only", file=sys.stderr)
  return written


def _special_tokens(path: str | None) -> dict[str, tuple[int, str]]:
  """{"bos"|"eos"|"pad"|"unk": (id, piece)} as lmtrain's Tokenizer reads them from a sentencepiece
  model (pad: unk when it has no pad piece); lmtrain's own ids without one."""
  from lmtrain.data import tokenizer as tokenizer_lib
  if path is None:
    return {"bos": (tokenizer_lib.BOS_ID, "<s>"), "eos": (tokenizer_lib.EOS_ID, "</s>"),
            "pad": (tokenizer_lib.PAD_ID, "<pad>"), "unk": (tokenizer_lib.UNK_ID, "<unk>")}
  tok = tokenizer_lib.Tokenizer.load(path)
  ids = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id, "unk": tok.unk_id}
  return {role: (i, tok.id_to_piece(i)) for role, i in ids.items()}


def _write_tokenizer(path: str, special: dict, output_dir: str) -> list[str]:
  """tokenizer.model, tokenizer.json (the `tokenizers` library's fast tokenizer, so `AutoTokenizer`
  needs neither sentencepiece nor protobuf) and a tokenizer_config.json naming the special tokens.
  A model that tokenizer.json cannot reproduce gets a note and no tokenizer.json instead."""
  shutil.copyfile(path, os.path.join(output_dir, "tokenizer.model"))
  written = ["tokenizer.model"]
  fast = _tokenizer_json(path, special)
  if isinstance(fast, str):
    print(f"note: no tokenizer.json written: {fast}; transformers converts tokenizer.model "
          f"instead (that needs sentencepiece and protobuf installed)", file=sys.stderr)
  else:
    with open(os.path.join(output_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
      json.dump(fast, f, ensure_ascii=False, indent=2)
    written.append("tokenizer.json")
  config = {"tokenizer_class": "PreTrainedTokenizerFast",
            **{f"{role}_token": piece for role, (_, piece) in special.items()},
            "add_bos_token": True,  # lmtrain's prompts start with BOS
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False}
  with open(os.path.join(output_dir, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return [*written, "tokenizer_config.json"]


# sentencepiece_model.proto, read by `_proto_fields` (sentencepiece's own _pb2 module would need a
# protobuf version lmtrain does not pin): ModelProto has pieces 1 (piece 1, score 2, type 3),
# trainer_spec 2, normalizer_spec 3, denormalizer_spec 5. Piece types (BYTE is 6), model types:
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED = 1, 2, 3, 4, 5
_UNIGRAM, _BPE = 1, 2
_SPACE = "\u2581"  # "▁", sentencepiece's escaped space


def _proto_fields(data: bytes) -> list[tuple[int, int | bytes]]:
  """[(field number, value)] of one serialized protobuf message: varints as ints, the rest bytes."""
  def varint(pos):
    value, shift = 0, 0
    while True:
      byte = data[pos]
      value |= (byte & 0x7F) << shift
      pos, shift = pos + 1, shift + 7
      if byte < 0x80:
        return value, pos

  fields, pos = [], 0
  while pos < len(data):
    key, pos = varint(pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = varint(pos)
    elif wire in (1, 5):  # fixed64, fixed32
      size = 8 if wire == 1 else 4
      value, pos = data[pos:pos + size], pos + size
    elif wire == 2:
      size, pos = varint(pos)
      value, pos = data[pos:pos + size], pos + size
    else:
      raise ValueError(f"unsupported protobuf wire type {wire}")
    fields.append((number, value))
  return fields


def _spm_spec(data: bytes) -> dict:
  """The settings of a serialized sentencepiece model that its tokenizer.json depends on."""
  spec = {"types": [], "model_type": _UNIGRAM, "byte_fallback": False,
          "treat_whitespace_as_suffix": False, "charsmap": b"", "add_dummy_prefix": True,
          "remove_extra_whitespaces": True, "escape_whitespaces": True, "denormalizer": b""}
  for number, value in _proto_fields(data):
    if number == 1:  # a piece; its type defaults to NORMAL
      spec["types"].append(dict(_proto_fields(value)).get(3, _NORMAL))
    elif number == 2:
      trainer = dict(_proto_fields(value))
      spec["model_type"] = trainer.get(3, _UNIGRAM)
      spec["byte_fallback"] = bool(trainer.get(35, False))
      spec["treat_whitespace_as_suffix"] = bool(trainer.get(24, False))
    elif number == 3:
      normalizer = dict(_proto_fields(value))
      spec["charsmap"] = normalizer.get(2, b"")
      spec["add_dummy_prefix"] = bool(normalizer.get(3, True))
      spec["remove_extra_whitespaces"] = bool(normalizer.get(4, True))
      spec["escape_whitespaces"] = bool(normalizer.get(5, True))
    elif number == 5:
      spec["denormalizer"] = dict(_proto_fields(value)).get(2, b"")
  return spec


def _tokenizer_json(path: str, special: dict) -> dict | str:
  """The HF `tokenizers` serialization (tokenizer.json) of the sentencepiece model at `path`,
  encoding and decoding as sentencepiece does; or a sentence saying why it is not written.

  sentencepiece normalizes the whole text (its character map, if any; with remove_extra_whitespaces
  no leading, trailing or repeated spaces), puts the dummy prefix "▁" before a non-empty text and
  escapes every space as "▁"; the normalizer here does the same, and there is no pre-tokenizer, so
  the model sees the whole string, as sentencepiece's does (Metaspace would not prefix a text that
  starts with a space). A unigram model then takes the best-scoring segmentation, the Viterbi that
  tokenizers' Unigram runs too, with the same score for an unknown character (the lowest piece
  score minus 10). A BPE model merges the adjacent pair whose concatenation is the highest-scoring
  piece, leftmost first; tokenizers' BPE merges by rank, so the merges are every split of a normal
  piece into two normal pieces, ranked by the whole piece's score. Under byte fallback a character
  without a piece becomes its UTF-8 byte pieces. Control and unknown pieces are special added
  tokens, never split; decoding turns "▁" back into spaces, joins byte pieces into characters and
  drops the space of the dummy prefix.

  Known differences: sentencepiece sums a unigram path's scores in float32, tokenizers in float64,
  so on long texts (thousands of pieces) a near-tie between two segmentations can go either way;
  "<s>" written in the text is the BOS token for transformers, three characters for sentencepiece;
  the text after a user-defined piece gets a dummy prefix of its own; sentencepiece decodes unk as
  " ⁇ ", transformers as "<unk>" (or nothing, skipping special tokens).
  """
  import base64

  import sentencepiece as spm
  with open(path, "rb") as f:
    data = f.read()
  sp = spm.SentencePieceProcessor()
  sp.LoadFromSerializedProto(data)
  try:
    spec = _spm_spec(data)
  except (ValueError, IndexError) as e:  # sentencepiece read it, so this should not happen
    return f"{path}: cannot read the model proto ({e})"
  n = sp.get_piece_size()
  types = spec["types"]
  if len(types) != n:
    return f"{path}: read {len(types)} pieces from the model proto, sentencepiece has {n}"
  if spec["model_type"] not in (_UNIGRAM, _BPE):
    return f"{path}: a {'word' if spec['model_type'] == 3 else 'char'} model (only unigram and BPE)"
  if spec["treat_whitespace_as_suffix"]:
    return f"{path}: treat_whitespace_as_suffix (tokenizers has no appended dummy suffix)"
  if spec["denormalizer"]:
    return f"{path}: a denormalization rule (tokenizers' decoders have none)"
  if spec["model_type"] == _BPE and _UNUSED in types:
    return f"{path}: a BPE model with unused pieces (sentencepiece re-splits those)"

  space = _SPACE if spec["escape_whitespaces"] else " "
  normalizers = []
  if spec["charsmap"]:
    normalizers.append({"type": "Precompiled",
                        "precompiled_charsmap": base64.b64encode(spec["charsmap"]).decode()})
  if spec["remove_extra_whitespaces"]:
    normalizers += [{"type": "Replace", "pattern": {"Regex": "^ +| +$"}, "content": ""},
                    {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]
  if spec["add_dummy_prefix"]:
    normalizers.append({"type": "Prepend", "prepend": space})  # a no-op on an empty text
  if spec["escape_whitespaces"]:
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": _SPACE})

  pieces = [sp.id_to_piece(i) for i in range(n)]
  unk_id = sp.unk_id()
  if spec["model_type"] == _UNIGRAM:
    # sentencepiece's lattice holds only normal (and user-defined) pieces, tokenizers' holds all, so
    # text that spells a byte or control piece ("<0x41>", "<s>") could match it. A score below
    # that of spelling each of its characters with the worst piece keeps it out of every best
    # segmentation; the only other use of the lowest score, the unknown character's, is shared by
    # all segmentations (no piece contains an unknown character), so the best one is unchanged.
    scores = [float(sp.get_score(i)) for i in range(n)]
    reserved = [i for i in range(n) if types[i] not in (_NORMAL, _USER_DEFINED)]
    worst = min([0.0] + [scores[i] for i in range(n) if types[i] == _NORMAL])
    unreachable = max(len(pieces[i]) for i in reserved) * worst - 10.0 if reserved else 0.0
    for i in reserved:
      scores[i] = unreachable
    model = {"type": "Unigram", "unk_id": unk_id,
             "vocab": [[piece, score] for piece, score in zip(pieces, scores)],
             "byte_fallback": spec["byte_fallback"]}
  else:
    normal = {piece: i for i, piece in enumerate(pieces) if types[i] == _NORMAL}
    ranked = []
    for piece, i in normal.items():
      for k in range(1, len(piece)):
        if piece[:k] in normal and piece[k:] in normal:
          ranked.append((-sp.get_score(i), i, k, piece[:k], piece[k:]))
    ranked.sort()
    merges = [[a, b] for *_, a, b in ranked]
    if not any(" " in piece for piece in normal):  # the "a b" form older tokenizers read too
      merges = [f"{a} {b}" for a, b in merges]
    model = {"type": "BPE", "dropout": None, "unk_token": pieces[unk_id],
             "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
             "byte_fallback": spec["byte_fallback"],
             "vocab": {piece: i for i, piece in enumerate(pieces)}, "merges": merges}

  # Matched in the raw text: control and unknown pieces as special tokens, user-defined ones as
  # plain ones (sentencepiece matches those in the normalized text, but tokenizers would normalize
  # them too, and the dummy prefix would then be part of them).
  added = [{"id": i, "content": pieces[i], "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": types[i] != _USER_DEFINED}
           for i in range(n) if types[i] in (_CONTROL, _UNKNOWN, _USER_DEFINED)]
  bos_id, bos = special["bos"]

  def bos_then(sequence, type_id):
    return [{"SpecialToken": {"id": bos, "type_id": type_id}},
            {"Sequence": {"id": sequence, "type_id": type_id}}]

  post_processor = {  # BOS first, as tokenizer_config.json's add_bos_token says
      "type": "TemplateProcessing", "single": bos_then("A", 0),
      "pair": bos_then("A", 0) + bos_then("B", 1),
      "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
  decoders = []
  if spec["escape_whitespaces"]:
    decoders.append({"type": "Replace", "pattern": {"String": _SPACE}, "content": " "})
  if spec["byte_fallback"]:
    decoders.append({"type": "ByteFallback"})
  decoders.append({"type": "Fuse"})
  if spec["add_dummy_prefix"]:
    decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
  return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
          "normalizer": {"type": "Sequence", "normalizers": normalizers} if normalizers else None,
          "pre_tokenizer": None, "post_processor": post_processor,
          "decoder": {"type": "Sequence", "decoders": decoders}, "model": model}


# --------------------------------------------------------------------------------------------- CLI


def add_arguments(subparsers):
  """Adds `convert from-hf` and `convert to-hf` to the CLI's subcommands."""
  p = subparsers.add_parser("convert", help="convert LLaMA-family checkpoints to/from HF")
  sub = p.add_subparsers(dest="direction", required=True)
  q = sub.add_parser("from-hf", help="an HF model directory (safetensors) -> an lmtrain checkpoint")
  q.add_argument("--input", required=True, help="HF model directory (config.json, safetensors)")
  q.add_argument("--output", required=True, help="new directory for the checkpoint (INIT_FROM)")
  q = sub.add_parser("to-hf", help="an lmtrain stage's checkpoint -> an HF LlamaForCausalLM "
                     "(reward model: LlamaForSequenceClassification) directory")
  q.add_argument("--checkpoint", required=True, help="a stage directory, e.g. runs/demo/sft")
  q.add_argument("--output", required=True, help="new directory for the HF model")
  q.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
  q.add_argument("--dtype", choices=DTYPES, default="float32",
                 help="weight dtype in the safetensors files (float32 is exact)")
  q.add_argument("--max_shard_gb", type=float, default=5.0, help="largest safetensors shard")
  q.add_argument("--max_position_embeddings", type=int, default=4096,
                 help="config.json's context length (lmtrain's RoPE sets no limit)")
  q.add_argument("--adapter", metavar="DIR",
                 help="LoRA checkpoints: write the base to --output and the adapters as a PEFT "
                      "adapter directory here (default: merged weights)")


def run(args):
  if args.direction == "from-hf":
    cfg = from_hf(args.input, args.output)
    print(f"wrote {args.output}: {cfg.num_layers} layers, d_model {cfg.d_model}, vocab "
          f"{cfg.vocab_size} ({cfg.param_count():,} parameters)")
  else:
    files = to_hf(args.checkpoint, args.output, step=args.step, dtype=args.dtype,
                  max_shard_bytes=int(args.max_shard_gb * 2**30),
                  max_positions=args.max_position_embeddings, adapter_dir=args.adapter)
    print(f"wrote {args.output}: {', '.join(files)}")
    if args.adapter:
      print(f"wrote {args.adapter}: adapter_config.json, adapter_model.safetensors (PEFT LoRA)")


def main(argv=None):
  """`python -m lmtrain.convert from-hf|to-hf ...`, the same as `lmtrain convert ...`."""
  parser = argparse.ArgumentParser(prog="lmtrain")
  add_arguments(parser.add_subparsers(dest="command", required=True))
  args = parser.parse_args(["convert", *(sys.argv[1:] if argv is None else argv)])
  try:
    run(args)
  except UserError as e:
    print(f"lmtrain: error: {e}", file=sys.stderr)
    sys.exit(e.exit_code)


if __name__ == "__main__":
  main()
