"""lmtrain: one sharded substrate for pre-training, SFT and RLHF of decoder-only language models."""

__version__ = "0.1.0"
