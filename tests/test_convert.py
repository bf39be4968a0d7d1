"""`lmtrain convert`: HF <-> lmtrain round trip, golden logits against transformers, bad inputs."""

import dataclasses
import json
import os

import jax
import numpy as np
import optax
import pytest
import torch
import transformers

from lmtrain import config, convert
from lmtrain.data import tokenizer as tokenizer_lib
from lmtrain.errors import UserError
from lmtrain.model import transformer
from lmtrain.train import checkpoint as ckpt_lib
from lmtrain.train import optim
from lmtrain.train.state import TrainState
from tests.util import TINY, init_params

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


def _hf_logits(model, tokens, lengths):
  mask = torch.tensor(np.arange(tokens.shape[1])[None, :] < np.asarray(lengths)[:, None])
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens), attention_mask=mask.long()).logits.numpy()


def _ragged_tokens(vocab, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, vocab, (len(LENGTHS), max(LENGTHS))).astype(np.int32)
  for b, n in enumerate(LENGTHS):
    tokens[b, n:] = 0
  return tokens


def _assert_same_on_real_tokens(ours, theirs, tol=1e-4):
  for b, n in enumerate(LENGTHS):
    np.testing.assert_allclose(ours[b, :n], theirs[b, :n], atol=tol, rtol=0)


def _greedy(step_logits, prompt, new_tokens):
  """Greedy continuation by full recomputation on a fixed-length buffer (one compiled shape)."""
  buf = np.zeros((1, len(prompt) + new_tokens), np.int32)
  buf[0, :len(prompt)] = prompt
  for n in range(len(prompt), buf.shape[1]):
    buf[0, n] = int(np.argmax(step_logits(buf, n)[0, n - 1]))
  return buf[0, len(prompt):].tolist()


def _hf_model(tied, seed=0):
  torch.manual_seed(seed)
  hf_config = transformers.LlamaConfig(
      vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, intermediate_size=128, rope_theta=10000.0, rms_norm_eps=1e-5,
      tie_word_embeddings=tied, initializer_range=0.2, bos_token_id=2, eos_token_id=1,
      pad_token_id=0, attn_implementation="eager")
  model = transformers.LlamaForCausalLM(hf_config).float().eval()
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


def _write_stage(stage_dir, cfg, params, tokenizer_path):
  """A stage directory as the training loop leaves it: a whole TrainState, model.json, lineage."""
  optimizer = optim.make_optimizer(optax.constant_schedule(1e-3))
  state = TrainState.create(params, optimizer, jax.random.PRNGKey(0))
  checkpointer = ckpt_lib.Checkpointer(os.path.join(stage_dir, "checkpoints"), async_save=False)
  checkpointer.save(7, state)
  checkpointer.close()
  with open(os.path.join(stage_dir, "model.json"), "w") as f:
    json.dump(dataclasses.asdict(cfg), f)
  ckpt_lib.write_lineage(stage_dir, "sft", "", tokenizer=tokenizer_path)


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


def test_bfloat16_export_and_its_tokenizer(tmp_path, tokenizer_path):
  stage = str(tmp_path / "run" / "pretrain")
  cfg = dataclasses.replace(TINY, vocab_size=512)
  params = init_params(cfg)
  _write_stage(stage, cfg, params, tokenizer_path)
  convert.to_hf(stage, str(tmp_path / "hf"), dtype="bfloat16")
  # bfloat16 tensors come back as float32 holding the rounded values.
  convert.from_hf(str(tmp_path / "hf"), str(tmp_path / "back"))
  back = _restore(str(tmp_path / "back"), cfg)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, np.asarray(b.astype(jax.numpy.bfloat16), np.float32))

  # The tokenizer encodes as lmtrain's does.
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  ours = tokenizer_lib.Tokenizer.load(tokenizer_path)
  assert (hf_tok.pad_token_id, hf_tok.eos_token_id, hf_tok.bos_token_id, hf_tok.unk_token_id) == (
      ours.pad_id, ours.eos_id, ours.bos_id, ours.unk_id)
  texts = ["The cat sat on the mat.", "  two leading spaces,\nnewlines\n and  doubles  ",
           "Ünïcödé ☃ 日本語 🎉 bytes", "a", ""]
  for text in texts:
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text), text
  assert hf_tok("hi")["input_ids"] == [ours.bos_id] + ours.encode("hi")


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
  assert parent == {"stage": "from_hf", "path": out, "step": 0}
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


def test_refuses_llama3_rope_scaling_and_biases(hf_dirs, tmp_path):
  scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
  d = _copy_hf(hf_dirs[False], str(tmp_path / "rope"),
               lambda hf: hf.update(rope_parameters={"rope_theta": 5e5, **scaling}))
  assert "rope scaling 'llama3' is not supported" in _one_line_error(d, tmp_path)
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
