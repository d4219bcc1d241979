"""Shared batching: determinism, resume, sharding, eval padding; the task registry."""

import itertools

import numpy as np
import pytest

from lra_benchmarks.data import Task, get_task
from lra_benchmarks.data import input_pipeline as ip


def make_arrays(n, L=7):
  x = np.zeros((n, L), np.int32)
  x[:, 0] = np.arange(n) + 1  # example id + 1 in column 0
  return {"inputs": x, "targets": (np.arange(n) % 3).astype(np.int32)}


def test_registry():
  names = ["listops", "text", "retrieval", "image", "pathfinder"]
  for name in names:
    t = get_task(name)
    assert isinstance(t, Task) and t.name == name
  assert get_task("retrieval").dual and not get_task("text").dual
  assert get_task("listops").padded and not get_task("image").padded
  assert not get_task("pathfinder").padded
  assert get_task("listops").vocab_size == 17 and get_task("text").vocab_size == 257
  with pytest.raises(ValueError, match="listops"):
    get_task("lisptops")
  with pytest.raises(Exception):
    get_task("text").name = "x"  # frozen


def test_train_batches_deterministic_resume_and_static():
  arrays = make_arrays(37)
  a = list(itertools.islice(ip.train_batches(arrays, 8, seed=1), 12))
  b = list(itertools.islice(ip.train_batches(arrays, 8, seed=1), 12))
  r = list(itertools.islice(ip.train_batches(arrays, 8, seed=1, start_step=5), 7))
  c = list(itertools.islice(ip.train_batches(arrays, 8, seed=2), 12))
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  for x, y in zip(a[5:], r):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  assert any((x["inputs"] != y["inputs"]).any() for x, y in zip(a, c))
  for batch in a:
    assert batch["inputs"].shape == (8, 7) and batch["inputs"].dtype == np.int32
    assert batch["targets"].shape == (8,)
    assert batch["weights"].dtype == np.float32 and np.all(batch["weights"] == 1)
    ids = batch["inputs"][:, 0] - 1
    np.testing.assert_array_equal(batch["targets"], ids % 3)


def test_train_epochs_cover_every_example():
  n, bs = 40, 8  # 5 steps per epoch, exact
  batches = list(itertools.islice(ip.train_batches(make_arrays(n), bs, seed=0), 10))
  ids = np.concatenate([b["inputs"][:, 0] - 1 for b in batches])
  assert sorted(ids[:n].tolist()) == list(range(n))
  assert sorted(ids[n:].tolist()) == list(range(n))
  assert ids[:n].tolist() != ids[n:].tolist()  # reshuffled per epoch
  # Non-divisible size: the stream is a concatenation of permutations, none dropped.
  n = 13
  batches = list(itertools.islice(ip.train_batches(make_arrays(n), 5, seed=0), 13))
  ids = np.concatenate([b["inputs"][:, 0] - 1 for b in batches])
  for e in range(5):
    assert sorted(ids[e * n:(e + 1) * n].tolist()) == list(range(n))
  # Batch bigger than the dataset still works.
  big = next(ip.train_batches(make_arrays(3), 8, seed=0))
  assert big["inputs"].shape == (8, 7)


def test_train_sharding_disjoint_and_complete():
  n, bs, hosts = 48, 4, 3  # global batch 12: 4 steps per epoch
  per_host = [list(itertools.islice(
      ip.train_batches(make_arrays(n), bs, seed=9, process_index=h, process_count=hosts), 4))
              for h in range(hosts)]
  seen = []
  for step in range(4):
    step_ids = [set((per_host[h][step]["inputs"][:, 0] - 1).tolist()) for h in range(hosts)]
    for h1 in range(hosts):
      for h2 in range(h1 + 1, hosts):
        assert not step_ids[h1] & step_ids[h2]
    for s in step_ids:
      seen.extend(s)
  assert sorted(seen) == list(range(n))
  # Host slices are the slices of the single-host global batch.
  glob = next(ip.train_batches(make_arrays(n), bs * hosts, seed=9))
  np.testing.assert_array_equal(
      np.concatenate([per_host[h][0]["inputs"] for h in range(hosts)]), glob["inputs"])


@pytest.mark.parametrize("n,bs,hosts", [(23, 4, 1), (23, 4, 2), (24, 4, 3), (5, 4, 4), (0, 4, 2)])
def test_eval_batches_count_every_example_once(n, bs, hosts):
  arrays = make_arrays(n)
  arrays["inputs2"] = arrays["inputs"] * 2
  counts = np.zeros(n)
  nb = None
  for h in range(hosts):
    batches = list(ip.eval_batches(arrays, bs, process_index=h, process_count=hosts))
    nb = len(batches) if nb is None else nb
    assert len(batches) == nb == -(-n // (bs * hosts))  # same count on every host
    for b in batches:
      assert b["inputs"].shape == (bs, 7) and b["weights"].shape == (bs,)
      w = b["weights"]
      assert set(np.unique(w).tolist()) <= {0.0, 1.0}
      assert np.all(b["inputs"][w == 0] == 0) and np.all(b["targets"][w == 0] == 0)
      assert np.all(b["inputs2"][w == 0] == 0)
      ids = b["inputs"][w == 1, 0] - 1
      np.testing.assert_array_equal(b["targets"][w == 1], ids % 3)
      np.add.at(counts, ids, 1)
  assert np.all(counts == 1)


def test_bad_arguments():
  with pytest.raises(ValueError):
    next(ip.train_batches(make_arrays(4), 0, seed=0))
  with pytest.raises(ValueError):
    next(ip.eval_batches(make_arrays(4), 2, process_index=2, process_count=2))
  with pytest.raises(ValueError, match="disagree"):
    next(ip.eval_batches({"a": np.zeros(3), "b": np.zeros(4)}, 2))
