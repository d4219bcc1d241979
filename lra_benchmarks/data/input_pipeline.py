"""Batching shared by every task: numpy in, numpy out, static shapes.

Training reads an endless stream that is the concatenation of epoch-wise
permutations, epoch ``e`` permuted by ``np.random.default_rng([seed, e])``. The
global batch at step ``s`` is stream positions ``[s*G, (s+1)*G)`` with
``G = batch_size * process_count``; host ``h`` takes positions
``s*G + h*batch_size + [0, batch_size)``. So a batch is a pure function of
(seed, step) (resume with ``start_step``), hosts are disjoint, and no example
is dropped at an epoch boundary (a batch may straddle two epochs).

Evaluation makes one pass: ``ceil(N / G)`` batches on every host (the same
count, so collective ops stay in step); positions past N are zero-filled rows
with weight 0, so each example is counted exactly once across hosts.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np


def _num_examples(arrays: Mapping[str, np.ndarray]) -> int:
  sizes = {k: int(np.shape(v)[0]) for k, v in arrays.items()}
  if not sizes:
    raise ValueError("arrays has no entries: pass a mapping from names to arrays with a "
                     "leading example axis, e.g. {'inputs': ..., 'targets': ...}")
  if len(set(sizes.values())) != 1:
    raise ValueError(f"arrays disagree on the number of examples: {sizes}")
  return next(iter(sizes.values()))


def _check(batch_size: int, process_index: int, process_count: int) -> None:
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got "
                     f"{process_index} / {process_count}")


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """int64 ``[n]`` permutation of ``range(n)`` for ``epoch``, drawn from
  ``np.random.default_rng([seed, epoch])``."""
  return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def train_indices(n: int, batch_size: int, step: int, *, seed: int, process_index: int = 0,
                  process_count: int = 1, _perms: dict | None = None) -> np.ndarray:
  """Example indices of this host's batch at ``step`` (pure in seed and step)."""
  pos = (np.int64(step) * batch_size * process_count + process_index * batch_size
         + np.arange(batch_size, dtype=np.int64))
  epochs = pos // n
  out = np.empty(batch_size, dtype=np.int64)
  for e in np.unique(epochs).tolist():
    if _perms is not None:
      if e not in _perms:
        for old in [k for k in _perms if k < e - 1]:
          del _perms[old]
        _perms[e] = epoch_permutation(seed, e, n)
      perm = _perms[e]
    else:
      perm = epoch_permutation(seed, e, n)
    m = epochs == e
    out[m] = perm[pos[m] - e * n]
  return out


def train_batches(arrays: Mapping[str, np.ndarray], batch_size: int, *, seed: int,
                  start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Endless per-host batches; the batch at step s depends only on (seed, s).

  Each batch holds every array gathered to ``[batch_size, ...]`` plus
  ``"weights"``: float32 ones ``[batch_size]``.
  """
  _check(batch_size, process_index, process_count)
  n = _num_examples(arrays)
  if n == 0:
    raise ValueError("cannot draw training batches from an empty dataset")
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  perms: dict = {}
  ones = np.ones(batch_size, dtype=np.float32)
  step = int(start_step)
  while True:
    idx = train_indices(n, batch_size, step, seed=seed, process_index=process_index,
                        process_count=process_count, _perms=perms)
    batch = {k: v[idx] for k, v in arrays.items()}
    batch["weights"] = ones.copy()
    yield batch
    step += 1


def num_eval_batches(n: int, batch_size: int, process_count: int = 1) -> int:
  """``ceil(n / (batch_size * process_count))``: the batches ``eval_batches`` yields
  on every host (0 when ``n == 0``)."""
  g = batch_size * process_count
  return -(-n // g)


def eval_batches(arrays: Mapping[str, np.ndarray], batch_size: int, *, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """One pass in order; the tail is zero-padded with weight 0 (no example dropped)."""
  _check(batch_size, process_index, process_count)
  n = _num_examples(arrays)
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  g = batch_size * process_count
  for b in range(num_eval_batches(n, batch_size, process_count)):
    pos = b * g + process_index * batch_size + np.arange(batch_size, dtype=np.int64)
    valid = pos < n
    if valid.all():
      batch = {k: v[pos] for k, v in arrays.items()}
    else:
      idx = np.where(valid, pos, 0)
      batch = {}
      for k, v in arrays.items():
        x = v[idx]
        x[~valid] = 0
        batch[k] = x
    batch["weights"] = valid.astype(np.float32)
    yield batch
