"""A checkpoint store: orbax saves (atomic: written to a temporary directory, then renamed),
restores that verify, and a fallback to the newest readable checkpoint.

A checkpoint holds two items: ``state`` (a pytree of arrays, restored onto the shapes, dtypes
and shardings of an abstract target) and ``meta`` (a JSON dict). A checkpoint that cannot be
restored (truncated data, empty or corrupt metadata, any orbax or TensorStore error, a tree that
does not match the target) is moved aside to ``<workdir>/unreadable/`` with one line saying so,
and the next newest one is tried.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
from typing import Any, Callable, Optional

import orbax.checkpoint as ocp

ITEMS = ("state", "meta")


# What orbax says when an intact checkpoint has other shapes or another tree than the target.
_MISMATCH = ("is not compatible with the stored shape", "Structure mismatch")


class CheckpointError(RuntimeError):
  """No checkpoint in a directory could be restored; the message says what to do."""


def short_error(error: BaseException, limit: int = 200) -> str:
  """``"Type: first line of the message"`` of the root cause of ``error`` (the innermost of its
  ``__cause__``/``__context__`` chain: TensorStore's own words rather than orbax's wrapper),
  cut to ``limit`` characters."""
  seen = {id(error)}
  while (error.__cause__ or error.__context__) is not None and id(
      error.__cause__ or error.__context__) not in seen:
    error = error.__cause__ or error.__context__
    seen.add(id(error))
  lines = str(error).strip().splitlines()
  text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _drop_closed_event_loop_errors() -> None:
  """Drops, from now on, the ``RuntimeError: Event loop is closed`` that TensorStore callbacks
  of a failed orbax read raise after orbax closed its event loop (dozens of tracebacks of no
  use, arriving from other threads at any later time, so the filter stays installed); every
  other unraisable exception still goes to the previous hook.  Installed once per hook."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_event_loops", False):
    return

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and "Event loop is closed" in str(unraisable.exc_value)):
      previous(unraisable)
  hook.drops_closed_event_loops = True
  sys.unraisablehook = hook


class CheckpointStore:
  """Steps of one run in ``directory`` (``<dir>/<step>/{state,meta}``), the newest kept.

  Args:
    directory: where the step directories live (created if missing).
    max_to_keep: how many steps to keep (older ones are deleted after a save).
    asynchronous: save in a background thread (``wait`` blocks until written).
    say: prints a line for the user (the fallback messages).
  """

  def __init__(self, directory: str, *, max_to_keep: int, asynchronous: bool = True,
               say: Callable[[str], None] = print):
    self.directory = os.path.abspath(directory)
    self._say = say
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=ITEMS,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max(max_to_keep, 1), create=True,
            enable_async_checkpointing=asynchronous,
            # Several processes: the stores of one run (checkpoints/, best/) may save the same
            # step at once, so their barriers need names of their own.
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix=os.path.basename(self.directory))))

  def steps(self) -> list[int]:
    """The saved steps, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Saves ``state`` and ``meta`` as ``step`` (replacing an existing checkpoint of that step)."""
    if step in self._manager.all_steps():
      self._manager.delete(step)
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state: Any = None) -> tuple[Any, dict]:
    """``(state, meta)`` of ``step``, restored onto ``abstract_state`` (a tree of
    ``jax.ShapeDtypeStruct`` with shardings; None: as saved). Raises what orbax raises."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    meta = restored["meta"]
    if not isinstance(meta, dict):
      raise ValueError(f"meta is {type(meta).__name__}, not a JSON object")
    return restored["state"], dict(meta)

  def restore_latest(self, abstract_state: Any = None, *,
                     verify: Optional[Callable[[int, Any, dict], None]] = None,
                     hint: str = "") -> Optional[tuple[int, Any, dict]]:
    """``(step, state, meta)`` of the newest readable checkpoint, or None if there is none.

    A checkpoint is readable when orbax restores it onto ``abstract_state`` and
    ``verify(step, state, meta)`` (if given) does not raise.
    Each unreadable checkpoint is moved to ``<parent>/unreadable/<name>-<step>`` with one line
    naming it and the error. Raises CheckpointError when checkpoints exist but none is
    readable, or at once (moving nothing) when the newest is intact but holds other shapes or
    another tree than ``abstract_state`` (``hint`` is appended to its message).
    """
    tried = []
    for step in reversed(self.steps()):
      try:
        try:
          state, meta = self.restore(step, abstract_state)
        except Exception:
          _drop_closed_event_loop_errors()
          gc.collect()  # a failed read's leftovers complain now, into the filter
          raise
        if verify is not None:
          verify(step, state, meta)
      except Exception as e:  # pylint: disable=broad-except
        path = os.path.join(self.directory, str(step))
        if any(sign in str(e) for sign in _MISMATCH):
          first = short_error(e).split(". ")[0]  # not orbax's advice on padding
          raise CheckpointError(f"Checkpoint {path} does not fit this config ({first}). "
                                f"{hint}".strip()) from None
        tried.append(f"{path} ({short_error(e)})")
        moved = self._set_aside(step)
        self._say(f"Checkpoint {path} is unreadable ({short_error(e)}); moved it to {moved} "
                  "and trying the next newest.")
        continue
      return step, state, meta
    if tried:
      raise CheckpointError(
          f"No readable checkpoint in {self.directory}: tried {'; '.join(tried)}. The "
          f"unreadable ones are in {self._aside_root()}. {hint}".strip())
    return None

  def _aside_root(self) -> str:
    return os.path.join(os.path.dirname(self.directory), "unreadable")

  def _set_aside(self, step: int) -> str:
    """Moves the directory of ``step`` out of the store; returns where it went."""
    source = os.path.join(self.directory, str(step))
    target = os.path.join(self._aside_root(), f"{os.path.basename(self.directory)}-{step}")
    suffix = 0
    while os.path.exists(target if not suffix else f"{target}.{suffix}"):
      suffix += 1
    target = target if not suffix else f"{target}.{suffix}"
    os.makedirs(self._aside_root(), exist_ok=True)
    shutil.move(source, target)
    self._manager.reload()
    return target

  def delete_after(self, step: int) -> None:
    """Deletes the checkpoints of steps past ``step``."""
    for later in [s for s in self._manager.all_steps() if s > step]:
      self._manager.delete(later)

  def wait(self) -> None:
    """Blocks until every save has been written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.close()

  def __enter__(self) -> "CheckpointStore":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
