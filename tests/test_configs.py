"""Every gin file parses and builds abstract shapes (no allocation); meshes fit their slices; macros."""

import dataclasses
import glob
import logging
import math
import os
import re

import gin
import jax
import pytest

from lmtrain import config, parallel
from lmtrain.model import transformer
from lmtrain.train.loop import LoopConfig

GIN_DIR = config.GIN_DIR
GiB = 1 << 30

# Published parameter counts of the presets that copy a released model's shape.
PUBLISHED = {
    "llama2_7b": 6_738_415_616,
    "llama3_8b": 8_030_261_248,
    "llama3_1_8b": 8_030_261_248,
    "1b": 1_235_814_400,  # Llama 3.2 1B
}

# Chips per slice and slices, for the mesh files we know; other names are derived by `_slice_of`.
SLICES = {
    "v4-8": (4, 1),
    "v4-32": (16, 1),
    "v5e-8": (8, 1),
    "v5e-256": (256, 1),
    "v5p-8": (4, 1),
    "v5p-512": (256, 1),
    "v6e-256": (256, 1),
    "multislice-2x-v5e-256": (256, 2),
}


def _gin_files(subdir: str) -> list[str]:
  return sorted(glob.glob(os.path.join(GIN_DIR, subdir, "*.gin")))


def _stem(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def _slice_of(name: str) -> tuple[int, int]:
  """(chips per slice, slices) from a Cloud TPU name: v4 and v5p count TensorCores (2 per chip)."""
  if name in SLICES:
    return SLICES[name]
  match = re.fullmatch(r"(?:multislice-(\d+)x-)?(v\d+[a-z]*)-(\d+)", name)
  assert match, f"meshes/{name}.gin: add its chip count to SLICES in this test"
  slices, generation, size = int(match.group(1) or 1), match.group(2), int(match.group(3))
  return (size // 2 if generation in ("v4", "v5p") else size), slices


@pytest.fixture(autouse=True)
def _clean_gin():
  # Bindings left behind would leak into tests that call configurables with their defaults.
  yield
  gin.clear_config()


def _count(abstract_params) -> int:
  return sum(math.prod(a.shape) for a in jax.tree.leaves(abstract_params))


def test_model_presets_match_the_gin_files():
  # A preset file without a name in PRESET_NAMES (or the reverse) could never be selected.
  files = {_stem(p) for p in _gin_files("models")} - {"presets"}
  assert files == set(transformer.PRESET_NAMES)


@pytest.mark.parametrize("name", transformer.PRESET_NAMES)
def test_model_preset_builds_abstract_model(name):
  # Through the macro, as `--gin.MODEL=125m` would arrive: a bare word, not a gin literal.
  config.setup("pretrain", macros={"MODEL": name})
  cfg = transformer.model_config()
  _, params, names = transformer.abstract_model(cfg)
  assert _count(params) == cfg.param_count()
  if name in PUBLISHED:
    assert cfg.param_count() == PUBLISHED[name]
  # Every parameter names one logical axis per dimension.
  jax.tree.map(lambda a, n: None if len(n) == a.ndim else pytest.fail(f"{n} vs {a.shape}"),
               params, names, is_leaf=lambda x: isinstance(x, tuple))


def test_flops_per_token_counts_the_head_the_model_computes():
  lm = transformer.ModelConfig(vocab_size=1000, d_model=64, num_layers=2, num_heads=4,
                               num_kv_heads=2, mlp_dim=128)
  scalar = dataclasses.replace(lm, head="scalar")
  with_lm_score = dataclasses.replace(scalar, lm_score=True)
  # 6 flops per parameter per token: the scalar head skips the 1000 x 64 vocab projection.
  assert lm.flops_per_token(32) - scalar.flops_per_token(32) == 6 * (1000 * 64 - 64)
  assert with_lm_score.flops_per_token(32) == lm.flops_per_token(32)  # it computes logits too


@pytest.mark.parametrize("path", _gin_files("meshes"), ids=_stem)
def test_mesh_file_fits_its_slice(path):
  config.setup("pretrain", gin_files=[path])
  shape = gin.query_parameter("%MESH_SHAPE")
  dcn_shape = gin.query_parameter("%MESH_DCN_SHAPE")
  name = _stem(path)
  if name == "cpu8":
    assert jax.device_count() == 8  # conftest.py
    mesh = parallel.make_mesh(shape, dcn_shape)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    return
  chips, slices = _slice_of(name)
  mesh = parallel.abstract_mesh(shape, chips)
  assert math.prod(mesh.axis_sizes) == chips
  if slices > 1:
    assert dcn_shape, f"{name}: a multi-slice mesh needs MESH_DCN_SHAPE"
    dcn = parallel.abstract_mesh(dcn_shape, slices)
    assert math.prod(dcn.axis_sizes) == slices
  else:
    assert not dcn_shape


def test_llama3_8b_is_sharded_on_v5p_512():
  config.setup("pretrain", gin_files=[os.path.join(GIN_DIR, "meshes", "v5p-512.gin")],
               macros={"MODEL": "llama3_8b"})
  mesh = parallel.abstract_mesh(gin.query_parameter("%MESH_SHAPE"), 256)
  _, params, names = transformer.abstract_model(transformer.model_config())
  rules = parallel.axis_rules()
  per_chip = total = 0
  for path, a in jax.tree_util.tree_leaves_with_path(params):
    n = names
    for key in path:
      n = n[key.key]
    spec = parallel.logical_to_spec(n, rules, mesh, a.shape)
    split = math.prod(
        math.prod(mesh.shape[ax] for ax in ((e,) if isinstance(e, str) else e))
        for e in spec if e is not None)
    where = jax.tree_util.keystr(path)
    if a.ndim >= 2:
      assert split > 1, f"{where} {a.shape} {n} is replicated"
    if a.size * a.dtype.itemsize > GiB:
      assert split >= 64, f"{where} is only split {split} ways"
    total += a.size * a.dtype.itemsize
    per_chip += a.size * a.dtype.itemsize // split
  # fp32 params spread over fsdp 64 (the data axis replicates): ~0.5 GiB of the 30 GiB per chip.
  assert per_chip <= total / 64 * 1.01


@pytest.mark.parametrize("path", _gin_files("stages"), ids=_stem)
def test_stage_file_parses(path):
  stage = _stem(path)
  if stage == "common":
    # Included by every stage file; parsing it again on top must also work.
    config.setup("pretrain", gin_files=[path])
  else:
    config.setup(stage)
  assert LoopConfig().train_steps > 0
  transformer.model_config()


@pytest.mark.parametrize("path", _gin_files("experiments"), ids=_stem)
def test_experiment_file_parses(path):
  config.setup("pretrain", gin_files=[path])
  LoopConfig()
  transformer.model_config()


def test_macro_value_reaches_its_configurable():
  config.setup("pretrain", macros={"TRAIN_STEPS": "7", "BATCH_SIZE": "4"})
  cfg = LoopConfig()
  assert (cfg.train_steps, cfg.batch_size) == (7, 4)
  assert isinstance(cfg.train_steps, int)


def test_bare_word_macro_is_a_string():
  config.setup("pretrain", macros={"MODEL": "tiny", "TRAIN_DATA": "/data/x.jsonl"})
  assert gin.query_parameter("%MODEL") == "tiny"
  assert gin.query_parameter("%TRAIN_DATA") == "/data/x.jsonl"
  assert transformer.model_config().vocab_size == 512


@pytest.mark.parametrize("value, expected", [
    ("3", 3), ("3e-4", 3e-4), ("True", True), ("None", None), ("'tiny'", "tiny"),
    ("{'data': 2, 'fsdp': -1}", {"data": 2, "fsdp": -1}), ("125m", "125m"), ("1b", "1b"),
])
def test_gin_literal(value, expected):
  gin.clear_config()
  gin.parse_config(f"SOME_MACRO = {config.gin_literal(value)}")
  assert gin.query_parameter("%SOME_MACRO") == expected


def test_every_stage_macro_has_a_type_and_range_check():
  for stage in ("pretrain", "sft", "reward", "dpo", "ppo", "grpo"):
    missing = set(config.stage_macros(stage)) - set(config.MACRO_CHECKS)
    assert not missing, f"{stage}: add these macros to config.MACRO_CHECKS: {sorted(missing)}"


@pytest.mark.parametrize("stage, macro, value, expected", [
    ("pretrain", "BATCH_SIZE", "abc", "BATCH_SIZE='abc': must be a whole number"),
    ("pretrain", "LEARNING_RATE", "fast", "LEARNING_RATE='fast': must be a number"),
    ("pretrain", "LEARNING_RATE", "-1e-3", "LEARNING_RATE=-0.001: must be at least 0"),
    ("pretrain", "TRAIN_STEPS", "ten", "TRAIN_STEPS='ten': must be a whole number"),
    ("pretrain", "TRAIN_STEPS", "3.5", "TRAIN_STEPS=3.5: must be a whole number"),
    ("pretrain", "TRAIN_STEPS", "0", "TRAIN_STEPS=0: must be at least 1"),
    ("pretrain", "WARMUP_STEPS", "-5", "WARMUP_STEPS=-5: must be at least 0"),
    ("pretrain", "HANG_TIMEOUT", "abc", "HANG_TIMEOUT='abc': must be a number"),
    ("pretrain", "MESH_SHAPE", "data", "MESH_SHAPE='data': must be a dict of mesh axis sizes"),
    ("pretrain", "MESH_SHAPE", "{'dp': 2}", "MESH_SHAPE={'dp': 2}: has an unknown axis 'dp'"),
    ("pretrain", "MESH_SHAPE", "{'fsdp': 0}", "axis 'fsdp' must be a positive whole number or -1"),
    ("pretrain", "CHECKPOINT_EVERY", "-1", "CHECKPOINT_EVERY=-1: must be at least 0"),
    ("reward", "LM_SCORE", "yes", "LM_SCORE='yes': must be True or False"),
    ("dpo", "DPO_LABEL_SMOOTHING", "0.5", "DPO_LABEL_SMOOTHING=0.5: must be below 0.5"),
    ("ppo", "GAMMA", "1.5", "GAMMA=1.5: must be at most 1"),
    ("ppo", "TEMPERATURE", "0", "TEMPERATURE=0: must be above 0"),
    ("grpo", "GROUP_SIZE", "0", "GROUP_SIZE=0: must be at least 1"),
    ("sft", "LORA_RANK", "-2", "LORA_RANK=-2: must be at least 0"),
    ("sft", "LORA_ALPHA", "0", "LORA_ALPHA=0: must be above 0"),
    ("sft", "LORA_TARGETS", "['q', 'x']", "LORA_TARGETS=['q', 'x']: must be a list of one or "
                                           "more (each once) of 'q', 'k', 'v', 'o', 'gate'"),
    ("dpo", "LORA_BASE_DTYPE", "bf16", "LORA_BASE_DTYPE='bf16': must be 'auto', 'float32', "
                                       "'bfloat16' or 'float16'"),
])
def test_a_bad_setting_is_one_line_naming_its_macro(stage, macro, value, expected):
  with pytest.raises(config.UserError) as e:
    config.setup(stage, macros={macro: value})
  assert expected in str(e.value) and "\n" not in str(e.value)


def test_zero_periods_and_a_long_warmup_are_accepted(capsys):
  from lmtrain.train import optim
  config.setup("pretrain", macros={"CHECKPOINT_EVERY": "0", "LOG_EVERY": "0", "EVAL_EVERY": "0",
                                   "TRAIN_STEPS": "20", "WARMUP_STEPS": "50"})
  assert (LoopConfig().checkpoint_every, LoopConfig().log_every) == (0, 0)
  schedule = optim.make_schedule(total_steps=20)
  assert ("WARMUP_STEPS=50 is not below the 20 steps of the schedule: the warmup is cut to 19 "
          "steps" in capsys.readouterr().out)
  assert float(schedule(19)) == pytest.approx(3e-3)  # the peak, at the last step


def test_later_bindings_override_earlier(tmp_path):
  first, second = tmp_path / "a.gin", tmp_path / "b.gin"
  first.write_text("TRAIN_STEPS = 5\nMODEL = 'small'\n")
  second.write_text("TRAIN_STEPS = 6\n")
  mesh_a = os.path.join(GIN_DIR, "meshes", "v4-8.gin")
  mesh_b = os.path.join(GIN_DIR, "meshes", "v5e-256.gin")
  config.setup("pretrain", gin_files=[str(first), str(second), mesh_a, mesh_b])
  assert LoopConfig().train_steps == 6
  assert gin.query_parameter("%MESH_SHAPE")["tensor"] == 4
  # Macros come after every file, and --gin_param bindings after the macros.
  config.setup("pretrain", gin_files=[str(first), str(second)],
               macros={"TRAIN_STEPS": "7", "MODEL": "tiny"})
  assert LoopConfig().train_steps == 7
  assert transformer.model_config().d_model == 64
  text = config.setup("pretrain", gin_files=[str(first)], macros={"TRAIN_STEPS": "7"},
                      params=["LoopConfig.train_steps = 9"])
  assert LoopConfig().train_steps == 9
  # The saved config text shows every source in order.
  assert text.index(str(first)) < text.index("TRAIN_STEPS = 7") < text.index("train_steps = 9")


def test_relative_gin_file_names_resolve(monkeypatch, caplog):
  # As given on the command line: relative to the cwd, or to gin_configs/.
  monkeypatch.chdir(os.path.dirname(GIN_DIR))
  config.setup("pretrain", gin_files=["gin_configs/meshes/v5e-256.gin"])
  assert gin.query_parameter("%MESH_SHAPE")["tensor"] == 4
  config.setup("pretrain", gin_files=["meshes/cpu8.gin"])
  assert gin.query_parameter("%MESH_SHAPE")["data"] == 2
  # Gin logs "Path not found" errors (on the CLI's stderr) when it probes its other search paths.
  assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
