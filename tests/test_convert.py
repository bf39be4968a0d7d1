"""`lmtrain convert`: HF <-> lmtrain round trip, golden logits against transformers (causal LM,
reward model as sequence classifier, Llama 3.1 RoPE scaling), LLaMA tokenizers' ids, bad inputs."""

import argparse
import dataclasses
import io
import json
import os

import jax
import numpy as np
import optax
import pytest
import sentencepiece as spm
import torch
import transformers

from lmtrain import config, convert, sample
from lmtrain.data import batching, preference, sft as sft_data
from lmtrain.data import tokenizer as tokenizer_lib
from lmtrain.model import generate as generate_lib
from lmtrain.errors import UserError
from lmtrain.model import transformer
from lmtrain.train import checkpoint as ckpt_lib
from lmtrain.train import optim, roles
from lmtrain.train.state import TrainState
from util import TINY, init_params

LENGTHS = (12, 7, 3)  # ragged batch, right-padded to the first


def _restore(stage_dir, cfg):
  """The latest params of `stage_dir` as numpy arrays."""
  _, abstract, _ = transformer.abstract_model(cfg)
  host = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=host), abstract)
  params, _ = ckpt_lib.restore_params(stage_dir, abstract)
  return jax.tree.map(np.asarray, params)


def _lmtrain_logits(cfg):
  """(params, tokens [B, T], lengths [B]) -> [B, T, V] logits, the padding after each length
  marked by segment id 0."""
  graphdef, _, _ = transformer.abstract_model(cfg)
  forward = jax.jit(lambda p, t, pos, seg: transformer.merge(graphdef, p)(t, pos, seg))

  def logits(params, tokens, lengths):
    seg = (np.arange(tokens.shape[1])[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    pos = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    return np.asarray(forward(params, tokens, pos, seg))

  return logits


def _lmtrain_scores(cfg, params, tokens, lengths):
  """[B] scalar-head scores at each row's last real token, as the reward stage reads them."""
  graphdef, _, _ = transformer.abstract_model(cfg)
  seg = (np.arange(tokens.shape[1])[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
  pos = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  model = transformer.merge(graphdef, params)
  scores = jax.jit(lambda t, p, s: model.scores(model.hidden(t, p, s)))(tokens, pos, seg)
  scores = np.asarray(scores)
  return scores[np.arange(len(lengths)), np.asarray(lengths) - 1]


def _hf_logits(model, tokens, lengths):
  mask = torch.tensor(np.arange(tokens.shape[1])[None, :] < np.asarray(lengths)[:, None])
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens), attention_mask=mask.long()).logits.numpy()


def _ragged_tokens(vocab, seed=0, lengths=LENGTHS):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, vocab, (len(lengths), max(lengths))).astype(np.int32)
  for b, n in enumerate(lengths):
    tokens[b, n:] = 0
  return tokens


def _assert_same_on_real_tokens(ours, theirs, tol=1e-4, lengths=LENGTHS):
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(ours[b, :n], theirs[b, :n], atol=tol, rtol=0)


def _greedy(step_logits, prompt, new_tokens):
  """Greedy continuation by full recomputation on a fixed-length buffer (one compiled shape)."""
  buf = np.zeros((1, len(prompt) + new_tokens), np.int32)
  buf[0, :len(prompt)] = prompt
  for n in range(len(prompt), buf.shape[1]):
    buf[0, n] = int(np.argmax(step_logits(buf, n)[0, n - 1]))
  return buf[0, len(prompt):].tolist()


def _hf_model(tied, seed=0, classifier=False, rope_scaling=None):
  """A tiny random LlamaForCausalLM, or LlamaForSequenceClassification with one label."""
  torch.manual_seed(seed)
  extra = {"num_labels": 1} if classifier else {}
  if rope_scaling:
    extra["rope_scaling"] = rope_scaling
  hf_config = transformers.LlamaConfig(
      vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, intermediate_size=128, rope_theta=10000.0, rms_norm_eps=1e-5,
      tie_word_embeddings=tied, initializer_range=0.2, bos_token_id=2, eos_token_id=1,
      pad_token_id=0, attn_implementation="eager", **extra)
  cls = transformers.LlamaForSequenceClassification if classifier else transformers.LlamaForCausalLM
  model = cls(hf_config).float().eval()
  with torch.no_grad():  # norms away from 1, so a swapped or dropped norm shows in the logits
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.3 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """{tied: HF model directory} of two tiny random LlamaForCausalLM."""
  out = {}
  for tied in (False, True):
    d = tmp_path_factory.mktemp(f"hf_tied{tied}")
    _hf_model(tied).save_pretrained(str(d), safe_serialization=True)
    out[tied] = str(d)
  return out


@pytest.mark.parametrize("tied", [False, True])
def test_from_hf_matches_transformers_logits_and_greedy(hf_dirs, tmp_path, tied):
  out = str(tmp_path / "ckpt")
  cfg = convert.from_hf(hf_dirs[tied], out)
  assert (cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.kv_heads,
          cfg.head_size, cfg.mlp_dim, cfg.tie_embeddings) == (128, 64, 2, 4, 2, 16, 128, tied)
  assert cfg.norm_eps == 1e-5 and cfg.rope_theta == 10000.0
  params = _restore(out, cfg)
  assert ("lm_head" in params) == (not tied)
  hf = transformers.LlamaForCausalLM.from_pretrained(hf_dirs[tied], attn_implementation="eager")
  hf = hf.float().eval()

  tokens = _ragged_tokens(cfg.vocab_size)
  logits = _lmtrain_logits(cfg)
  _assert_same_on_real_tokens(logits(params, tokens, LENGTHS), _hf_logits(hf, tokens, LENGTHS))

  prompt = [2, 17, 90, 5, 64]
  ours_greedy = _greedy(lambda buf, n: logits(params, buf, [n]), prompt, 20)
  theirs_greedy = _greedy(lambda buf, n: _hf_logits(hf, buf[:, :n], [n]), prompt, 20)
  assert ours_greedy == theirs_greedy


def _write_stage(stage_dir, cfg, params, tokenizer_path, stage="sft", parent=None):
  """A stage directory as the training loop leaves it: a TrainState, model.json, lineage.
  `parent`: the lineage entry of the checkpoint it started from."""
  optimizer = optim.make_optimizer(optax.constant_schedule(1e-3))
  state = TrainState.create(params, optimizer, jax.random.PRNGKey(0))
  checkpointer = ckpt_lib.Checkpointer(os.path.join(stage_dir, "checkpoints"), async_save=False)
  checkpointer.save(7, state)
  checkpointer.close()
  with open(os.path.join(stage_dir, "model.json"), "w") as f:
    json.dump(dataclasses.asdict(cfg), f)
  ckpt_lib.write_lineage(stage_dir, stage, "", parent, tokenizer=tokenizer_path)


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_is_bit_identical_and_loads_in_transformers(tmp_path, tokenizer_path, tied):
  cfg = dataclasses.replace(TINY, vocab_size=512, tie_embeddings=tied)
  params = init_params(cfg, seed=3)
  # Norm scales off 1, so each one's placement is checked too.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(len(str(p))), x.shape)
      if "scale" in str(p) else x, params)
  stage = str(tmp_path / "run" / "sft")
  _write_stage(stage, cfg, params, tokenizer_path)

  hf_dir = str(tmp_path / "hf")
  files = convert.to_hf(stage, hf_dir, max_shard_bytes=60_000)  # several shards and an index
  assert convert.INDEX_FILE in files and "tokenizer.model" in files
  assert len([f for f in files if f.endswith(".safetensors")]) > 2
  back = str(tmp_path / "back")
  cfg_back = convert.from_hf(hf_dir, back)
  for field in ("vocab_size", "d_model", "num_layers", "num_heads", "kv_heads", "head_size",
                "mlp_dim", "rope_theta", "norm_eps", "tie_embeddings"):
    assert getattr(cfg_back, field) == getattr(cfg, field), field
  restored = _restore(back, cfg_back)
  original = jax.tree.map(np.asarray, params)
  assert jax.tree.structure(restored) == jax.tree.structure(original)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(original)):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  assert os.path.exists(os.path.join(back, "tokenizer.model"))

  # transformers loads the export and computes the same logits.
  hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
  assert hf.config.bos_token_id == 2 and hf.config.eos_token_id == 1
  assert hf.config.pad_token_id == 0
  tokens = _ragged_tokens(cfg.vocab_size, seed=1)
  _assert_same_on_real_tokens(_lmtrain_logits(cfg)(original, tokens, LENGTHS),
                              _hf_logits(hf, tokens, LENGTHS))


