"""Image (CIFAR-10), grayscale pixels as tokens, as LRA.

Grayscale is ``tf.image.rgb_to_grayscale`` then ``int32``, reproduced in float32
numpy: ``g = uint8(((R, G, B) / 255) . (0.2989, 0.5870, 0.1140) * 255.5)``
(truncation toward zero, as ``convert_image_dtype`` float -> uint8). Tokens are
the 1024 pixels in row-major order, values 0..255 (vocab 256, every position is
real: no padding). Splits as LRA / the study: train = 90% of CIFAR train (45000), validation =
the other 10% (5000), test = CIFAR test (10000). The official train and test sets are shuffled
once with ``shuffle_seed`` (default ``common.SHUFFLE_SEED``) before the 90% / 10% cut, so every
split and every prefix of one is a random sample whatever the file order (LRA cuts tfds' own
shuffled order instead: a different random 10%). ``shuffle_seed=None`` keeps the file order.

Sources: ``source="tfds"``: ``tfds.data_source("cifar10")`` (``data_dir`` is the
tfds data dir); ``source="pickle"``: the ``cifar-10-batches-py`` folder
(``data_batch_1..5``, ``test_batch``; ``data_dir`` is it or its parent).
``source=None`` picks ``pickle`` when ``data_dir`` holds that folder. The two
sources order the training images differently (tfds shuffles at preparation),
so without the shuffle their 45000/5000 cut differs.
"""

from __future__ import annotations

import os
import pickle

import numpy as np

from lra_benchmarks.data import common

VOCAB_SIZE = 256
NUM_CLASSES = 10
SEQ_LENGTH = 1024
_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], dtype=np.float32)

HOW = ("with internet access (and TensorFlow, which tfds needs to prepare cifar10), run "
       "tfds.builder('cifar10', data_dir=...).download_and_prepare("
       "file_format='array_record') once; or download cifar-10-python.tar.gz (CIFAR-10, "
       "python version), unpack it and pass data_dir=<folder holding cifar-10-batches-py/> "
       "(source='pickle').")


