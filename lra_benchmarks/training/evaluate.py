"""Evaluation: the validation protocols and an evaluator over one split.

Protocols (``config.validation``):
  ``"test"``: model selection on the validation split the task loader returns (as LRA and the
    Spectraformer study; for Text that split is the IMDB test set, so the figures compare
    with the paper).
  ``"heldout"``: a fixed fraction ``config.heldout_fraction`` of train, drawn with a fixed seed,
    becomes the validation split; the test split is evaluated once, at the end.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

PROTOCOLS = ("test", "heldout")
HELDOUT_SEED = 20240  # the same held-out examples for every run (model, seed) of a task


def heldout_split(train: Mapping[str, np.ndarray], fraction: float, seed: int = HELDOUT_SEED
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """``(train', heldout)``: ``round(fraction * N)`` examples of ``train`` (drawn by
  ``default_rng(seed).permutation(N)``) form ``heldout``, the rest ``train'``; both keep the
  original order. Disjoint, together all of ``train``, and a pure function of (N, fraction, seed).

  Raises ValueError unless ``0 < fraction < 1`` and both parts are non-empty.
  """
  n = len(next(iter(train.values())))
  if not 0 < fraction < 1:
    raise ValueError(f"config.heldout_fraction={fraction!r}: must be in (0, 1)")
  size = int(round(fraction * n))
  if not 0 < size < n:
    raise ValueError(f"config.heldout_fraction={fraction!r} of {n} training examples leaves "
                     f"{size} held out and {n - size} for training: both must be non-empty")
  chosen = np.zeros(n, bool)
  chosen[np.random.default_rng(seed).permutation(n)[:size]] = True
  return ({k: np.asarray(v)[~chosen] for k, v in train.items()},
          {k: np.asarray(v)[chosen] for k, v in train.items()})


def protocol_splits(datasets: Mapping[str, Mapping[str, np.ndarray]], protocol: str,
                    fraction: float) -> dict[str, Mapping[str, np.ndarray]]:
  """The ``{train, validation, test}`` arrays a run uses under ``protocol`` (see above)."""
  if protocol not in PROTOCOLS:
    raise ValueError(f"config.validation={protocol!r}: must be one of {PROTOCOLS}")
  if protocol == "test":
    return dict(datasets)
  train, heldout = heldout_split(datasets["train"], fraction)
  return {"train": train, "validation": heldout, "test": datasets["test"]}


class Evaluator:
  """Loss and accuracy of a state on one split, summed on device over weighted batches.

  Args:
    eval_step: ``(state, sharded_batch) -> (loss_sum, correct, count)`` (jitted).
    batches: ``split -> iterable of host batches`` (numpy dicts).
    num_batches: ``split -> number of batches`` (for the progress line).
    shard: host batch -> global sharded batch.
    progress: ``(split, done, total, started)`` after each synchronised batch, or None.
    should_stop: polled between batches; when it returns True the evaluation returns None.
  """

  def __init__(self, eval_step: Callable, batches: Callable[[str], Any],
               num_batches: Callable[[str], int], shard: Callable[[dict], dict], *,
               progress: Optional[Callable[[str, int, int, float], None]] = None,
               should_stop: Callable[[], bool] = lambda: False,
               refresh_seconds: float = 1.0):
    self._eval_step, self._batches, self._num_batches = eval_step, batches, num_batches
    self._shard, self._progress, self._should_stop = shard, progress, should_stop
    self._refresh = refresh_seconds

  def __call__(self, state: Any, split: str, max_batches: int = -1) -> Optional[dict]:
    """``{"loss", "accuracy", "examples"}`` over the first ``max_batches`` batches of
    ``split`` (-1: all), means weighted by example; None if stopped."""
    total = self._num_batches(split)
    if max_batches >= 0:
      total = min(total, max_batches)
    totals = (0.0, 0.0, 0.0)
    started = last = time.perf_counter()
    for i, batch in enumerate(self._batches(split)):
      if i >= total:
        break
      if self._should_stop():
        return None
      totals = tuple(t + s for t, s in zip(totals, self._eval_step(state, self._shard(batch))))
      if self._progress is not None and time.perf_counter() - last >= self._refresh:
        jax.block_until_ready(totals)
        last = time.perf_counter()
        self._progress(split, i + 1, total, started)
    loss, correct, count = (float(x) for x in jax.device_get(totals))
    if self._progress is not None:
      self._progress(split, total, total, started)
    count = max(count, 1.0)
    return {"loss": loss / count, "accuracy": correct / count, "examples": count}