def test_a_lora_checkpoint_exports_merged_weights_with_the_same_logits(tmp_path, tokenizer_path):
  from lmtrain.model import lora
  cfg = dataclasses.replace(TINY, vocab_size=512, lora_rank=4, lora_alpha=8.0)
  params = init_params(cfg, seed=3)
  keys = iter(jax.random.split(jax.random.PRNGKey(5), 64))
  params[lora.KEY] = jax.tree.map(  # trained-looking adapters: B off zero
      lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), params[lora.KEY])
  # As a LoRA stage leaves it: the adapters in its checkpoint, the base in its parent's.
  parent = str(tmp_path / "run" / "pretrain")
  _write_stage(parent, lora.base_config(cfg), lora.without_adapters(params), tokenizer_path,
               "pretrain")
  stage = str(tmp_path / "run" / "sft")
  _write_stage(stage, cfg, {lora.KEY: params[lora.KEY]}, tokenizer_path,
               parent={"stage": "pretrain", "path": parent, "step": 7})
  hf_dir = str(tmp_path / "hf")
  convert.to_hf(stage, hf_dir)
  hf_config = json.load(open(os.path.join(hf_dir, "config.json")))
  assert hf_config["architectures"] == ["LlamaForCausalLM"]
  hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
  tokens = _ragged_tokens(cfg.vocab_size, seed=1)
  ours = _lmtrain_logits(cfg)(jax.tree.map(np.asarray, params), tokens, LENGTHS)
  base = _lmtrain_logits(lora.base_config(cfg))(
      jax.tree.map(np.asarray, lora.without_adapters(params)), tokens, LENGTHS)
  assert np.abs(ours - base).max() > 1e-2  # the adapters matter
  _assert_same_on_real_tokens(ours, _hf_logits(hf, tokens, LENGTHS))
  # --adapter: the base there, and a PEFT adapter directory that PEFT loads onto it.
  import peft
  base_dir, adapter_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
  convert.to_hf(stage, base_dir, adapter_dir=adapter_dir)
  assert sorted(os.listdir(adapter_dir)) == ["adapter_config.json", "adapter_model.safetensors"]
  hf_base = transformers.LlamaForCausalLM.from_pretrained(base_dir,
                                                          attn_implementation="eager").eval()
  _assert_same_on_real_tokens(base, _hf_logits(hf_base, tokens, LENGTHS))
  with_adapter = peft.PeftModel.from_pretrained(hf_base, adapter_dir).eval()
  _assert_same_on_real_tokens(ours, _hf_logits(with_adapter, tokens, LENGTHS))
  with pytest.raises(UserError, match="already holds adapter_config.json"):
    convert.to_hf(stage, str(tmp_path / "base2"), adapter_dir=adapter_dir)


