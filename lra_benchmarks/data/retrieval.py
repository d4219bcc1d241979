"""Retrieval (ACL Anthology Network document matching), byte level as LRA.

Files (LRA release ``tsv_data/``): ``new_aan_pairs.{train,eval,test}.tsv``, no
header, five tab-separated fields: label, id1, id2, text1, text2 (no quoting:
LRA reads them with ``use_quote_delim=False``). Label is 0/1 (written as an int
or a float). Each text is truncated to 10000 bytes (as LRA), encoded byte b ->
b + 1 (pad 0, vocab 257), cut to ``max_length`` (default 4000) per document.
Splits: train / eval / test files -> "train" / "validation" / "test", each shuffled once with
``shuffle_seed`` (default ``common.SHUFFLE_SEED``), so any prefix is a random sample.
"""

from __future__ import annotations

import os

import numpy as np

from lra_benchmarks.data import common

VOCAB_SIZE = 257
NUM_CLASSES = 2
DEFAULT_MAX_LENGTH = 4000
_FILE = {"train": "train", "validation": "eval", "test": "test"}
PREFIX = "new_aan_pairs"


def find_dir(data_dir: str) -> str:
  """The first of ``data_dir``, ``data_dir/tsv_data`` and
  ``data_dir/lra_release/tsv_data`` holding any ``new_aan_pairs.*.tsv``; raises
  DataNotFoundError if none does."""
  tried = []
  for d in (data_dir, os.path.join(data_dir, "tsv_data"),
            os.path.join(data_dir, "lra_release", "tsv_data")):
    p = os.path.join(d, f"{PREFIX}.train.tsv")
    tried.append(p)
    if any(os.path.exists(os.path.join(d, f"{PREFIX}.{s}.tsv")) for s in _FILE.values()):
      return d
  raise common.missing("retrieval", tried, common.LRA_RELEASE_HOW)


def read_tsv(path: str) -> tuple[list[bytes], list[bytes], np.ndarray]:
  """Reads one AAN pairs TSV (blank lines skipped, trailing ``\\r`` stripped).

  Returns:
    (text1 list of bytes, text2 list of bytes, labels int32 ``[N]``), untruncated.

  Raises:
    MalformedDataError: a row has not 5 fields, or a label that is not 0/1.
  """
  with open(path, "rb") as f:
    rows = f.read().split(b"\n")
  t1, t2, labels = [], [], []
  for i, row in enumerate(rows, start=1):
    if row.endswith(b"\r"):
      row = row[:-1]
    if not row.strip():
      continue
    parts = row.split(b"\t")
    if len(parts) != 5:
      raise common.MalformedDataError(
          f"{path}:{i}: expected 5 tab-separated fields (label, id1, id2, text1, text2), "
          f"got {len(parts)}")
    try:
      lab = float(parts[0])
    except ValueError:
      raise common.MalformedDataError(
          f"{path}:{i}: label {parts[0][:20]!r} is not a number") from None
    if lab not in (0.0, 1.0):
      raise common.MalformedDataError(f"{path}:{i}: label {lab} is not 0 or 1")
    labels.append(int(lab))
    t1.append(parts[3])
    t2.append(parts[4])
  return t1, t2, np.array(labels, dtype=np.int32)


def load(split: str, *, data_dir: str | None = None, max_length: int | None = None,
         shuffle_seed: int | None = common.SHUFFLE_SEED,
         dtype=np.int32) -> dict[str, np.ndarray]:
  """Loads one split as byte ids per document, shuffled.

  Args:
    split: "train", "validation" or "test" (files train / eval / test).
    data_dir: the ``tsv_data`` folder or a parent (required).
    max_length: tokens per document (default 4000).
    shuffle_seed: seed of the split's permutation (``common.shuffle_split``); None keeps the
      file order.
    dtype: dtype of "inputs1" / "inputs2".

  Returns:
    {"inputs1", "inputs2": ``dtype [N, max_length]`` byte ids, 0-padded,
    "targets": int32 ``[N]``}.

  Raises:
    ValueError: bad ``split`` or ``max_length``.
    DataNotFoundError: ``data_dir`` is None or lacks the split's file.
    MalformedDataError: the file does not parse.
  """
  common.check_split(split)
  L = common.resolve_max_length(max_length, DEFAULT_MAX_LENGTH)
  if data_dir is None:
    raise common.missing("retrieval", ["<data_dir not given>/tsv_data/new_aan_pairs.*.tsv"],
                         common.LRA_RELEASE_HOW)
  d = find_dir(data_dir)
  p = os.path.join(d, f"{PREFIX}.{_FILE[split]}.tsv")
  if not os.path.exists(p):
    raise common.missing("retrieval", [p], common.LRA_RELEASE_HOW)
  t1, t2, labels = read_tsv(p)
  pairs = common.shuffle_split({"text1": t1, "text2": t2, "labels": labels}, shuffle_seed)
  return {"inputs1": common.byte_encode(pairs["text1"], L, dtype=dtype, truncate_bytes=10000),
          "inputs2": common.byte_encode(pairs["text2"], L, dtype=dtype, truncate_bytes=10000),
          "targets": pairs["labels"]}
