"""What the CLI keeps off the terminal: the noise of libraries whose errors it reports itself."""

import sys
import threading


class ForeignThreadFilter:
  """sys.stderr, less what threads that Python did not start write to it. After a failed
  checkpoint write (a full disk), tensorstore completes the write's other fragments on its own C++
  threads, whose callbacks find orbax's event loop already closed; each prints a traceback ("Event
  loop is closed") there, past sys.excepthook, dozens of them interleaved. The failure itself is
  reported in one line (checkpoint.CheckpointSaveError). The main thread's and every Python
  thread's output (the progress bar, warnings, logging) passes through as written."""

  def __init__(self, stream):
    self._stream = stream

  def write(self, text):
    if isinstance(threading.current_thread(), threading._DummyThread):  # pylint: disable=protected-access
      return len(text)
    return self._stream.write(text)

  def flush(self):
    self._stream.flush()

  def __getattr__(self, name):
    return getattr(self._stream, name)


def install():
  if not isinstance(sys.stderr, ForeignThreadFilter):
    sys.stderr = ForeignThreadFilter(sys.stderr)


def stderr():
  """The terminal's stream itself, for the CLI's own error line."""
  return sys.stderr._stream if isinstance(sys.stderr, ForeignThreadFilter) else sys.stderr  # pylint: disable=protected-access