@pytest.fixture(scope="module")
def bf16_export(tmp_path_factory, tokenizer_path):
  """(cfg, params, HF directory, files written) of a bfloat16 to-hf export of a tiny model that
  has the session's lmtrain tokenizer."""
  d = tmp_path_factory.mktemp("bf16_export")
  stage = str(d / "run" / "pretrain")
  cfg = dataclasses.replace(TINY, vocab_size=512)
  params = init_params(cfg)
  _write_stage(stage, cfg, params, tokenizer_path)
  files = convert.to_hf(stage, str(d / "hf"), dtype="bfloat16")
  return cfg, params, str(d / "hf"), files


def test_bfloat16_export_and_its_tokenizer(tmp_path, tokenizer_path, bf16_export):
  cfg, params, hf_dir, _ = bf16_export
  # bfloat16 tensors come back as float32 holding the rounded values.
  convert.from_hf(hf_dir, str(tmp_path / "back"))
  back = _restore(str(tmp_path / "back"), cfg)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, np.asarray(b.astype(jax.numpy.bfloat16), np.float32))

  # The tokenizer encodes as lmtrain's does.
  hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
  ours = tokenizer_lib.Tokenizer.load(tokenizer_path)
  assert (hf_tok.pad_token_id, hf_tok.eos_token_id, hf_tok.bos_token_id, hf_tok.unk_token_id) == (
      ours.pad_id, ours.eos_id, ours.bos_id, ours.unk_id)
  texts = ["The cat sat on the mat.", "  two leading spaces,\nnewlines\n and  doubles  ",
           "Ünïcödé ☃ 日本語 🎉 bytes", "a", ""]
  for text in texts:
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text), text
  assert hf_tok("hi")["input_ids"] == [ours.bos_id] + ours.encode("hi")


# What a user without sentencepiece (or protobuf) gets: transformers alone, reading tokenizer.json.
_LOAD_WITHOUT_SENTENCEPIECE = """
import json, sys
for name in ("sentencepiece", "google.protobuf"):
  sys.modules[name] = None  # import raises ImportError, importlib.util.find_spec gives None
  try:
    __import__(name)
  except ImportError:
    pass
  else:
    raise SystemExit(name + " is still importable")
import transformers
job = json.load(sys.stdin)
tok = transformers.AutoTokenizer.from_pretrained(job["dir"])
out = {
    "class": type(tok).__name__,
    "special": [tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id],
    "special_tokens": tok.convert_ids_to_tokens(job["special_ids"]),
    "encode": [tok(t, add_special_tokens=False)["input_ids"] for t in job["texts"]],
    "with_bos": [tok(t)["input_ids"] for t in job["texts"]],
    "decode": [tok.decode(ids, skip_special_tokens=True) for ids in job["ids"]],
    "with_eos": tok(job["texts"][0] + tok.eos_token, add_special_tokens=False)["input_ids"],
    "loaded": sorted(m for m in sys.modules if m.startswith(("sentencepiece", "google.protobuf"))
                     and sys.modules[m] is not None),
}
print(json.dumps(out))
"""

