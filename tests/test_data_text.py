"""Text (IMDB, byte level): aclImdb folder and tfds mock data."""

import numpy as np
import pytest

from lra_benchmarks.data import get_task
from lra_benchmarks.data.common import DataNotFoundError

REVIEWS = {
    ("train", "neg"): [b"Awful.<br /><br />Truly", "caf\u00e9 bad".encode()],
    ("train", "pos"): [b"Great film!", b"x" * 50, b"ok"],
    ("test", "neg"): [b"meh"],
    ("test", "pos"): [b"Loved it", b""],
}


def write_aclimdb(root):
  for (split, sub), texts in REVIEWS.items():
    d = root / "aclImdb" / split / sub
    d.mkdir(parents=True)
    # Ids out of lexical order (10 < 9 as strings) to check the numeric order.
    for i, t in zip([9, 10, 2], texts):
      (d / f"{i}_{7 if sub == 'pos' else 2}.txt").write_bytes(t)
  (root / "aclImdb" / "train" / "unsup").mkdir()


def expected(texts, L):
  out = np.zeros((len(texts), L), np.int32)
  for i, t in enumerate(texts):
    t = t[:L]
    out[i, :len(t)] = np.frombuffer(t, np.uint8).astype(np.int32) + 1
  return out


def order(split, sub):  # files 2, 9, 10 in numeric order
  texts = REVIEWS[(split, sub)]
  by_id = dict(zip([9, 10, 2], texts))
  return [by_id[i] for i in sorted(by_id)]


def test_aclimdb(tmp_path):
  write_aclimdb(tmp_path)
  task = get_task("text")
  out = task.load("train", data_dir=str(tmp_path), max_length=16, shuffle_seed=None)
  texts = order("train", "neg") + order("train", "pos")
  np.testing.assert_array_equal(out["inputs"], expected(texts, 16))
  np.testing.assert_array_equal(out["targets"], [0, 0, 1, 1, 1])
  assert out["inputs"].dtype == np.int32 and out["inputs"].max() <= 256
  # LRA: validation and test are both the IMDB test split.
  val = task.load("validation", data_dir=str(tmp_path / "aclImdb"), source="aclimdb",
                  shuffle_seed=None)
  test = task.load("test", data_dir=str(tmp_path), shuffle_seed=None)
  assert val["inputs"].shape == (3, 4000)
  np.testing.assert_array_equal(val["inputs"], test["inputs"])
  np.testing.assert_array_equal(val["targets"], [0, 1, 1])
  assert np.all(val["inputs"][2] == 0)  # the empty review is all padding


def test_aclimdb_missing(tmp_path):
  with pytest.raises(DataNotFoundError, match="text"):
    get_task("text").load("train", data_dir=str(tmp_path), source="aclimdb")


def test_tfds_mock(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    out = get_task("text").load("train", max_length=64, shuffle_seed=None)
    src = tfds.data_source("imdb_reviews", split="train")
    texts = [src[i]["text"] for i in range(len(src))]
    labels = [int(src[i]["label"]) for i in range(len(src))]
  texts = [t.encode() if isinstance(t, str) else t for t in texts]  # mock gives str
  np.testing.assert_array_equal(out["inputs"], expected(texts, 64))
  np.testing.assert_array_equal(out["targets"], labels)


def test_tfds_missing(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(DataNotFoundError) as e:
    get_task("text").load("train", data_dir=str(tmp_path), source="tfds")
  assert str(tmp_path) in str(e.value) and "aclImdb" in str(e.value)
