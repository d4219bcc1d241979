"""Retrieval (AAN pairs, byte level) on TSVs in LRA's format."""

import numpy as np
import pytest

from lra_benchmarks.data import get_task
from lra_benchmarks.data.common import DataNotFoundError, MalformedDataError

ROWS = [("1.0", "a1", "b1", "first paper text", "second \"quoted\" text"),
        ("0", "a2", "b2", "x" * 30, "short"),
        ("0.0", "a3", "b3", "", "y")]


def write(path, rows):
  path.write_bytes(b"".join("\t".join(r).encode() + b"\n" for r in rows))


def enc(t, L):
  out = np.zeros(L, np.int32)
  b = t.encode()[:L]
  out[:len(b)] = np.frombuffer(b, np.uint8) + 1
  return out


def test_retrieval(tmp_path):
  d = tmp_path / "tsv_data"
  d.mkdir()
  for name in ("train", "eval", "test"):
    write(d / f"new_aan_pairs.{name}.tsv", ROWS if name != "test" else ROWS[:1])
  task = get_task("retrieval")
  out = task.load("train", data_dir=str(tmp_path), max_length=20, shuffle_seed=None)
  assert set(out) == {"inputs1", "inputs2", "targets"}
  np.testing.assert_array_equal(out["targets"], [1, 0, 0])
  for i, r in enumerate(ROWS):
    np.testing.assert_array_equal(out["inputs1"][i], enc(r[3], 20))
    np.testing.assert_array_equal(out["inputs2"][i], enc(r[4], 20))
  assert out["inputs1"].dtype == np.int32 and out["inputs1"].shape == (3, 20)
  assert task.load("validation", data_dir=str(d))["inputs1"].shape == (3, 4000)
  assert task.load("test", data_dir=str(d))["targets"].tolist() == [1]


def test_retrieval_errors(tmp_path):
  with pytest.raises(DataNotFoundError, match="retrieval"):
    get_task("retrieval").load("train", data_dir=str(tmp_path))
  with pytest.raises(DataNotFoundError, match="retrieval"):
    get_task("retrieval").load("train")
  write(tmp_path / "new_aan_pairs.train.tsv", ROWS + [("1", "only", "three")])
  with pytest.raises(MalformedDataError, match=r"new_aan_pairs.train.tsv:4: expected 5"):
    get_task("retrieval").load("train", data_dir=str(tmp_path))
  write(tmp_path / "new_aan_pairs.train.tsv", [("yes", "a", "b", "c", "d")])
  with pytest.raises(MalformedDataError, match=r"train.tsv:1: label"):
    get_task("retrieval").load("train", data_dir=str(tmp_path))