# Plain ASCII, leading/trailing/repeated spaces, newlines and tabs, digits, punctuation, characters
# only byte fallback encodes, nothing at all.
TOKENIZER_TEXTS = [
    "The cat sat on the mat.", "hello world", " leading", "trailing ", "   three  spaces   ",
    "line one\nline two\n\n  indented\n", "tab\tseparated", "1234567890 and 3.14159, 2^10 = 1024",
    "Punctuation: (a, b); [c]! {d}? \"e\" 'f' - g_h / i\\j @k #l $m %n &o *p +q =r <s |t> ~u",
    "héllo wörld 日本語 🙂", "Ünïcödé ☃ 🎉", "\n", " ", "", "a", "<0x41> spelled out",
]


def _check_fast_tokenizer(hf_dir, model_path):
  """Loads `hf_dir`'s tokenizer with transformers in a process where sentencepiece and protobuf
  cannot be imported, and checks it against sentencepiece on TOKENIZER_TEXTS."""
  import subprocess
  import sys
  sp = spm.SentencePieceProcessor(model_file=model_path)
  ours = tokenizer_lib.Tokenizer.load(model_path)
  ids = [sp.encode(t) for t in TOKENIZER_TEXTS]
  special_ids = [ours.pad_id, ours.eos_id, ours.bos_id, ours.unk_id]
  job = {"dir": hf_dir, "texts": TOKENIZER_TEXTS, "ids": ids, "special_ids": special_ids}
  proc = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_SENTENCEPIECE], input=json.dumps(job),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["loaded"] == []
  assert out["special"] == special_ids
  assert out["special_tokens"] == [sp.id_to_piece(i) for i in special_ids]
  for text, theirs, want in zip(TOKENIZER_TEXTS, out["encode"], ids):
    assert theirs == want, text
  assert out["with_bos"] == [[ours.bos_id] + want for want in ids]
  assert out["decode"] == [sp.decode(want) for want in ids]
  # A special token in the text is one token, never split.
  assert out["with_eos"] == ids[0] + [ours.eos_id]
  return out


def test_tokenizer_json_loads_without_sentencepiece(bf16_export, tokenizer_path):
  _, _, hf_dir, files = bf16_export
  assert "tokenizer.json" in files
  with open(os.path.join(hf_dir, "tokenizer.json"), encoding="utf-8") as f:
    fast = json.load(f)
  assert fast["model"]["type"] == "Unigram" and fast["model"]["byte_fallback"]
  ours = tokenizer_lib.Tokenizer.load(tokenizer_path)
  assert fast["model"]["unk_id"] == ours.unk_id == tokenizer_lib.UNK_ID
  assert {t["content"]: t["id"] for t in fast["added_tokens"] if t["special"]} == {
      "<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3}
  out = _check_fast_tokenizer(hf_dir, tokenizer_path)
  assert out["special"] == [0, 1, 2, 3]
  # lmtrain's identity normalization: decoding gives back the text itself.
  assert out["decode"] == TOKENIZER_TEXTS


def test_tokenizer_json_of_a_bpe_model(tmp_path):
  """A converted LLaMA tokenizer is a BPE sentencepiece model: its tokenizer.json has the merges."""
  lines = [f"the quick brown fox jumps over the lazy dog {i} times, then it rests; naïve café"
           for i in range(50)]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(  # LLaMA's settings
      sentence_iterator=iter(lines), model_writer=model, vocab_size=400, model_type="bpe",
      byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
      split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
      num_threads=1, minloglevel=2)
  path = tmp_path / "tokenizer.model"
  path.write_bytes(model.getvalue())
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  files = convert._write_tokenizer(str(path), convert._special_tokens(str(path)), str(hf_dir))
  assert "tokenizer.json" in files
  fast = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
  assert fast["model"]["type"] == "BPE" and len(fast["model"]["merges"]) > 100
  out = _check_fast_tokenizer(str(hf_dir), str(path))
  assert out["special"] == [0, 2, 1, 0]  # LLaMA's: pad is unk
  assert out["decode"] == TOKENIZER_TEXTS


def test_no_tokenizer_json_for_a_char_model(tmp_path, capsys):
  path = _train_spm(tmp_path / "char.model", model_type="char")
  files = convert._write_tokenizer(path, convert._special_tokens(path), str(tmp_path))
  assert files == ["tokenizer.model", "tokenizer_config.json"]
  assert not os.path.exists(tmp_path / "tokenizer.json")
  assert "no tokenizer.json written" in capsys.readouterr().err


def test_converted_checkpoint_starts_a_stage(hf_dirs, tmp_path):
  out = str(tmp_path / "ckpt")
  cfg = convert.from_hf(hf_dirs[True], out)
  config.setup("sft", [os.path.join(out, "model.gin")], {"MODEL": "tiny", "INIT_FROM": out})
  got = transformer.model_config()
  fields = [f.name for f in dataclasses.fields(cfg) if f.name not in ("remat", "dtype")]
  assert {f: getattr(got, f) for f in fields} == {f: getattr(cfg, f) for f in fields}

  # What a chained stage does with INIT_FROM.
  _, abstract, _ = transformer.abstract_model(got)
  host = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=host), abstract)
  params, parent = ckpt_lib.parent_initializer(str(tmp_path), out, "pretrain", got)(abstract)
  assert parent == {"stage": "from_hf", "path": out, "step": 0,
                    "committed": ckpt_lib.committed_at(os.path.join(out, "checkpoints"), 0)}
  assert parent["committed"] > 0
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(_restore(out, cfg))):
    np.testing.assert_array_equal(np.asarray(a), b)


