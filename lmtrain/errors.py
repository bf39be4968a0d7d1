"""User-facing errors: the CLI prints them as one line on stderr and exits with the given code."""

import signal


class UserError(Exception):
  """Bad input or configuration. The message names the file, line or setting at fault."""

  exit_code = 1


class DivergedError(Exception):
  """Training produced a NaN/Inf loss; the last good checkpoint is kept."""

  exit_code = 3


class Preempted(Exception):
  """SIGTERM (or Ctrl-C) arrived; a checkpoint was saved. The CLI exits 128 + the signal's number:
  143 for SIGTERM, 130 for SIGINT."""

  def __init__(self, message: str, signum: int = signal.SIGTERM):
    super().__init__(message)
    self.exit_code = 128 + int(signum)
