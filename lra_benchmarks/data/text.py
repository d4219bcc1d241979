"""Text (IMDB reviews), byte level as LRA.

Tokens: UTF-8 bytes, byte b -> id b + 1 (tfds ``ByteTextEncoder``), pad 0,
vocab 257; truncated to ``max_length`` (default 4000). Labels: 0 negative,
1 positive. Splits as LRA: train = IMDB train (25000); validation = test =
IMDB test (25000), since IMDB has no validation split.

Sources: ``source="tfds"`` reads ``tfds.data_source("imdb_reviews")`` (no
TensorFlow needed once the data is prepared; ``data_dir`` is the tfds data dir);
``source="aclimdb"`` reads an ``aclImdb/`` folder (``{train,test}/{neg,pos}/*.txt``;
``data_dir`` is that folder or its parent). ``source=None`` picks ``aclimdb`` when
``data_dir`` holds such a folder, else ``tfds``.

Every split is shuffled once with ``shuffle_seed`` (default ``common.SHUFFLE_SEED``): the
aclImdb folders list all negatives before all positives, so any prefix of a split (a partial
validation) is a random sample only after the shuffle.
"""

from __future__ import annotations

import os

import numpy as np

from lra_benchmarks.data import common

VOCAB_SIZE = 257
NUM_CLASSES = 2
DEFAULT_MAX_LENGTH = 4000
_IMDB_SPLIT = {"train": "train", "validation": "test", "test": "test"}

TFDS_HOW = ("with internet access (and TensorFlow, which tfds needs to prepare "
            "imdb_reviews), run tfds.builder('imdb_reviews', data_dir=...)"
            ".download_and_prepare(file_format='array_record') once; or download the "
            "aclImdb_v1.tar.gz archive of the Large Movie Review Dataset, unpack it and "
            "pass data_dir=<folder holding aclImdb/> (source='aclimdb').")


def find_aclimdb(data_dir: str) -> str | None:
  """The aclImdb folder: ``data_dir`` or ``data_dir/aclImdb``, whichever has
  ``train/`` and ``test/`` subfolders; None if neither does."""
  for d in (data_dir, os.path.join(data_dir, "aclImdb")):
    if os.path.isdir(os.path.join(d, "train")) and os.path.isdir(os.path.join(d, "test")):
      return d
  return None


def read_aclimdb(root: str, imdb_split: str) -> tuple[list[bytes], np.ndarray]:
  """Reads ``root/{split}/{neg,pos}/*.txt`` (neg first, files by numeric id)."""
  texts, labels = [], []
  for label, sub in ((0, "neg"), (1, "pos")):
    d = os.path.join(root, imdb_split, sub)
    if not os.path.isdir(d):
      raise common.missing("text", [d], TFDS_HOW)
    for name in sorted((n for n in os.listdir(d) if n.endswith(".txt")), key=common.numeric_key):
      with open(os.path.join(d, name), "rb") as f:
        texts.append(f.read())
      labels.append(label)
  return texts, np.array(labels, dtype=np.int32)


def read_tfds(imdb_split: str, data_dir: str | None,
              download: bool = False) -> tuple[list[bytes | str], np.ndarray]:
  """Reads tfds ``imdb_reviews`` split ``imdb_split`` ("train" or "test").

  Returns:
    (texts: bytes, or str from tfds mock data, labels int32 ``[N]``).

  Raises:
    ImportError: tensorflow_datasets is not installed.
    DataNotFoundError: tfds cannot open the prepared data (its error is quoted).
  """
  ds = common.open_tfds("text", "imdb_reviews", imdb_split, data_dir, download, TFDS_HOW)
  texts, labels = [], np.zeros(len(ds), dtype=np.int32)
  for i in range(len(ds)):
    ex = ds[i]
    texts.append(ex["text"])  # bytes from real tfds data, str from mock data
    labels[i] = int(ex["label"])
  return texts, labels


def load(split: str, *, data_dir: str | None = None, max_length: int | None = None,
         source: str | None = None, download: bool = False,
         shuffle_seed: int | None = common.SHUFFLE_SEED,
         dtype=np.int32) -> dict[str, np.ndarray]:
  """Loads one split as byte ids (validation and test are both IMDB test), shuffled.

  Args:
    split: "train", "validation" or "test".
    data_dir: tfds data dir, or the aclImdb folder / its parent.
    max_length: tokens per example (default 4000).
    source: "tfds", "aclimdb" or None (aclimdb if ``data_dir`` holds it).
    download: let tfds download and prepare the data.
    shuffle_seed: seed of the split's permutation (``common.shuffle_split``); None keeps the
      source order.
    dtype: dtype of "inputs".

  Returns:
    {"inputs": ``dtype [N, max_length]`` byte ids, 0-padded, "targets": int32 ``[N]``}.

  Raises:
    ValueError: bad ``split``, ``max_length`` or ``source``.
    DataNotFoundError: the data is not found.
  """
  common.check_split(split)
  L = common.resolve_max_length(max_length, DEFAULT_MAX_LENGTH)
  imdb_split = _IMDB_SPLIT[split]
  if source is None:
    source = "aclimdb" if data_dir is not None and find_aclimdb(data_dir) else "tfds"
  if source == "aclimdb":
    if data_dir is None:
      raise common.missing("text", ["<data_dir not given>/aclImdb"], TFDS_HOW)
    root = find_aclimdb(data_dir)
    if root is None:
      raise common.missing("text", [os.path.join(data_dir, "aclImdb"), data_dir], TFDS_HOW)
    texts, labels = read_aclimdb(root, imdb_split)
  elif source == "tfds":
    texts, labels = read_tfds(imdb_split, data_dir, download)
  else:
    raise ValueError(f"text: source must be 'tfds' or 'aclimdb', got {source!r}")
  shuffled = common.shuffle_split({"texts": texts, "labels": labels}, shuffle_seed)
  return {"inputs": common.byte_encode(shuffled["texts"], L, dtype=dtype),
          "targets": shuffled["labels"]}