def _copy_hf(src, dst, edit_config=None):
  os.makedirs(dst)
  for name in os.listdir(src):
    with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
      g.write(f.read())
  if edit_config:
    path = os.path.join(dst, "config.json")
    with open(path) as f:
      hf = json.load(f)
    edit_config(hf)
    with open(path, "w") as f:
      json.dump(hf, f)
  return dst


def _one_line_error(input_dir, tmp_path):
  with pytest.raises(UserError) as e:
    convert.from_hf(input_dir, str(tmp_path / "out"))
  message = str(e.value)
  assert "\n" not in message
  return message


def test_missing_shard(tmp_path):
  d = str(tmp_path / "sharded")
  _hf_model(False).save_pretrained(d, safe_serialization=True, max_shard_size="100KB")
  with open(os.path.join(d, convert.INDEX_FILE)) as f:
    shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
  os.remove(os.path.join(d, shard))
  message = _one_line_error(d, tmp_path)
  assert shard in message and convert.INDEX_FILE in message


def test_shape_mismatch(hf_dirs, tmp_path):
  d = _copy_hf(hf_dirs[False], str(tmp_path / "bad"),
               lambda hf: hf.update(intermediate_size=96))
  message = _one_line_error(d, tmp_path)
  assert "model.layers.0.mlp.gate_proj.weight has shape [128, 64]" in message
  assert "[96, 64]" in message and "model.safetensors" in message


def test_unknown_architecture(hf_dirs, tmp_path):
  d = _copy_hf(hf_dirs[False], str(tmp_path / "bad"),
               lambda hf: hf.update(architectures=["GPT2LMHeadModel"]))
  message = _one_line_error(d, tmp_path)
  assert "'GPT2LMHeadModel' is not supported" in message and "config.json" in message


def test_pickle_only_directory(hf_dirs, tmp_path):
  d = tmp_path / "bin"
  d.mkdir()
  with open(os.path.join(hf_dirs[False], "config.json")) as f:
    (d / "config.json").write_text(f.read())
  (d / "pytorch_model.bin").write_bytes(b"never unpickled")
  message = _one_line_error(str(d), tmp_path)
  assert "pytorch_model.bin" in message and "safetensors" in message


def test_truncated_safetensors(hf_dirs, tmp_path):
  d = _copy_hf(hf_dirs[False], str(tmp_path / "cut"))
  with open(os.path.join(d, "model.safetensors"), "r+b") as f:
    f.truncate(4)
  assert "model.safetensors: not a readable safetensors file" in _one_line_error(d, tmp_path)


def test_refuses_unknown_rope_scaling_classifier_labels_and_biases(hf_dirs, tmp_path):
  scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}
  d = _copy_hf(hf_dirs[False], str(tmp_path / "rope"),
               lambda hf: hf.update(rope_parameters={"rope_theta": 5e5, **scaling}))
  assert "rope scaling 'yarn' is not supported" in _one_line_error(d, tmp_path)
  d = _copy_hf(hf_dirs[False], str(tmp_path / "rope3"), lambda hf: hf.update(
      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}))
  assert "needs a number 'high_freq_factor'" in _one_line_error(d, tmp_path)
  d = _copy_hf(hf_dirs[False], str(tmp_path / "labels"), lambda hf: hf.update(
      architectures=["LlamaForSequenceClassification"], id2label={"0": "NEG", "1": "POS"}))
  message = _one_line_error(d, tmp_path)
  assert "2 labels" in message and "num_labels=1" in message and "config.json" in message
  d = _copy_hf(hf_dirs[False], str(tmp_path / "bias"), lambda hf: hf.update(attention_bias=True))
  assert "attention_bias=true" in _one_line_error(d, tmp_path)


