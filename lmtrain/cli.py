"""`lmtrain` command line: subcommand -> gin configuration -> stage runner.

Exit codes: 0 done; 1 bad input or config (one line on stderr); 2 usage; 3 training diverged (last good
checkpoint kept); 143 SIGTERM after saving a checkpoint.
"""

import argparse
import json
import logging
import os
import sys

from lmtrain.stages import PIPELINE_DEFAULT, REGISTRY, STAGES


def _split_gin_macros(argv):
  """Pulls `--gin.NAME=VALUE` (or `--gin.NAME VALUE`) out of argv; argparse cannot express them."""
  macros, rest, i = {}, [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--gin.") and arg != "--gin.":
      name, eq, value = arg[len("--gin."):].partition("=")
      if not eq:
        if i + 1 >= len(argv):
          raise SystemExit(f"lmtrain: error: {arg} needs a value")
        value, i = argv[i + 1], i + 1
      macros[name] = value
    else:
      rest.append(arg)
    i += 1
  return macros, rest


# Flags people type from other trainers, and the macro that does it here.
_FLAG_ALIASES = {"max_steps": "TRAIN_STEPS", "steps": "TRAIN_STEPS", "num_steps": "TRAIN_STEPS",
                 "lr": "LEARNING_RATE", "learning_rate": "LEARNING_RATE", "seed": "SEED",
                 "batch_size": "BATCH_SIZE", "seq_len": "SEQ_LEN", "max_seq_len": "SEQ_LEN",
                 "model": "MODEL", "data": "TRAIN_DATA", "train_data": "TRAIN_DATA",
                 "init_from": "INIT_FROM", "tokenizer": "TOKENIZER", "warmup_steps": "WARMUP_STEPS"}


def _macro_help(stage: str) -> str:
  """The epilog of `lmtrain STAGE --help`: its macros and their defaults, from the gin files."""
  from lmtrain import config
  stages = PIPELINE_DEFAULT if stage == "pipeline" else (stage,)
  macros = {}
  for name in stages:
    macros.update(config.macro_defaults(name))
  width = max(map(len, macros))
  lines = [f"  --gin.{name:<{width}}  {value}" for name, value in sorted(macros.items())]
  return ("settings (gin macros; --gin.NAME=VALUE, defaults from gin_configs/stages/"
          f"{stage if stage != 'pipeline' else '*'}.gin):\n" + "\n".join(lines))


def _flag_hint(unknown: list[str], command) -> str:
  """For an unknown --flag of a training stage: the macro that likely does it."""
  if command not in STAGES + ("pipeline",):
    return ""
  from lmtrain import config
  import difflib
  known = set()
  for name in (PIPELINE_DEFAULT if command == "pipeline" else (command,)):
    known.update(config.macro_defaults(name))
  for arg in unknown:
    if not arg.startswith("--"):
      continue
    flag = arg[2:].partition("=")[0]
    macro = _FLAG_ALIASES.get(flag.lower())
    if macro not in known:
      close = difflib.get_close_matches(flag.upper(), sorted(known), n=1)
      macro = close[0] if close else None
    if macro:
      return f" (settings are gin macros: did you mean --gin.{macro}=...?)"
  return ""


def _parser(command=None, help_wanted=False):
  """The argument parser. The options of `plan` and `bench` (whose modules import jax) are added only
  when `command` is that subcommand, so `lmtrain --help` and usage errors answer at once; the stages'
  macro lists only when help is asked for."""
  from lmtrain import __version__
  parser = argparse.ArgumentParser(prog="lmtrain", description=__doc__.splitlines()[0])
  parser.add_argument("--version", action="version", version=f"lmtrain {__version__}")
  sub = parser.add_subparsers(dest="command", required=True)
  for stage in STAGES + ("pipeline",):
    p = sub.add_parser(stage, help=f"run the {stage} stage (resumes from DIR/{stage})"
                       if stage != "pipeline" else "run the stages in order, each resuming",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=_macro_help(stage) if help_wanted and command == stage else None)
    p.add_argument("--workdir", required=True)
    p.add_argument("--print_config", action="store_true",
                   help="print the configuration the run would use (every binding) and exit")
    if stage == "pipeline":
      p.add_argument("--stages", default=",".join(PIPELINE_DEFAULT),
                     help="comma-separated stages to chain, in order")
    p.add_argument("--gin_file", action="append", default=[])
    p.add_argument("--gin_param", action="append", default=[])
    p.add_argument("--allow_config_change", action="store_true",
                   help="resume although TRAIN_DATA, BATCH_SIZE, SEQ_LEN, the model or the "
                        "tokenizer differ from the checkpoints' (recorded in lineage.json)")
    p.add_argument("--coordinator_address", help="multi-process runs off TPU: host:port of process 0")
    p.add_argument("--num_processes", type=int)
    p.add_argument("--process_id", type=int)
  p = sub.add_parser("tokenizer", help="train a sentencepiece tokenizer")
  p.add_argument("--input", action="append", required=True, help="text/JSONL file (repeatable)")
  p.add_argument("--vocab_size", type=int, required=True)
  p.add_argument("--output", required=True, help="path of the .model file to write")
  p = sub.add_parser(
      "prepare", help="tokenize a corpus into token shards + manifest (Apache Beam); "
      "options this command does not know go to the Beam pipeline (e.g. --project, --region, "
      "--temp_location, --max_num_workers for Dataflow)")
  p.add_argument("--input", action="append", required=True,
                 help="text/JSONL(.gz/.zst)/array_record file, glob, gs:// URL or seqio:NAME "
                      "(repeatable)")
  p.add_argument("--tokenizer", required=True, help="sentencepiece .model (local or gs://)")
  p.add_argument("--output", required=True, help="directory to write (local or gs://)")
  p.add_argument("--name", help="the corpus's name in its manifest (default: the directory name)")
  p.add_argument("--runner", default="DirectRunner",
                 help="Beam runner: DirectRunner (this machine), DataflowRunner, FlinkRunner, "
                      "SparkRunner")
  p.add_argument("--num_workers", type=int,
                 help="DirectRunner worker processes (default: one per core)")
  p.add_argument("--num_shards", type=int, help="default: about one per 256 MB of input text")
  p.add_argument("--skip_bad_records", action="store_true",
                 help="leave bad records out and count them, instead of stopping at the first")
  p = sub.add_parser("sample", help="print completions from a stage's latest checkpoint")
  from lmtrain import sample
  sample.add_arguments(p)
  from lmtrain import convert
  convert.add_arguments(sub)
  from lmtrain.feedback import candidates, label
  candidates.add_arguments(sub)
  label.add_arguments(sub)
  p = sub.add_parser("report", help="plots and a markdown summary of a work dir's stages")
  from lmtrain import report
  report.add_arguments(p)
  p = sub.add_parser("plan", help="memory per device, fit, FLOPs, time and cost of a run")
  if command == "plan":
    from lmtrain import plan
    plan.add_arguments(p)
  p = sub.add_parser("bench", help="print throughput, MFU, memory and compile-time figures")
  if command == "bench":
    from lmtrain import bench
    bench.add_arguments(p)
  return parser


def run_stage(stage: str, args, macros, skip_unknown_macros=False) -> dict:
  """Configures and runs one stage. Bindings scoped `STAGE/...` (e.g. `sft/LoopConfig.train_steps`)
  apply to that stage only, so one gin file can configure a whole pipeline."""
  import gin
  from lmtrain import config
  config_text = config.setup(stage, args.gin_file, macros, args.gin_param, skip_unknown_macros)
  if args.print_config:
    print(f"# lmtrain {stage}: the configuration (every gin binding and macro)\n"
          + gin.config_str())
    return {"stage": stage, "note": "--print_config: nothing run"}
  from lmtrain.model import transformer
  from lmtrain.stages import get_stage_builder
  from lmtrain.train import loop
  with gin.config_scope(stage):
    model_cfg = config.call(transformer.model_config, "model_config")
    loop_cfg = config.call(loop.LoopConfig, "LoopConfig")
    stage_obj = config.call(get_stage_builder(stage), stage, args.workdir, model_cfg, loop_cfg)
    return loop.train(stage_obj, args.workdir, loop_cfg, config_text,
                      allow_config_change=args.allow_config_change)


# What the closing table shows of each stage, besides wall time and checkpoint.
def run_pipeline(args, macros) -> list[dict]:
  from lmtrain import config
  from lmtrain.errors import UserError
  stages = [s.strip() for s in args.stages.split(",") if s.strip()]
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    raise UserError(f"--stages: unknown stage(s) {unknown}; the stages are {', '.join(STAGES)}")
  known = set()
  for stage in stages:
    known.update(config.stage_macros(stage))
  for name in macros:
    if name not in known:
      import difflib
      close = difflib.get_close_matches(name, sorted(known), n=3)
      raise UserError(f"--gin.{name}: no stage of the pipeline defines this macro"
                      + (f"; did you mean {', '.join(close)}?" if close else ""))
  summaries = []
  for stage in stages:
    summaries.append(run_stage(stage, args, macros, skip_unknown_macros=True))
    print_summary(summaries[-1])
  return summaries


def print_pipeline_table(summaries: list[dict]):
  import jax
  if jax.process_index() != 0:
    return
  print("\npipeline summary")
  for s in summaries:
    spec = REGISTRY.get(s["stage"])
    facts = [f"{k}={s[k]:.4g}" for k in (spec.key_metrics if spec else ("loss",))
             if isinstance(s.get(k), (int, float))]
    wall = s.get("wall_time", 0.0)
    print(f"  {s['stage']:<9} steps={s.get('steps')}  {'  '.join(facts)}  wall={wall:.0f}s  "
          f"checkpoint={s['checkpoint']}")


def print_summary(summary: dict):
  import jax
  if jax.process_index() != 0:
    return
  width = max(len(k) for k in summary)
  print(f"\n{'-' * (width + 30)}")
  for key, value in summary.items():
    shown = f"{value:,.4f}" if isinstance(value, float) else str(value)
    print(f"{key:<{width}}  {shown}")
  print(f"{'-' * (width + 30)}")


def run_prepare(args, beam_args):
  import time
  from lmtrain.data import prepare
  if args.runner == "DirectRunner":
    if any(a.startswith("--direct_") for a in beam_args):
      pipeline_args = ["--runner=DirectRunner", *beam_args]
    else:
      pipeline_args = prepare.direct_runner_args(args.num_workers) + beam_args
  else:
    pipeline_args = [f"--runner={args.runner}", *beam_args]
  start = time.time()
  manifest = prepare.prepare(args.input, args.tokenizer, args.output, name=args.name,
                             num_shards=args.num_shards,
                             on_error="skip" if args.skip_bad_records else "raise",
                             pipeline_args=pipeline_args)
  seconds = time.time() - start
  print(json.dumps({"output": args.output, "documents": manifest["documents"],
                    "tokens": manifest["tokens"], "shards": len(manifest["shards"]),
                    "bad_records": manifest["bad_records"], "seconds": round(seconds, 2),
                    "tokens_per_sec": round(manifest["tokens"] / max(seconds, 1e-9))}))


def command():
  """The `lmtrain` command (and `python -m lmtrain.cli`): `main` on the process's own arguments,
  the process first executed once more under glibc's huge-page malloc where JAX runs on the CPU
  (lmtrain/malloc.py). A call from Python (`main(argv)`) runs in its caller's process as it is."""
  from lmtrain import malloc
  malloc.reexec_with_hugepages()
  main()


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  from lmtrain.errors import DivergedError, Preempted, UserError
  try:
    macros, rest = _split_gin_macros(argv)
    command = next((a for a in rest if not a.startswith("-")), None)
    parser = _parser(command, help_wanted=any(a in ("-h", "--help") for a in rest))
    args, beam_args = parser.parse_known_args(rest)
    if beam_args and args.command != "prepare":
      parser.error(f"unrecognized arguments: {' '.join(beam_args)}"
                   + _flag_hint(beam_args, args.command))
    training = args.command in STAGES + ("pipeline",)
    if not os.environ.get("LMTRAIN_VERBOSE"):
      # orbax logs through absl: "directory is read only" on each read, and a traceback per array
      # fragment of a failed write, which the one-line errors already say.
      logging.getLogger("absl").setLevel(logging.CRITICAL)
      from lmtrain import quiet
      quiet.install()
    if macros and not training:
      raise UserError(f"--gin.{next(iter(macros))}: gin macros apply to the training stages only")
    if training or args.command == "candidates":
      from lmtrain import parallel
      parallel.maybe_initialize_distributed(args.coordinator_address, args.num_processes,
                                            args.process_id)
    if args.command in STAGES:
      print_summary(run_stage(args.command, args, macros))
    elif args.command == "pipeline":
      print_pipeline_table(run_pipeline(args, macros))
    elif args.command == "tokenizer":
      from lmtrain.data import tokenizer
      path = tokenizer.train_tokenizer(args.input, args.vocab_size, args.output)
      tok = tokenizer.Tokenizer.load(path)
      print(json.dumps({"output": path, "vocab_size": tok.vocab_size, "pad_id": tok.pad_id,
                        "eos_id": tok.eos_id, "bos_id": tok.bos_id, "unk_id": tok.unk_id}))
    elif args.command == "prepare":
      run_prepare(args, beam_args)
    elif args.command == "sample":
      from lmtrain import sample
      sample.run(args)
    elif args.command == "convert":
      from lmtrain import convert
      convert.run(args)
    elif args.command == "candidates":
      from lmtrain.feedback import candidates
      candidates.run(args)
    elif args.command == "label":
      from lmtrain.feedback import label
      label.run(args)
    elif args.command == "report":
      from lmtrain import report
      report.run(args)
    elif args.command == "plan":
      from lmtrain import plan
      plan.run(args)
    elif args.command == "bench":
      from lmtrain import bench
      bench.run(args)
  except (UserError, DivergedError, Preempted) as e:
    # First line only: gin appends "In call to configurable ..." to errors raised inside one.
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    from lmtrain import quiet
    print(f"lmtrain: error: {message}" if not isinstance(e, Preempted) else f"lmtrain: {message}",
          file=quiet.stderr())
    quiet.stderr().flush()
    sys.stdout.flush()
    if getattr(e, "exit_at_once", False):  # nothing left to clean up; threads still printing
      os._exit(e.exit_code)
    raise SystemExit(e.exit_code)
  except KeyboardInterrupt:
    raise SystemExit(130)


if __name__ == "__main__":
  command()
