"""Gin set-up: the stage's base file, then the user's files, then --gin.MACRO and --gin_param bindings.

Every stage file in gin_configs/stages/ includes common.gin, which defines the macros (the README's gin
reference) with defaults that run the embedded demo. Unknown names fail with the closest known names.
"""

import difflib
import inspect
import os
import re
import tokenize

import gin
import gin.config
import gin.config_parser

from lmtrain.errors import UserError

def _gin_dir() -> str:
  """The repository's gin_configs/ (source checkout, editable install) or the copy in the wheel."""
  package = os.path.dirname(os.path.abspath(__file__))
  for candidate in (os.path.join(os.path.dirname(package), "gin_configs"),
                    os.path.join(package, "gin_configs")):
    if os.path.isdir(os.path.join(candidate, "stages")):
      return candidate
  raise RuntimeError(f"lmtrain's gin_configs/ is missing beside {package}")


GIN_DIR = _gin_dir()


def _known_macros() -> list[str]:
  return sorted(name for name, selector in gin.config._CONFIG.keys() if selector == "gin.macro")


def _configurable_names() -> list[str]:
  names = set()
  # Every registered selector (matching_selectors("") matches none), with each of its suffixes.
  for selector, _ in gin.config._REGISTRY.items():
    parts = selector.split(".")
    names.update(".".join(parts[i:]) for i in range(len(parts)))
  return sorted(names)


def _explain_gin_error(e: Exception, where: str) -> UserError:
  first = str(e).splitlines()[0] if str(e) else type(e).__name__
  match = re.search(r"No configurable matching '([^']+)'", first)
  if match:
    close = difflib.get_close_matches(match.group(1), _configurable_names(), n=3)
    return UserError(f"{where}: unknown gin configurable '{match.group(1)}'"
                     + (f"; did you mean {', '.join(close)}?" if close else ""))
  match = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", first)
  if match:
    params = []
    found = gin.config._REGISTRY.get_match(match.group(1))
    if found is not None:
      params = list(inspect.signature(found.wrapped).parameters)
    close = difflib.get_close_matches(match.group(2), params, n=3)
    return UserError(f"{where}: '{match.group(1)}' has no parameter '{match.group(2)}'"
                     + (f"; did you mean {', '.join(close)}?" if close else ""))
  return UserError(f"{where}: {first}")


def gin_literal(value: str) -> str:
  """The gin text for a --gin.NAME=VALUE value: a literal as written, or else a quoted string, so
  `--gin.MODEL=tiny` and `--gin.TRAIN_DATA=/data/x.jsonl` need no shell-escaped quotes."""
  try:
    parser = gin.config_parser.ConfigParser(value, gin.config.ParserDelegate())
    parser.parse_value()
  except Exception:
    return repr(value)
  # parse_value stops after a leading literal: `125m` must be the string, not 125 then junk.
  whole = parser.current_token.type in (tokenize.NEWLINE, tokenize.ENDMARKER)
  return value if whole else repr(value)


# Settings: the type and range of every macro the stage files define, checked once the bindings are
# parsed, before anything is loaded or compiled, so a wrong value is one line naming its macro.

def _integer(minimum):
  def check(v):
    if isinstance(v, bool) or not isinstance(v, int):
      return "must be a whole number"
    return None if v >= minimum else f"must be at least {minimum}"
  return check