def test_cli_reports_one_line_and_exit_1(hf_dirs, tmp_path, capsys):
  d = _copy_hf(hf_dirs[False], str(tmp_path / "bad"),
               lambda hf: hf.update(architectures=["GPT2LMHeadModel"]))
  with pytest.raises(SystemExit) as e:
    convert.main(["from-hf", "--input", d, "--output", str(tmp_path / "out")])
  assert e.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("lmtrain: error: ") and "GPT2LMHeadModel" in err[0]


# ------------------------------------------------------------------- reward model <-> classifier


def _hf_scores(model, tokens, lengths):
  mask = torch.tensor(np.arange(tokens.shape[1])[None, :] < np.asarray(lengths)[:, None])
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens), attention_mask=mask.long()).logits
  return out[:, 0].numpy()


def test_from_hf_sequence_classifier_matches_transformers_scores(tmp_path):
  hf_dir = str(tmp_path / "hf_rm")
  _hf_model(False, seed=5, classifier=True).save_pretrained(hf_dir, safe_serialization=True)
  out = str(tmp_path / "ckpt")
  cfg = convert.from_hf(hf_dir, out)
  assert cfg.head == "scalar"
  params = _restore(out, cfg)
  assert "lm_head" not in params and params["score"].shape == (64,)
  assert params["score_bias"] == 0.0
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(
      hf_dir, attn_implementation="eager").float().eval()
  # Right-padded with HF's pad id, so HF reads the last real token as lmtrain does.
  tokens = _ragged_tokens(cfg.vocab_size, seed=2)
  ours, theirs = _lmtrain_scores(cfg, params, tokens, LENGTHS), _hf_scores(hf, tokens, LENGTHS)
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
  assert np.abs(theirs).max() > 1e-2  # not trivially zero


def test_reward_checkpoint_exports_as_sequence_classifier(tmp_path, tokenizer_path, capsys):
  cfg = dataclasses.replace(TINY, vocab_size=512, head="scalar")
  params = init_params(cfg, seed=4)
  params["score_bias"] = jax.numpy.asarray(0.25, jax.numpy.float32)
  stage = str(tmp_path / "run" / "reward")
  _write_stage(stage, cfg, params, tokenizer_path, stage="reward")
  norm = {"offset": 0.5, "scale": 2.0, "num_responses": 8}
  with open(os.path.join(stage, roles.NORMALIZATION_FILE), "w") as f:
    json.dump(norm, f)

  hf_dir = str(tmp_path / "hf")
  files = convert.to_hf(stage, hf_dir)
  assert roles.NORMALIZATION_FILE in files
  with open(os.path.join(hf_dir, roles.NORMALIZATION_FILE)) as f:
    assert json.load(f) == norm
  notes = [line for line in capsys.readouterr().err.splitlines() if convert.SCORE_BIAS_KEY in line]
  assert len(notes) == 1 and "0.25" in notes[0]

  hf = transformers.AutoModelForSequenceClassification.from_pretrained(
      hf_dir, attn_implementation="eager").eval()
  assert isinstance(hf, transformers.LlamaForSequenceClassification)
  assert hf.num_labels == 1 and hf.score.bias is None
  tok = tokenizer_lib.Tokenizer.load(tokenizer_path)
  assert hf.config.pad_token_id == tok.pad_id and hf.config.eos_token_id == tok.eos_id
  bias = getattr(hf.config, convert.SCORE_BIAS_KEY)
  assert bias == 0.25
  tokens = _ragged_tokens(cfg.vocab_size, seed=3)
  tokens[:, 0] = tok.bos_id
  ours = _lmtrain_scores(cfg, params, tokens, LENGTHS)
  np.testing.assert_allclose(ours, _hf_scores(hf, tokens, LENGTHS) + bias, atol=1e-4, rtol=0)

  # And back: the head, its bias and the normalisation come through unchanged.
  back = str(tmp_path / "back")
  cfg_back = convert.from_hf(hf_dir, back)
  assert cfg_back.head == "scalar"
  restored, original = _restore(back, cfg_back), jax.tree.map(np.asarray, params)
  assert jax.tree.structure(restored) == jax.tree.structure(original)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(original)):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  assert os.path.exists(os.path.join(back, roles.NORMALIZATION_FILE))


# ---------------------------------------------------------------------------- RoPE scaling


# Original context 32 with high/low frequency factors 4/1: of the 8 frequencies of a 16-wide head
# (wavelengths 6.3, 20, 63, ...) the first is kept, the second blended and the rest divided by 4.
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
LONG = (40, 33, 21)  # past the original context, where scaling changes the logits


@pytest.mark.parametrize("scaling", [LLAMA3_SCALING, {"rope_type": "linear", "factor": 2.5}],
                         ids=["llama3", "linear"])
