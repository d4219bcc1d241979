"""Every loader shuffles its splits once: on sources ordered by class, the first evaluation
batches are a balanced random sample, and the same one on every load.

A prefix of k examples of a uniformly shuffled split is a sample without replacement, so the
count of class c (population N, fraction p) is hypergeometric with mean k p and variance
k p (1 - p) (N - k) / (N - 1); ``assert_prefix_balanced`` allows 4 standard deviations (a
false alarm has probability below 1e-4 per class, and the seeds are fixed). Each test also
checks that the unshuffled prefix fails the same bound, so the fixture is ordered enough for
the check to mean something.
"""

import numpy as np
import pytest

from configs import base_text
from lra_benchmarks.data import get_task, input_pipeline, text
from test_data_image import write_batches
from test_data_pathfinder import write_pathfinder

SIGMAS = 4.0


def prefix_balanced(prefix: np.ndarray, population: np.ndarray) -> bool:
  """True if every class count of ``prefix`` is within ``SIGMAS`` hypergeometric standard
  deviations of its mean, for a prefix drawn without replacement from ``population``."""
  n, k = population.size, prefix.size
  for c, n_c in zip(*np.unique(population, return_counts=True)):
    p = n_c / n
    sd = np.sqrt(k * p * (1 - p) * (n - k) / max(n - 1, 1))
    if abs(int((prefix == c).sum()) - k * p) > SIGMAS * sd + 1e-9:
      return False
  return True


def check_split(load, split: str, k: int, population: np.ndarray) -> dict[str, np.ndarray]:
  """The first ``k`` targets of the shuffled split are balanced, those of the unshuffled one
  are not, and a second load gives the same order; returns the shuffled split."""
  first = load(split)
  assert prefix_balanced(first["targets"][:k], population)
  assert not prefix_balanced(load(split, shuffle_seed=None)["targets"][:k], population)
  again = load(split)
  for key in first:
    np.testing.assert_array_equal(first[key], again[key])
  return first


def write_aclimdb_by_class(root, split: str, per_class: int) -> None:
  for label, sub in enumerate(("neg", "pos")):
    d = root / "aclImdb" / split / sub
    d.mkdir(parents=True)
    for i in range(per_class):
      (d / f"{i}_{7 * label + 2}.txt").write_bytes(b"great" if label else b"awful")


def test_text_default_config_validates_on_a_balanced_subset(tmp_path):
  """LRA's Text config evaluates num_eval_steps batches: on IMDB's folders (all negatives,
  then all positives) that prefix must hold both classes in proportion."""
  config = base_text.get_config()
  batch = config.eval_batch_size or config.batch_size
  k = config.num_eval_steps * batch
  per_class = 5 * k // 8  # 1.25 k examples: the prefix is a strict subset
  write_aclimdb_by_class(tmp_path, "test", per_class)
  (tmp_path / "aclImdb" / "train").mkdir()
  population = np.repeat([0, 1], per_class)
  load = lambda split, **kw: get_task("text").load(split, data_dir=str(tmp_path), max_length=8,
                                                   **kw)
  validation = check_split(load, "validation", k, population)
  seen = []  # the batches the trainer's partial validation reads
  batches = input_pipeline.eval_batches(validation, batch)
  for _, b in zip(range(config.num_eval_steps), batches):
    seen.append(b["targets"][b["weights"] > 0])
  assert prefix_balanced(np.concatenate(seen), population) and sum(map(len, seen)) == k


def test_text_tfds_order(monkeypatch):
  labels = np.repeat(np.array([0, 1], np.int32), 300)
  monkeypatch.setattr(text, "read_tfds",
                      lambda split, data_dir, download=False: ([b"x%d" % i for i in labels],
                                                               labels))
  load = lambda split, **kw: get_task("text").load(split, source="tfds", max_length=4, **kw)
  check_split(load, "test", 100, labels)


def test_listops_tsv_order(tmp_path):
  rows = ["Source\tTarget"]
  for d in range(10):  # sorted by target, 40 per class
    rows += [f"( ( ( [MAX {d} ) {d} ) ] )\t{d}"] * 40
  for name in ("train", "val", "test"):
    (tmp_path / f"basic_{name}.tsv").write_text("\n".join(rows) + "\n")
  population = np.repeat(np.arange(10), 40)
  load = lambda split, **kw: get_task("listops").load(split, data_dir=str(tmp_path),
                                                      max_length=16, **kw)
  for split in ("validation", "test"):
    check_split(load, split, 100, population)


def test_retrieval_order(tmp_path):
  for name in ("train", "eval", "test"):
    with open(tmp_path / f"new_aan_pairs.{name}.tsv", "w") as f:
      for label in (0, 1):  # all negatives, then all positives
        f.writelines(f"{label}\ta{i}\tb{i}\ttext {i}\tother {i}\n" for i in range(100))
  population = np.repeat([0, 1], 100)
  load = lambda split, **kw: get_task("retrieval").load(split, data_dir=str(tmp_path),
                                                        max_length=8, **kw)
  for split in ("validation", "test"):
    check_split(load, split, 64, population)


def test_image_order(tmp_path):
  """Batch files by class (data_batch_i holds classes 2i-2 and 2i-1, each sorted): the
  validation cut and the test split are random samples."""
  n = 100

  def by_class(name):
    if name == "test_batch":
      return np.repeat(np.arange(10), n // 10)
    i = int(name[-1])  # data_batch_i
    return np.repeat([2 * i - 2, 2 * i - 1], n // 2)

  write_batches(tmp_path, n_per_batch=n, labels_of=by_class)
  train_population = np.repeat(np.arange(10), n // 2)
  load = lambda split, **kw: get_task("image").load(split, data_dir=str(tmp_path), **kw)
  check_split(load, "validation", 40, train_population)
  check_split(load, "test", 40, np.repeat(np.arange(10), n // 10))


def test_pathfinder_order(tmp_path):
  """Metadata files by class (file 0 all negatives, file 1 all positives)."""
  per = 300
  write_pathfinder(tmp_path, per=per, label_of=lambda b, i: b)
  population = np.repeat([0, 1], per)
  load = lambda split: get_task("pathfinder").load(split, data_dir=str(tmp_path), cache=False)
  for split in ("validation", "test"):
    first = load(split)
    assert first["targets"].size == 60 and prefix_balanced(first["targets"][:40], population)
    again = load(split)
    np.testing.assert_array_equal(first["inputs"], again["inputs"])
    np.testing.assert_array_equal(first["targets"], again["targets"])
  # Cut in file order, validation would be a single class.
  assert not prefix_balanced(population[480:520], population)


def test_prefix_balanced_is_a_real_bound():
  population = np.repeat([0, 1], 500)
  assert prefix_balanced(population[:0], population)  # an empty prefix
  assert not prefix_balanced(population[:100], population)
  rng = np.random.default_rng(0)
  assert prefix_balanced(rng.permutation(population)[:100], population)
  with pytest.raises(AssertionError):
    check_split(lambda split, shuffle_seed=0: {"targets": population}, "test", 100, population)
