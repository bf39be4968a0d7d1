"""Cloud TPU VM tooling for lmtrain: create, setup, run on every worker, logs, status, stop, delete."""