def test_rope_scaling_matches_transformers_and_round_trips(tmp_path, scaling):
  hf_dir = str(tmp_path / "hf")
  _hf_model(False, seed=6, rope_scaling=dict(scaling)).save_pretrained(
      hf_dir, safe_serialization=True)
  out = str(tmp_path / "ckpt")
  cfg = convert.from_hf(hf_dir, out)
  assert (cfg.rope_scaling, cfg.rope_scaling_factor) == (scaling["rope_type"], scaling["factor"])
  if scaling["rope_type"] == "llama3":
    assert (cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_len) == (
        1.0, 4.0, 32)
  with open(os.path.join(out, "model.gin")) as f:
    assert "'rope_scaling': " + repr(scaling["rope_type"]) in f.read()
  params = _restore(out, cfg)
  hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="eager")
  hf = hf.float().eval()
  tokens = _ragged_tokens(cfg.vocab_size, seed=4, lengths=LONG)
  ours = _lmtrain_logits(cfg)(params, tokens, LONG)
  theirs = _hf_logits(hf, tokens, LONG)
  _assert_same_on_real_tokens(ours, theirs, lengths=LONG)
  unscaled = _lmtrain_logits(dataclasses.replace(cfg, rope_scaling="none"))(params, tokens, LONG)
  assert np.abs(unscaled[0, :40] - theirs[0, :40]).max() > 1e-2  # the scaling does matter here

  if scaling["rope_type"] == "llama3":
    # The KV-cache path (generation) rotates with the same frequencies: greedy up to position 39.
    graphdef, _, _ = transformer.abstract_model(cfg)
    prompt = tokens[0, :30]
    got = generate_lib.generate(graphdef, params, prompt[None], np.array([30], np.int32),
                                jax.random.PRNGKey(0), max_new_tokens=10, greedy=True, eos_id=-1)
    expected = _greedy(lambda buf, n: _hf_logits(hf, buf[:, :n], [n]), prompt.tolist(), 10)
    assert np.asarray(got.tokens[0]).tolist() == expected

  # lmtrain -> HF writes the same rope_scaling, and transformers computes the same logits.
  hf_back = str(tmp_path / "hf_back")
  convert.to_hf(out, hf_back)
  with open(os.path.join(hf_back, "config.json")) as f:
    written = json.load(f)["rope_scaling"]
  assert written == {k: v for k, v in scaling.items()}
  hf2 = transformers.LlamaForCausalLM.from_pretrained(hf_back, attn_implementation="eager").eval()
  _assert_same_on_real_tokens(ours, _hf_logits(hf2, tokens, LONG), lengths=LONG)


def test_rope_frequencies_bands():
  cfg = dataclasses.replace(
      TINY, rope_scaling="llama3", rope_scaling_factor=4.0, rope_low_freq_factor=1.0,
      rope_high_freq_factor=4.0, rope_original_max_len=32)
  base = np.asarray(transformer.rope_frequencies(dataclasses.replace(cfg, rope_scaling="none")))
  scaled = np.asarray(transformer.rope_frequencies(cfg))
  wavelength = 2 * np.pi / base
  assert wavelength[0] < 8 and 8 < wavelength[1] < 32 and (wavelength[2:] > 32).all()
  assert scaled[0] == base[0]
  np.testing.assert_allclose(scaled[2:], base[2:] / 4, rtol=1e-6)
  s = (32 / wavelength[1] - 1) / 3
  np.testing.assert_allclose(scaled[1], base[1] * (s + (1 - s) / 4), rtol=1e-6)
  with pytest.raises(UserError, match="rope_scaling='yarn'"):
    dataclasses.replace(TINY, rope_scaling="yarn").validate()


# ------------------------------------------------------------- LLaMA tokenizers' special ids


def _train_spm(path, model_type="unigram", **ids):
  lines = [f"the quick brown fox jumps over the lazy dog {i} times, then it rests"
           for i in range(50)]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, vocab_size=100, model_type=model_type,
      hard_vocab_limit=False, num_threads=1, minloglevel=2, **ids)
  with open(path, "wb") as f:
    f.write(model.getvalue())
  return str(path)


@pytest.fixture(scope="module")
def llama_tokenizer_path(tmp_path_factory):
  """A sentencepiece model with LLaMA's special ids: unk 0, bos 1, eos 2, no pad."""
  return _train_spm(tmp_path_factory.mktemp("llama_tok") / "tokenizer.model",
                    unk_id=0, bos_id=1, eos_id=2, pad_id=-1)


