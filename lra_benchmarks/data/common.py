"""Shared helpers for the LRA loaders: errors, paths, byte encoding, padding."""

from __future__ import annotations

import os
import re
from typing import Any, Iterable, Sequence

import numpy as np

SPLITS = ("train", "validation", "test")

SHUFFLE_SEED = 0
"""Seed of the one-time shuffle of every split a loader returns (the ``shuffle_seed`` option of
each ``load``; None keeps the source's order). Sources are often ordered (IMDB: all negatives,
then all positives; CIFAR / Pathfinder files in file order), so an unshuffled prefix of a split --
the first ``num_eval_steps`` batches of a partial validation -- can hold a single class. Shuffled,
every prefix is a fixed uniformly random sample: the same examples in every evaluation."""

CACHE_ENV = "SPECTRAFORMER_JAX_CACHE"
"""Environment variable naming the cache root (default ``~/.cache/spectraformer_jax``)."""


class DataNotFoundError(FileNotFoundError):
  """Raised when a task's data is not where it was looked for."""


class MalformedDataError(ValueError):
  """Raised when a data file does not parse; the message names the file and line."""


def check_split(split: str) -> str:
  """Returns ``split`` unchanged; raises ValueError unless it is in ``SPLITS``."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  return split


def shuffle_split(arrays: dict[str, np.ndarray | list], seed: int | None) -> dict[str, Any]:
  """Every array or list of ``arrays`` (same length n) reordered along axis 0 by
  ``np.random.default_rng(seed).permutation(n)``; ``seed=None`` returns them unchanged.
  (Loaders shuffle the raw texts before encoding them, so no second padded copy is made.)"""
  if seed is None:
    return arrays
  sizes = {k: len(v) for k, v in arrays.items()}
  if len(set(sizes.values())) > 1:
    raise ValueError(f"cannot shuffle arrays of different lengths together: {sizes}")
  n = next(iter(sizes.values()), 0)
  perm = np.random.default_rng(int(seed)).permutation(n)
  return {k: [v[i] for i in perm] if isinstance(v, list) else v[perm]
          for k, v in arrays.items()}


def save_npz_atomic(path: str, **arrays: np.ndarray) -> None:
  """``np.savez(path, **arrays)`` through a temporary file renamed over ``path``, so a reader
  never sees half a file. Raises OSError when the folder is not writable."""
  tmp = f"{path}.tmp-{os.getpid()}.npz"
  try:
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def cache_root() -> str:
  """The cache root: ``$SPECTRAFORMER_JAX_CACHE`` if set and non-empty, else
  ``~/.cache/spectraformer_jax``. Only computes the path; nothing is created."""
  root = os.environ.get(CACHE_ENV)
  if not root:
    root = os.path.join(os.path.expanduser("~"), ".cache", "spectraformer_jax")
  return root


def missing(task: str, tried: Iterable[str], how: str) -> DataNotFoundError:
  """Builds (does not raise) a DataNotFoundError for ``task`` whose message lists
  the ``tried`` paths, one per line, and ``how`` to obtain the data."""
  tried = list(tried)
  where = "\n".join(f"  - {p}" for p in tried)
  return DataNotFoundError(
      f"{task}: data not found. Looked for:\n{where}\nHow to obtain it: {how}")


LRA_RELEASE_HOW = (
    "run `python -m lra_benchmarks.data.download --task=<task> --dest=DIR` and pass "
    "data_dir=DIR (or unpack lra_release.gz yourself and point data_dir= at the folder "
    "named above or its parent).")


def byte_encode(texts: Sequence[bytes | str], max_length: int,
                        dtype=np.int32, truncate_bytes: int | None = None) -> np.ndarray:
  """Byte-level ids as LRA: byte b -> b + 1 (vocab 257), padded with 0 to max_length."""
  out = np.zeros((len(texts), max_length), dtype=dtype)
  for i, t in enumerate(texts):
    if isinstance(t, str):
      t = t.encode("utf-8")
    if truncate_bytes is not None:
      t = t[:truncate_bytes]
    t = t[:max_length]
    n = len(t)
    if n:
      out[i, :n] = np.frombuffer(t, dtype=np.uint8).astype(dtype) + 1
  return out


def ragged_to_padded(flat: np.ndarray, lengths: np.ndarray, max_length: int,
                     dtype=np.int32) -> np.ndarray:
  """[sum(lengths)] tokens + per-row lengths -> [N, max_length], truncated, 0-padded."""
  lengths = np.asarray(lengths, dtype=np.int64)
  n = lengths.shape[0]
  out = np.zeros((n, max_length), dtype=dtype)
  if int(lengths.sum()) != flat.size:
    raise ValueError(f"lengths sum to {int(lengths.sum())} but there are {flat.size} tokens")
  if n and lengths.max() <= max_length:
    out[np.arange(max_length)[None, :] < lengths[:, None]] = flat  # row-major fill
    return out
  start = 0
  for i, m in enumerate(lengths.tolist()):
    k = min(m, max_length)
    out[i, :k] = flat[start:start + k]
    start += m
  return out


def resolve_max_length(max_length: int | None, default: int) -> int:
  """``None`` -> ``default``, else ``int(max_length)``; raises ValueError if that is
  not positive."""
  if max_length is None:
    return default
  max_length = int(max_length)
  if max_length <= 0:
    raise ValueError(f"max_length must be positive, got {max_length}")
  return max_length


def numeric_key(name: str) -> tuple[int, str]:
  """Sort key for file names by their leading number (``"12_3.txt"`` -> ``(12, name)``;
  names without one first), so ``2.npy`` comes before ``10.npy``."""
  m = re.match(r"(\d+)", name)
  return (int(m.group(1)) if m else -1, name)


def open_tfds(task: str, name: str, split: str, data_dir: str | None, download: bool,
              how: str):
  """``tfds.data_source(name, split=...)``: a random-access sequence of examples (dicts).

  Raises:
    ImportError: tensorflow_datasets is not installed.
    DataNotFoundError: tfds cannot open the prepared data (``how`` says how to get it; tfds'
      own error is quoted, since it raises assorted errors for missing or TFRecord-only data).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=download)
  except Exception as e:  # pylint: disable=broad-except
    where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    raise missing(task, [os.path.join(where, name)], how) from e
