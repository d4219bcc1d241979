"""Image (CIFAR-10 grayscale): pickle batches and tfds mock data."""

import pickle

import numpy as np
import pytest

from lra_benchmarks.data import get_task, image
from lra_benchmarks.data.common import DataNotFoundError, MalformedDataError


def reference_gray(img):
  # tf.image.rgb_to_grayscale on uint8, written out pixel by pixel in float32.
  r, g, b = (img[..., c].astype(np.float32) / np.float32(255) for c in range(3))
  y = r * np.float32(0.2989) + g * np.float32(0.5870) + b * np.float32(0.1140)
  return np.floor(y * np.float32(255.5)).astype(np.int32)


def test_grayscale_formula():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
  got = image.rgb_to_grayscale(img).astype(np.int32)
  ref = reference_gray(img)
  assert np.abs(got - ref).max() <= 1 and (got == ref).mean() > 0.99
  assert image.rgb_to_grayscale(np.full((1, 3), 255, np.uint8))[0] == 255
  assert image.rgb_to_grayscale(np.zeros((1, 3), np.uint8))[0] == 0


def write_batches(root, n_per_batch=4, labels_of=None):
  """CIFAR-10 python batches with random images; labels random, or ``labels_of(name)``."""
  d = root / "cifar-10-batches-py"
  d.mkdir()
  rng = np.random.default_rng(1)
  all_imgs, all_labels = [], []
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    imgs = rng.integers(0, 256, size=(n_per_batch, 32, 32, 3), dtype=np.uint8)
    labels = (rng.integers(0, 10, size=n_per_batch).tolist() if labels_of is None
              else list(labels_of(name)))
    data = imgs.transpose(0, 3, 1, 2).reshape(n_per_batch, 3072)  # R plane, G, B
    with open(d / name, "wb") as f:
      pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels,
                   b"filenames": [b"f.png"] * n_per_batch}, f)
    all_imgs.append(imgs); all_labels.append(labels)
  return d, all_imgs, all_labels


def test_pickles(tmp_path):
  d, imgs, labels = write_batches(tmp_path)
  task = get_task("image")
  train_imgs = np.concatenate(imgs[:5]); train_labels = np.concatenate(labels[:5])
  tr = task.load("train", data_dir=str(tmp_path), shuffle_seed=None)  # file order
  va = task.load("validation", data_dir=str(d), shuffle_seed=None)
  te = task.load("test", data_dir=str(tmp_path), source="pickle", shuffle_seed=None)
  assert tr["inputs"].shape == (18, 1024) and va["inputs"].shape == (2, 1024)  # 90% / 10%
  assert te["inputs"].shape == (4, 1024) and tr["inputs"].dtype == np.int32
  gray = image.rgb_to_grayscale(train_imgs).reshape(20, 1024)
  np.testing.assert_array_equal(tr["inputs"], gray[:18])
  np.testing.assert_array_equal(va["inputs"], gray[18:])
  np.testing.assert_array_equal(tr["targets"], train_labels[:18])
  np.testing.assert_array_equal(te["targets"], labels[5])
  # Row-major pixel order: token 33 is pixel (1, 1).
  np.testing.assert_array_equal(tr["inputs"][:, 33],
                                image.rgb_to_grayscale(train_imgs[:18, 1, 1]))


def test_pickle_errors(tmp_path):
  with pytest.raises(DataNotFoundError, match="image"):
    get_task("image").load("train", data_dir=str(tmp_path), source="pickle")
  d, _, _ = write_batches(tmp_path)
  (d / "data_batch_3").write_bytes(b"not a pickle")
  with pytest.raises(MalformedDataError, match="data_batch_3"):
    get_task("image").load("train", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="1024"):
    get_task("image").load("test", data_dir=str(tmp_path), max_length=100)


def test_tfds_mock():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
    tr = get_task("image").load("train", shuffle_seed=None)
    va = get_task("image").load("validation", shuffle_seed=None)
    te = get_task("image").load("test")
    src = tfds.data_source("cifar10", split="train")
    imgs = np.stack([src[i]["image"] for i in range(len(src))])
    labels = np.array([int(src[i]["label"]) for i in range(len(src))])
  assert tr["inputs"].shape == (9, 1024) and va["inputs"].shape == (1, 1024)
  assert te["inputs"].shape == (10, 1024)
  gray = image.rgb_to_grayscale(imgs).reshape(-1, 1024)
  np.testing.assert_array_equal(np.concatenate([tr["inputs"], va["inputs"]]), gray)
  np.testing.assert_array_equal(np.concatenate([tr["targets"], va["targets"]]), labels)
