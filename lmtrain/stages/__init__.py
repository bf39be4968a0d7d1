"""Stages: each a small file of pure functions (loss, batch assembly) plus a `build` for the loop."""

import importlib

STAGES = ("pretrain", "sft", "reward", "ppo", "grpo", "dpo")


def get_stage_builder(stage: str):
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}")
  return importlib.import_module(f"lmtrain.stages.{stage}").build
