"""Progress that tells the truth: completed steps (the reporter is told a step only after the
caller synchronised on it), rates from completed work, ETA, an evaluation line, human units."""

from __future__ import annotations

import math
import sys
import time
from typing import Callable, Optional, TextIO


def format_bytes(n: Optional[float]) -> str:
  """``1536 -> "1.5 KiB"``, ``3 * 2**30 -> "3.0 GiB"`` (binary units); None -> ``"n/a"``."""
  if n is None:
    return "n/a"
  value = float(n)
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(value) < 1024 or unit == "TiB":
      return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
    value /= 1024
  raise AssertionError("unreachable")


def format_duration(seconds: Optional[float]) -> str:
  """``42.3 -> "42 s"``, ``150 -> "2.5 min"``, ``5400 -> "1 h 30 min"``; None -> ``"?"``."""
  if seconds is None or not math.isfinite(seconds):
    return "?"
  if seconds < 10:
    return f"{seconds:.1f} s"
  if seconds < 90:
    return f"{seconds:.0f} s"
  if seconds < 3600:
    return f"{seconds / 60:.1f} min"
  hours, rest = divmod(int(round(seconds)), 3600)
  return f"{hours} h {rest // 60:02d} min"


def format_rate(steps_per_second: Optional[float]) -> str:
  """``"2.35 steps/s"``, or ``"14.2 s/step"`` below one step per second; None -> ``"rate n/a"``."""
  if not steps_per_second:
    return "rate n/a"
  if steps_per_second >= 1:
    return f"{steps_per_second:.2f} steps/s"
  return f"{1 / steps_per_second:.1f} s/step"


class ProgressReporter:
  """One live line on a terminal (rewritten in place), or a line every ``interval`` seconds
  elsewhere (log files). ``enabled=False`` prints nothing (other processes than the first);
  ``show_progress=False`` keeps the permanent messages but no progress lines.

  ``train(step, loss=..., accuracy=...)`` is called with a step the device has *completed*;
  the rate is (completed steps since ``start``) / (time since ``start``).
  """

  def __init__(self, name: str, total_steps: int, *, enabled: bool = True,
               show_progress: bool = True, stream: Optional[TextIO] = None,
               interval: Optional[float] = None,
               clock: Callable[[], float] = time.perf_counter):
    self.name = name
    self.total_steps = total_steps
    self.enabled = enabled
    self.show_progress = enabled and show_progress
    self._stream = stream or sys.stdout
    self._live = bool(getattr(self._stream, "isatty", lambda: False)())
    self.interval = interval if interval is not None else (1.0 if self._live else 30.0)
    self._clock = clock
    self._start_step = 0
    self._start_time = clock()
    self._last_shown = -float("inf")
    self._line_open = False

  def start(self, step: int) -> None:
    """Starts timing at ``step`` (the first step this process runs from)."""
    self._start_step, self._start_time = step, self._clock()

  def due(self) -> bool:
    """Whether a refresh is due (the caller then synchronises and calls ``train``)."""
    return self.show_progress and self._clock() - self._last_shown >= self.interval

  def rate(self, step: int) -> Optional[float]:
    """Completed steps per second since ``start``; None before any step completed."""
    elapsed = self._clock() - self._start_time
    done = step - self._start_step
    return done / elapsed if done > 0 and elapsed > 0 else None

  def train_line(self, step: int, **metrics: float) -> str:
    """``"listops 120/200 (60%) | 2.31 steps/s | ETA 35 s | loss 1.2345 accuracy 0.4"``."""
    rate = self.rate(step)
    eta = (self.total_steps - step) / rate if rate else None
    percent = 100 * step / max(self.total_steps, 1)
    parts = [f"{self.name} {step}/{self.total_steps} ({percent:.0f}%)", format_rate(rate),
             f"ETA {format_duration(eta)}"]
    if metrics:
      parts.append(" ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return " | ".join(parts)

  def train(self, step: int, **metrics: float) -> None:
    """Shows the training line for completed ``step``."""
    if self.show_progress:
      self._show(self.train_line(step, **metrics))

  def evaluation(self, split: str, done: int, total: int, started: float) -> None:
    """Shows ``"evaluating validation 12/62 batches | 3.1 s"`` (batches completed)."""
    if self.show_progress and (self._clock() - self._last_shown >= self.interval
                               or (done == total and self._live)):
      self._show(f"{self.name} evaluating {split} {done}/{total} batches | "
                 f"{format_duration(self._clock() - started)}")

  def message(self, text: str) -> None:
    """A permanent line (replaces the live line, which the next refresh redraws below it)."""
    if self.enabled:
      if self._line_open:
        self._stream.write("\r\033[K")
        self._line_open = False
      print(text, file=self._stream, flush=True)

  def close(self) -> None:
    """Ends the live line, leaving it on screen."""
    if self.enabled:
      self._end_line()

  def _show(self, line: str) -> None:
    self._last_shown = self._clock()
    if self._live:
      self._stream.write("\r\033[K" + line)
      self._stream.flush()
      self._line_open = True
    else:
      print(line, file=self._stream, flush=True)

  def _end_line(self) -> None:
    if self._line_open:
      self._stream.write("\n")
      self._stream.flush()
      self._line_open = False
