"""User-facing errors: the CLI prints them as one line on stderr and exits with the given code."""


class UserError(Exception):
  """Bad input or configuration. The message names the file, line or setting at fault."""

  exit_code = 1


class DivergedError(Exception):
  """Training produced a NaN/Inf loss; the last good checkpoint is kept."""

  exit_code = 3
