"""Stop requests from SIGINT (Ctrl-C) and SIGTERM (preemption): the first sets a flag that the
training loop polls (it checkpoints and returns); a second exits at once."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Callable, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
  """Training stopped on a signal after saving a checkpoint.

  Attributes: ``signum`` (the signal), ``step`` (the checkpointed step), ``directory``
  (where the checkpoint is).
  """

  def __init__(self, signum: int, step: int, directory: str):
    self.signum, self.step, self.directory = signum, step, directory
    name = signal.Signals(signum).name
    super().__init__(
        f"{name}: stopped at step {step}; checkpoint saved in {directory}. Run the same command "
        "again to resume." if step else f"{name}: stopped before the first step; nothing saved.")

  @property
  def exit_code(self) -> int:
    """The shell's code for death by this signal: 128 + signal number."""
    return 128 + self.signum


class StopRequest:
  """A context manager that turns SIGINT/SIGTERM into a flag (``requested``, ``signum``).

  Handlers are installed only from the main thread (elsewhere the flag is never set) and the
  previous ones are restored on exit. A second signal while a stop is pending prints a line and
  exits the process immediately with ``128 + signum`` (nothing more is saved).
  """

  def __init__(self, say: Callable[[str], None] = print,
               exit_now: Callable[[int], Any] = os._exit):  # pylint: disable=protected-access
    self.signum: Optional[int] = None
    self._say = say
    self._exit_now = exit_now
    self._previous: dict[int, Any] = {}

  @property
  def requested(self) -> bool:
    """Whether a stop signal arrived."""
    return self.signum is not None

  def handle(self, signum: int, frame: Any = None) -> None:  # pylint: disable=unused-argument
    """The signal handler: records the first signal; exits on the second."""
    name = signal.Signals(signum).name
    if self.signum is None:
      self.signum = signum
      self._say(f"\n{name} received: saving a checkpoint and stopping (send it again to exit "
                "at once, without saving).")
      return
    self._say(f"\n{name} received again: exiting now without saving.")
    sys.stdout.flush()
    self._exit_now(128 + signum)

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():
      for signum in SIGNALS:
        self._previous[signum] = signal.signal(signum, self.handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous.clear()
