"""Multi-query associative recall (MQAR; Zoology, Arora et al. 2023), generated and seeded.

A sequence of length L holds K key-value pairs, then a query region:

    k_1 v_1 k_2 v_2 ... k_K v_K | x x k_3 x k_1 x x x k_K x ...

Keys are K distinct tokens of ``[1, V/2)``, values K distinct tokens of ``[V/2, V)`` (V the
vocabulary size; token 0 is never used).  Every key appears once more in the query region, the
keys in random order, at even offsets ``2 g`` from the region's start; the gaps ``g`` are K
distinct draws from ``{0, ..., (L - 2K)/2 - 1}`` with probability ``~ (g + 1)^(a - 1)``
(``a = power_a``; Zoology's 0.01 favours early queries), drawn without replacement.  Every
other position of the region holds a uniformly random token of ``[1, V)``.  The target at a
query position is the value bound to its key; every other target is ``IGNORE``.  A causal
model must therefore recall, at each query, the value that followed the same key earlier.

Splits are independent draws: ``np.random.default_rng([seed, i])`` with ``i`` the split's index
in ``SPLITS``; no download, no files.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from lra_benchmarks.data import IGNORE
from lra_benchmarks.data.common import SPLITS, check_split

DEFAULT_POWER_A = 0.01


def _distinct(rng: np.random.Generator, n: int, low: int, high: int, k: int) -> np.ndarray:
  """int64 ``[n, k]``: per row, k distinct uniform draws from ``[low, high)`` in random order.

  Floyd's algorithm, vectorised over rows (for j = p - k, ..., p - 1 with p = high - low: draw
  t uniform in [0, j]; keep t unless already chosen, else j), which gives a uniform k-subset
  in O(n k^2) work whatever the population; then a uniform shuffle of each row.
  """
  population = high - low
  chosen = np.empty((n, k), np.int64)
  for i, j in enumerate(range(population - k, population)):
    t = rng.integers(0, j + 1, n)
    taken = (chosen[:, :i] == t[:, None]).any(axis=1)
    chosen[:, i] = np.where(taken, j, t)
  order = np.argsort(rng.random((n, k)), axis=1)
  return np.take_along_axis(chosen, order, axis=1) + low


def _gaps(rng: np.random.Generator, n: int, space: int, k: int, power_a: float) -> np.ndarray:
  """int64 ``[n, k]``: per row, k distinct gaps of ``[0, space)`` drawn one after another with
  probability ``~ (g + 1)^(power_a - 1)`` among those left: the top k of
  ``log p_g + Gumbel noise`` (the Gumbel-top-k form of successive sampling)."""
  log_p = (power_a - 1.0) * np.log(np.arange(1, space + 1, dtype=np.float64))
  scores = log_p + rng.gumbel(size=(n, space))
  return np.argsort(-scores, axis=1)[:, :k]


def check_options(seq_len: int, vocab_size: int, num_kv_pairs: int, power_a: float) -> None:
  """Raises ValueError naming the option when MQAR cannot be built with these sizes."""
  if num_kv_pairs < 1:
    raise ValueError(f"num_kv_pairs={num_kv_pairs!r}: must be a positive integer.")
  if seq_len < 4 * num_kv_pairs:
    raise ValueError(f"max_length={seq_len} is too short for num_kv_pairs={num_kv_pairs}: "
                     f"MQAR needs at least 4 * num_kv_pairs = {4 * num_kv_pairs} tokens "
                     "(the pairs, then as many query slots).")
  if vocab_size // 2 - 1 < num_kv_pairs:
    raise ValueError(f"vocab_size={vocab_size} is too small for num_kv_pairs={num_kv_pairs}: "
                     f"keys are distinct tokens of [1, vocab_size // 2), so vocab_size must be "
                     f"at least {2 * (num_kv_pairs + 1)}.")
  if not 0.0 < power_a <= 1.0:
    raise ValueError(f"power_a={power_a!r}: must be in (0, 1] (1: uniform query gaps).")


def generate(num_examples: int, seq_len: int, vocab_size: int, num_kv_pairs: int, *,
             rng: np.random.Generator, power_a: float = DEFAULT_POWER_A) -> dict[str, np.ndarray]:
  """``num_examples`` MQAR sequences (module doc): ``{"inputs": int32[N, L],
  "targets": int32[N, L]}`` with ``L = seq_len``, targets ``IGNORE`` except at the K query
  positions of each row."""
  check_options(seq_len, vocab_size, num_kv_pairs, power_a)
  n, k, half = num_examples, num_kv_pairs, vocab_size // 2
  keys = _distinct(rng, n, 1, half, k)
  values = _distinct(rng, n, half, vocab_size, k)
  inputs = rng.integers(1, vocab_size, (n, seq_len))
  inputs[:, 0:2 * k:2], inputs[:, 1:2 * k:2] = keys, values
  positions = 2 * k + 2 * _gaps(rng, n, (seq_len - 2 * k) // 2, k, power_a)
  np.put_along_axis(inputs, positions, keys, axis=1)
  targets = np.full((n, seq_len), IGNORE, np.int64)
  np.put_along_axis(targets, positions, values, axis=1)
  return {"inputs": inputs.astype(np.int32), "targets": targets.astype(np.int32)}


def load(split: str, *, data_dir: Optional[str] = None, max_length: Optional[int] = None,
         vocab_size: int = 8192, num_kv_pairs: int = 8, num_train: int = 100_000,
         num_test: int = 3_000, seed: int = 0,
         power_a: float = DEFAULT_POWER_A) -> dict[str, np.ndarray]:
  """The ``split`` of MQAR: ``num_train`` training or ``num_test`` validation/test sequences
  of length ``max_length`` (default 256), drawn from ``default_rng([seed, split index])``.
  MQAR is generated: ``data_dir`` must be None."""
  check_split(split)
  if data_dir is not None:
    raise ValueError(f"data_dir={data_dir!r}: MQAR is generated and reads no files; leave "
                     "config.data_dir unset.")
  count = num_train if split == "train" else num_test
  if count < 1:
    raise ValueError(f"num_{'train' if split == 'train' else 'test'}={count!r}: must be a "
                     "positive integer.")
  rng = np.random.default_rng([int(seed), SPLITS.index(split)])
  return generate(count, 256 if max_length is None else max_length, vocab_size, num_kv_pairs,
                  rng=rng, power_a=power_a)