def _number(low=None, high=None, above=None, below=None):
  def check(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      return "must be a number"
    if v != v:  # NaN
      return "must be a number"
    if low is not None and v < low:
      return f"must be at least {low}"
    if above is not None and v <= above:
      return f"must be above {above}"
    if high is not None and v > high:
      return f"must be at most {high}"
    if below is not None and v >= below:
      return f"must be below {below}"
    return None
  return check


def _optional(check):
  return lambda v: None if v is None else check(v)


def _text(v):
  return None if isinstance(v, str) else "must be a string"


def _dtype(v):
  if v in ("auto", "float32", "bfloat16", "float16"):
    return None
  return "must be 'auto', 'float32', 'bfloat16' or 'float16'"


def _flag(v):
  return None if isinstance(v, bool) else "must be True or False"


def _mesh_shape(v):
  if not isinstance(v, dict) or not v:
    return "must be a dict of mesh axis sizes, e.g. {'data': 1, 'fsdp': -1, 'tensor': 1}"
  for axis, size in v.items():
    if axis not in ("data", "fsdp", "tensor"):
      return f"has an unknown axis {axis!r} (the axes are data, fsdp, tensor)"
    if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
      return f"axis {axis!r} must be a positive whole number or -1 (the rest of the devices)"
  return None


def _trainable(v):
  if v == "all" or (isinstance(v, (list, tuple)) and v and all(isinstance(p, str) for p in v)):
    return None
  return ("must be 'all' or a list of regular expressions over parameter paths, e.g. "
          "['final_norm/.*', 'lm_head']")


def _lora_targets(v):
  from lmtrain.model.transformer import LORA_TARGETS
  if (isinstance(v, (list, tuple)) and v and all(t in LORA_TARGETS for t in v)
      and len(set(v)) == len(v)):
    return None
  return f"must be a list of one or more (each once) of {', '.join(map(repr, LORA_TARGETS))}"


_POSITIVE, _COUNT = _integer(1), _integer(0)
MACRO_CHECKS = {
    # The loop (common.gin).
    "TRAIN_STEPS": _POSITIVE, "BATCH_SIZE": _POSITIVE, "SEQ_LEN": _integer(2), "SEED": _COUNT,
    "CHECKPOINT_EVERY": _COUNT, "EVAL_EVERY": _COUNT, "LOG_EVERY": _COUNT,  # 0: only at the end
    "EVAL_STEPS": _POSITIVE, "MICROBATCHES": _POSITIVE, "WARMUP_STEPS": _COUNT,
    "LEARNING_RATE": _number(low=0), "HANG_TIMEOUT": _optional(_number(above=0)),
    "MESH_SHAPE": _mesh_shape, "MESH_DCN_SHAPE": _optional(_mesh_shape),
    "MODEL": _text, "TOKENIZER": _text, "TRAIN_DATA": _text, "EVAL_DATA": _optional(_text),
    "INIT_FROM": _optional(_text), "TRAINABLE": _trainable,
    "TRAINABLE_LAYERS": _optional(_POSITIVE),  # at most the model's layers: LossStep checks
    "LORA_RANK": _COUNT, "LORA_ALPHA": _number(above=0), "LORA_TARGETS": _lora_targets,
    "LORA_DROPOUT": _number(low=0, below=1), "LORA_BASE_DTYPE": _dtype,
    # The reward model and DPO.
    "LM_SCORE": _flag, "NORMALIZATION": _text, "DPO_BETA": _number(above=0),
    "DPO_LABEL_SMOOTHING": _number(low=0, below=0.5),
    # PPO and GRPO (rl.gin).
    "PROMPT_LEN": _POSITIVE, "MAX_NEW_TOKENS": _POSITIVE, "TEMPERATURE": _number(above=0),
    "GROUP_SIZE": _POSITIVE, "NUM_MINIBATCHES": _POSITIVE, "PPO_EPOCHS": _POSITIVE,
    "CLIP_EPS": _number(above=0), "KL_COEF": _number(low=0), "KL_TARGET": _optional(_number(above=0)),
    "KL_CLIP": _optional(_number(above=0)), "REWARD_CLIP": _optional(_number(above=0)),
    "KL_BOUND": _number(above=0), "GAMMA": _number(low=0, high=1), "LAM": _number(low=0, high=1),
    "VF_COEF": _number(low=0), "ENTROPY_COEF": _number(), "MISSING_EOS_PENALTY": _number(),
    "PTX_COEF": _number(low=0), "PTX_DATA": _optional(_text),
    "VALUE_LEARNING_RATE": _optional(_number(above=0)),
    "VALUE_CLIP_NORM": _optional(_number(above=0)),
    "KL_ESTIMATOR": _text, "LOSS_AGGREGATION": _text, "ADVANTAGE_ESTIMATOR": _optional(_text),
    "ROLLOUT_DTYPE": _text, "FROZEN_DTYPE": _text, "REWARD": _text, "REWARD_FROM": _optional(_text),
    "SCORER": _optional(_text),
}


def check_macros():
  """Checks the parsed macros' types and ranges (MACRO_CHECKS): UserError naming the first bad one.
  A macro bound to a configurable reference (@name) is left to that configurable."""
  for name in _known_macros():
    check = MACRO_CHECKS.get(name)
    if check is None:
      continue
    value = gin.query_parameter(f"%{name}")
    if isinstance(value, gin.config.ConfigurableReference):
      continue
    problem = check(value)
    if problem:
      raise UserError(f"{name}={value!r}: {problem}")


def register_configurables(stage: str):
  """Imports the modules whose configurables gin files name (gin needs them registered): every
  stage's, since one pipeline file configures them all."""
  del stage
  import importlib
  from lmtrain.stages import STAGES
  for module in ("lmtrain.parallel", "lmtrain.model.transformer", "lmtrain.train.loop",
                 "lmtrain.train.optim", "lmtrain.train.checkpoint",
                 *(f"lmtrain.stages.{s}" for s in STAGES)):
    importlib.import_module(module)


def setup(stage: str, gin_files=(), macros: dict | None = None, params=(),
          skip_unknown_macros: bool = False) -> str:
  """Parses the configuration for `stage`; returns the full config text (saved with the run).
  skip_unknown_macros: ignore macros this stage does not define (the pipeline passes every
  stage's macros to each stage; it checks that each is known to one of them)."""
  register_configurables(stage)
  gin.clear_config()
  if GIN_DIR not in gin.config._LOCATION_PREFIXES:
    # First, so `include 'models/x.gin'` resolves here before gin tries (and logs) other readers.
    gin.config._LOCATION_PREFIXES.insert(0, GIN_DIR)
  base = os.path.join(GIN_DIR, "stages", f"{stage}.gin")
  text_parts = []
  for path in [base, *gin_files]:
    resolved = path if os.path.exists(path) else os.path.join(GIN_DIR, path)
    if not os.path.exists(resolved):
      raise UserError(f"--gin_file {path}: no such file (also looked in {GIN_DIR})")
    try:
      # Absolute, so gin does not try (and log an error for) its other search prefixes first.
      gin.parse_config_file(os.path.abspath(resolved))
    except (ValueError, SyntaxError, TypeError, OSError) as e:
      raise _explain_gin_error(e, resolved) from None
    with open(resolved) as f:
      text_parts.append(f"# --- {resolved}\n{f.read()}")
  known = _known_macros()
  bindings = []
  for name, value in (macros or {}).items():
    if name not in known and skip_unknown_macros:
      continue
    if name not in known:
      close = difflib.get_close_matches(name, known, n=3)
      raise UserError(f"--gin.{name}: unknown macro" +
                      (f"; did you mean {', '.join(close)}?" if close else
                       f"; known macros: {', '.join(known)}"))
    bindings.append(f"{name} = {gin_literal(value)}")
  bindings.extend(params)
  for binding in bindings:
    try:
      gin.parse_config(binding)
    except (ValueError, SyntaxError, TypeError) as e:
      raise _explain_gin_error(e, f"--gin_param {binding!r}") from None
  if bindings:
    text_parts.append("# --- command line\n" + "\n".join(bindings))
  check_macros()
  gin.finalize()
  return "\n\n".join(text_parts) + "\n"


_MACRO_LINE = re.compile(r"^([A-Z][A-Z0-9_]*)\s*=\s*(.+?)\s*(#.*)?$")
_INCLUDE_LINE = re.compile(r"^include\s+'([^']+)'")


def macro_defaults(stage: str) -> dict[str, str]:
  """{MACRO: its default as written} of `stage`'s gin files (read as text, following includes; a
  later definition wins, as in gin), for `lmtrain STAGE --help`: no gin parse, no jax."""
  out = {}

  def read(path):
    with open(os.path.join(GIN_DIR, path)) as f:
      for line in f:
        include = _INCLUDE_LINE.match(line)
        if include and not include.group(1).startswith("models/"):
          read(include.group(1))
        match = _MACRO_LINE.match(line)
        if match:
          out[match.group(1)] = match.group(2)

  read(os.path.join("stages", f"{stage}.gin"))
  return out


def stage_macros(stage: str) -> list[str]:
  """The macros that `stage`'s base configuration defines."""
  setup(stage)
  return _known_macros()


def call(fn, where: str, *args, **kwargs):
  """Calls a gin configurable, turning gin's missing-value errors into one-line UserErrors."""
  try:
    return fn(*args, **kwargs)
  except TypeError as e:
    if "No values supplied by Gin" in str(e) or "REQUIRED" in str(e):
      raise UserError(f"{where}: {str(e).splitlines()[0]}") from None
    raise


def preset_config(preset: str):
  """The ModelConfig of model preset `preset` (gin_configs/models/), outside any run."""
  from lmtrain.model import transformer
  setup("pretrain", macros={"MODEL": preset})
  return transformer.model_config()
