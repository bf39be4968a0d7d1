"""Stages: each a small file of pure functions (loss, batch assembly) plus a `build` for the loop."""


def get_stage_builder(stage: str):
  if stage == "pretrain":
    from lmtrain.stages import pretrain
    return pretrain.build
  raise ValueError(f"unknown stage {stage!r}")