def rgb_to_grayscale(images: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> uint8 [...], exactly as tf.image.rgb_to_grayscale on uint8."""
  flt = images.astype(np.float32) * np.float32(1.0 / 255.0)
  gray = flt @ _WEIGHTS
  return (gray * np.float32(255.5)).astype(np.uint8)


def find_pickles(data_dir: str) -> str | None:
  """The folder holding ``test_batch``: ``data_dir`` or
  ``data_dir/cifar-10-batches-py``; None if neither does."""
  for d in (data_dir, os.path.join(data_dir, "cifar-10-batches-py")):
    if os.path.exists(os.path.join(d, "test_batch")):
      return d
  return None


def _read_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
  if not os.path.exists(path):
    raise common.missing("image", [path], HOW)
  with open(path, "rb") as f:
    try:
      d = pickle.load(f, encoding="bytes")
    except Exception as e:
      raise common.MalformedDataError(f"{path}:1: not a CIFAR-10 pickle batch ({e})") from e
  data = d.get(b"data", d.get("data")) if isinstance(d, dict) else None
  labels = d.get(b"labels", d.get("labels")) if isinstance(d, dict) else None
  if data is None or labels is None:
    raise common.MalformedDataError(f"{path}:1: a CIFAR-10 batch needs 'data' and 'labels'")
  data = np.asarray(data, dtype=np.uint8)
  if data.ndim != 2 or data.shape[1] != 3 * SEQ_LENGTH or data.shape[0] != len(labels):
    raise common.MalformedDataError(
        f"{path}:1: 'data' has shape {data.shape}, expected (N, 3072) with N = {len(labels)}")
  # Rows are R(1024) G(1024) B(1024), each 32x32 row-major -> [N, 32, 32, 3].
  imgs = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return imgs, np.asarray(labels, dtype=np.int32)


def read_pickles(root: str, train: bool) -> tuple[np.ndarray, np.ndarray]:
  """Reads ``data_batch_1..5`` (``train``) or ``test_batch`` from ``root``.

  Returns:
    (images uint8 ``[N, 32, 32, 3]``, labels int32 ``[N]``) in file order.

  Raises:
    DataNotFoundError: a batch file is missing.
    MalformedDataError: a batch file is not a CIFAR-10 pickle batch.
  """
  names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
  parts = [_read_batch(os.path.join(root, n)) for n in names]
  return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def read_tfds(train: bool, data_dir: str | None,
              download: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Reads tfds ``cifar10`` (train or test split) via ``tfds.data_source``.

  Returns:
    (images uint8 ``[N, 32, 32, 3]``, labels int32 ``[N]``) in tfds order.

  Raises:
    ImportError: tensorflow_datasets is not installed.
    DataNotFoundError: tfds cannot open the prepared data (its error is quoted).
  """
  ds = common.open_tfds("image", "cifar10", "train" if train else "test", data_dir, download,
                        HOW)
  n = len(ds)
  imgs = np.zeros((n, 32, 32, 3), dtype=np.uint8)
  labels = np.zeros(n, dtype=np.int32)
  for i in range(n):
    ex = ds[i]
    imgs[i] = ex["image"]
    labels[i] = int(ex["label"])
  return imgs, labels


def load(split: str, *, data_dir: str | None = None, max_length: int | None = None,
         source: str | None = None, download: bool = False,
         shuffle_seed: int | None = common.SHUFFLE_SEED,
         dtype=np.int32) -> dict[str, np.ndarray]:
  """Loads one split as grayscale pixel tokens, shuffled.

  Args:
    split: "train", "validation" or "test".
    data_dir: tfds data dir, or the pickle folder / its parent.
    max_length: None or 1024 (the only valid length).
    source: "tfds", "pickle" or None (pickle if ``data_dir`` holds it).
    download: let tfds download and prepare the data.
    shuffle_seed: seed of the permutation of the official split, applied before the cut
      (``common.shuffle_split``); None keeps the source order.
    dtype: dtype of "inputs".

  Returns:
    {"inputs": ``dtype [N, 1024]`` values 0..255, "targets": int32 ``[N]``}.

  Raises:
    ValueError: bad ``split``, ``max_length`` or ``source``.
    DataNotFoundError: the data is not found.
    MalformedDataError: a pickle batch does not parse.
  """
  common.check_split(split)
  if max_length is not None and int(max_length) != SEQ_LENGTH:
    raise ValueError(f"image: max_length must be {SEQ_LENGTH} (32 x 32 pixels), got {max_length}")
  if source is None:
    source = "pickle" if data_dir is not None and find_pickles(data_dir) else "tfds"
  train = split != "test"
  if source == "pickle":
    root = find_pickles(data_dir) if data_dir is not None else None
    if root is None:
      tried = ([os.path.join(data_dir, "cifar-10-batches-py", "test_batch"),
                os.path.join(data_dir, "test_batch")] if data_dir else ["<data_dir not given>"])
      raise common.missing("image", tried, HOW)
    imgs, labels = read_pickles(root, train)
  elif source == "tfds":
    imgs, labels = read_tfds(train, data_dir, download)
  else:
    raise ValueError(f"image: source must be 'tfds' or 'pickle', got {source!r}")
  shuffled = common.shuffle_split({"images": imgs, "labels": labels}, shuffle_seed)
  imgs, labels = shuffled["images"], shuffled["labels"]
  if train:
    cut = (labels.shape[0] * 9) // 10  # train[:90%] / train[90%:]: 45000 / 5000
    sl = slice(0, cut) if split == "train" else slice(cut, None)
    imgs, labels = imgs[sl], labels[sl]
  gray = rgb_to_grayscale(imgs).reshape(-1, SEQ_LENGTH).astype(dtype)
  return {"inputs": gray, "targets": labels}