def test_tokenizer_takes_llama_special_ids(llama_tokenizer_path, tmp_path):
  tok = tokenizer_lib.Tokenizer.load(llama_tokenizer_path)
  assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 0)
  text = "the lazy fox rests"
  ids = tok.encode(text)
  assert ids and not {0, 1, 2} & set(ids)
  assert tok.decode(ids + [tok.pad_id] * 3) == text
  assert batching.document_ids(tok, text).tolist() == [1, *ids, 2]

  # SFT: [BOS] prompt, the response closed by this tokenizer's EOS, which carries loss.
  ids, mask = sft_data.encode_example([("user", "the dog"), ("assistant", "the fox")], tok)
  assert ids[0] == 1 and ids[-1] == 2 and mask[-1] == 1.0 and (ids[:-1] != 2).all()
  prompt = sft_data.encode_prompt([("user", "the dog")], tok)
  assert prompt[0] == 1 and ids[:len(prompt)].tolist() == prompt.tolist()
  [(tokens, _, n)] = preference.encode_sides([("user", "the dog")], ["the fox"], tok, None, 64)
  assert tokens[n - 1] == 2 and (tokens[n:] == tok.pad_id).all()

  # Pad must differ from EOS, and BOS/EOS must exist.
  no_eos = _train_spm(tmp_path / "no_eos.model", unk_id=0, bos_id=1, eos_id=-1, pad_id=-1)
  with pytest.raises(UserError, match="no EOS piece") as e:
    tokenizer_lib.Tokenizer.load(no_eos)
  assert "\n" not in str(e.value)


def _always_eos_hf_model(eos_id):
  """A tiny LlamaForCausalLM whose greedy next token is always `eos_id`: the layers add nothing,
  every embedding has a large positive first component, and only `eos_id`'s head row reads it."""
  model = _hf_model(False, seed=7)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(("o_proj.weight", "down_proj.weight")):
        p.zero_()
    model.model.embed_tokens.weight[:, 0] = 5.0
    model.model.norm.weight.fill_(1.0)
    model.lm_head.weight.zero_()
    model.lm_head.weight[eos_id, 0] = 1.0
  return model


def test_llama_tokenizer_through_convert_and_sample(llama_tokenizer_path, tmp_path, capsys,
                                                    monkeypatch):
  hf_dir = str(tmp_path / "hf")
  _always_eos_hf_model(eos_id=2).save_pretrained(hf_dir, safe_serialization=True)
  with open(llama_tokenizer_path, "rb") as f, open(os.path.join(hf_dir, "tokenizer.model"),
                                                  "wb") as g:
    g.write(f.read())
  ckpt = str(tmp_path / "ckpt")
  convert.from_hf(hf_dir, ckpt)
  assert "no pad piece; lmtrain pads with its unk id 0" in capsys.readouterr().err

  # Generation stops at this tokenizer's EOS (2), pads with its pad (0), prompts start with BOS (1).
  seen = {}

  def spy(*args, **kwargs):
    seen.update(kwargs)
    sampler = real(*args, **kwargs)

    def run(params, prompts, lengths, rng):
      seen["prompts"] = np.asarray(prompts)
      seen["out"] = jax.device_get(sampler(params, prompts, lengths, rng))
      return seen["out"]

    return run

  real = generate_lib.make_generate
  monkeypatch.setattr(generate_lib, "make_generate", spy)
  sample.run(argparse.Namespace(
      checkpoint=ckpt, prompt=["the dog"], prompts_file=None, max_new_tokens=5, temperature=1.0,
      top_k=0, top_p=1.0, greedy=True, seed=0, chat="yes"))
  assert (seen["eos_id"], seen["pad_id"]) == (2, 0)
  assert (seen["prompts"][:, 0] == 1).all()
  out = seen["out"]
  assert out.done.all() and (out.lengths == 1).all() and (out.tokens[:, 0] == 2).all()
  assert (out.tokens[:, 1:] == 0).all()

  # to-hf carries the same ids into config.json and tokenizer_config.json.
  hf_back = str(tmp_path / "hf_back")
  convert.to_hf(ckpt, hf_back)
  with open(os.path.join(hf_back, "config.json")) as f:
    hf_config = json.load(f)
  assert (hf_config["bos_token_id"], hf_config["eos_token_id"], hf_config["pad_token_id"]) == (
      1, 2, 0)
  with open(os.path.join(hf_back, "tokenizer_config.json")) as f:
    tok_config = json.load(f)
  assert (tok_config["bos_token"], tok_config["eos_token"], tok_config["unk_token"],
          tok_config["pad_token"]) == ("<s>", "</s>", "<unk>", "<unk>")
  hf_tok = transformers.AutoTokenizer.from_pretrained(hf_back)
  ours = tokenizer_lib.Tokenizer.load(llama_tokenizer_path)
  assert (hf_tok.pad_token_id, hf_tok.eos_token_id, hf_tok.bos_token_id, hf_tok.unk_token_id) == (
      0, 2, 1, 0)
  # From its tokenizer.json: nmt_nfkc normalization, extra spaces removed, no byte fallback.
  assert os.path.exists(os.path.join(hf_back, "tokenizer.json"))
  for text in ["the lazy dog", "  the   lazy\tdog  ", "ＴＨＥ ﬁve dogs", "the 日本 dog", ""]:
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text), text
