"""Stages: each a small file of pure functions (loss, batch assembly) plus a `build` for the loop.

The registry below is the one list of stages: the CLI's commands and the pipeline, `lmtrain report`
and `lmtrain sample` read it. It is plain data (no stage module is imported to read it).
"""

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class StageSpec:
  name: str
  parent: str | None  # the stage it starts from unless INIT_FROM says otherwise
  chat: bool  # its model takes chat turns (`lmtrain sample`'s default), not raw text
  key_metrics: tuple[str, ...]  # the closing table's figures
  # Panels of its own report figure: (title, keys on the left axis, keys on a right axis with its
  # own scale). A panel is drawn when any of its keys is logged; eval_* keys are drawn as points.
  # A key ending in "*" stands for every logged key it starts (the per-task scores of demo data).
  panels: tuple = ()


_RL_PANELS = (
    ("reward", ("reward_mean",), ()),
    ("kl", ("kl",), ("kl_coef",)),
    ("task score", ("task_score", "eval_task_score"), ()),
    ("held-out task score per task", ("eval_task_score_*",), ()),
    ("entropy", ("entropy",), ()),
    ("clip fraction", ("clipfrac",), ()),
    ("approx kl", ("approx_kl",), ()),
    ("losses", ("policy_loss",), ("value_loss",)),
    ("explained variance", ("explained_variance",), ()),
    ("response length", ("response_length",), ()),
)

REGISTRY = {spec.name: spec for spec in (
    StageSpec("pretrain", None, chat=False,
              key_metrics=("loss", "unigram_perplexity", "eval_perplexity")),
    StageSpec("sft", "pretrain", chat=True,
              key_metrics=("loss", "initial_eval_exact_match", "eval_exact_match",
                           "eval_perplexity"),
              panels=(("exact match", ("eval_exact_match",), ()),
                      ("exact match per task", ("eval_exact_match_*",), ()),
                      ("perplexity", ("eval_perplexity",), ()))),
    StageSpec("reward", "sft", chat=True,
              key_metrics=("loss", "eval_accuracy", "eval_margin", "reward_offset",
                           "reward_scale"),
              panels=(("accuracy", ("accuracy", "eval_accuracy"), ()),
                      ("margin", ("margin", "eval_margin"), ()))),
    StageSpec("ppo", "sft", chat=True,
              key_metrics=("initial_eval_task_score", "eval_task_score", "eval_reward_mean", "kl",
                           "kl_bound"),
              panels=_RL_PANELS),
    StageSpec("grpo", "sft", chat=True,
              key_metrics=("initial_eval_task_score", "eval_task_score", "reward_mean", "kl",
                           "kl_bound"),
              panels=_RL_PANELS),
    StageSpec("dpo", "sft", chat=True,
              key_metrics=("loss", "eval_reward_accuracy", "eval_margin"),
              panels=(("reward accuracy", ("reward_accuracy", "eval_reward_accuracy"), ()),
                      ("margin", ("margin", "eval_margin"), ()),
                      ("rewards", ("chosen_reward", "rejected_reward"), ()))),
)}

STAGES = tuple(REGISTRY)  # in chain order
PIPELINE_DEFAULT = ("pretrain", "sft", "reward", "ppo")  # what `lmtrain pipeline` runs


def get_stage_builder(stage: str):
  if stage not in REGISTRY:
    raise ValueError(f"unknown stage {stage!r}")
  return importlib.import_module(f"lmtrain.stages.{stage}").build
