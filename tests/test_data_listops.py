"""ListOps: exact generator, TSV reader, parse cache, cached generation."""

import os
import warnings

import numpy as np
import pytest

from lra_benchmarks.data import common, get_task, listops
from lra_benchmarks.data.common import DataNotFoundError, MalformedDataError

ID_TO_TOKEN = {v: k for k, v in listops.VOCAB.items()}


def lra_tree(ids):
  """Rebuilds LRA's nested-tuple tree from our preorder token ids."""
  pos = 0

  def node():
    nonlocal pos
    tok = ID_TO_TOKEN[int(ids[pos])]
    pos += 1
    if tok.startswith("["):
      args = []
      while ID_TO_TOKEN[int(ids[pos])] != "X":
        args.append(node())
      pos += 1
      t = (tok, args[0])
      for a in args[1:]:
        t = (t, a)
      return (t, "]")
    return int(tok)

  t = node()
  assert pos == len(ids)
  return t


def lra_to_string(t):  # LRA's to_string, parens=True
  if isinstance(t, str):
    return t
  if isinstance(t, int):
    return str(t)
  return "( " + lra_to_string(t[0]) + " " + lra_to_string(t[1]) + " )"


def lra_length(t):
  if isinstance(t, (int, str)):  # a value, an operator or "]"
    return 1
  return lra_length(t[0]) + lra_length(t[1])


@pytest.fixture(scope="module")
def small():
  return listops.generate(seed=3, num_train=150, num_val=25, num_test=25, workers=1,
                          progress=False)


def test_generated_labels_lengths_and_text(small):
  for split, n in (("train", 150), ("validation", 25), ("test", 25)):
    d = small[split]
    assert d["lengths"].shape == (n,) and d["targets"].shape == (n,) and len(d["lines"]) == n
    assert np.all((d["lengths"] > 500) & (d["lengths"] < 2000))
    offs = np.concatenate([[0], np.cumsum(d["lengths"])])
    for i in range(n):
      ids = d["tokens"][offs[i]:offs[i + 1]]
      line = d["lines"][i]
      # The evaluator on LRA's text gives the label.
      assert listops.evaluate_text(line) == d["targets"][i]
      # The text is exactly LRA's to_string of the tree; its length is LRA's length.
      t = lra_tree(ids)
      assert lra_to_string(t) == line
      assert lra_length(t) == d["lengths"][i]
      # LRA tokenisation of the text gives our ids.
      toks = line.replace("]", "X").replace("(", "").replace(")", "").split()
      assert [listops.VOCAB[x] for x in toks] == ids.tolist()


def test_all_classes_and_dedup():
  res = listops.generate_chunk(0, 0)  # one chunk: ~1300 trees
  assert np.all(np.bincount(res["targets"], minlength=10) > 0)
  d = listops.generate(seed=5, num_train=300, num_val=0, num_test=0, workers=1,
                       progress=False)["train"]
  offs = np.concatenate([[0], np.cumsum(d["lengths"])])
  keys = {d["tokens"][offs[i]:offs[i + 1]].tobytes() for i in range(300)}
  assert len(keys) == 300


def test_dedup_removes_repeats():
  # Tiny bounds make repeats certain: every kept tree must still be unique.
  d = listops.generate(seed=0, num_train=30, num_val=0, num_test=0, workers=1,
                       progress=False, render=False)
  assert d["train"]["lengths"].size == 30
  res = listops.generate_chunk(0, 0, 2000, min_length=0, max_length=4)
  offs = np.concatenate([[0], np.cumsum(res["lengths"])])
  raw = [res["tokens"][offs[i]:offs[i + 1]].tobytes() for i in range(res["lengths"].size)]
  assert len(set(raw)) < len(raw)  # bare values repeat
  for t, line in zip(res["targets"][:20], res["lines"][:20]):
    assert listops.evaluate_text(line) == t


def test_same_seed_same_output_and_worker_independent(small):
  again = listops.generate(seed=3, num_train=150, num_val=25, num_test=25, workers=2,
                           progress=False)
  for split in small:
    for k in ("tokens", "lengths", "targets"):
      np.testing.assert_array_equal(small[split][k], again[split][k])
    assert small[split]["lines"] == again[split]["lines"]
  other = listops.generate(seed=4, num_train=20, num_val=0, num_test=0, workers=1,
                           progress=False)
  assert other["train"]["lines"] != small["train"]["lines"][:20]


def test_median_is_int_of_numpy_median():
  # [MED 1 2 3 4] -> int(2.5) = 2; [MED 7 8] -> 7; SM 9 9 9 -> 7.
  line = "( ( ( ( ( [MED 1 ) 2 ) 3 ) 4 ) ] )"
  assert listops.evaluate_text(line) == 2
  ids, lens = listops.tokenize_sources([line.encode()])
  assert lens.tolist() == [6]
  assert ids.tolist() == [listops.VOCAB["[MED"], 2, 3, 4, 5, listops.X_ID]


def test_generator_values_match_reference_evaluator_on_many_trees():
  res = listops.generate_chunk(11, 2, 4000, min_length=10, max_length=400)
  assert res["lengths"].size > 100
  for line, t in zip(res["lines"], res["targets"]):
    assert listops.evaluate_text(line) == t


def write_tsv(path, rows, header=True, crlf=True):
  end = "\r\n" if crlf else "\n"
  with open(path, "w", newline="") as f:
    if header:
      f.write("Source\tTarget" + end)
    for s, t in rows:
      f.write(f"{s}\t{t}{end}")


def test_tsv_loader(tmp_path, small):
  d = tmp_path / "listops-1000"
  d.mkdir()
  for split, fname in (("train", "train"), ("validation", "val"), ("test", "test")):
    write_tsv(d / f"basic_{fname}.tsv", zip(small[split]["lines"], small[split]["targets"]),
              crlf=(split != "test"))
  task = get_task("listops")
  for split in ("train", "validation", "test"):
    out = task.load(split, data_dir=str(tmp_path), shuffle_seed=None)  # parent of listops-1000
    x, y = out["inputs"], out["targets"]
    assert x.dtype == np.int32 and y.dtype == np.int32
    assert x.shape == (len(small[split]["lines"]), 2000)
    np.testing.assert_array_equal(y, small[split]["targets"])
    np.testing.assert_array_equal((x != 0).sum(1), small[split]["lengths"])
    offs = np.concatenate([[0], np.cumsum(small[split]["lengths"])])
    for i in range(3):
      n = small[split]["lengths"][i]
      np.testing.assert_array_equal(x[i, :n], small[split]["tokens"][offs[i]:offs[i + 1]])
      assert np.all(x[i, n:] == 0)
    assert x.max() < task.vocab_size
  short = task.load("train", data_dir=str(d), max_length=600)
  assert short["inputs"].shape == (150, 600)
  full = task.load("train", data_dir=str(d))
  np.testing.assert_array_equal(short["inputs"], full["inputs"][:, :600])


def test_tsv_parse_cache(tmp_path, small, monkeypatch):
  """The first load parses the TSV and caches its arrays next to it; the second reads the
  cache; a changed TSV is parsed again."""
  rows = list(zip(small["train"]["lines"], small["train"]["targets"]))
  tsv = tmp_path / "basic_train.tsv"
  write_tsv(tsv, rows)
  task = get_task("listops")
  first = task.load("train", data_dir=str(tmp_path))
  assert os.path.exists(str(tsv) + listops.TSV_CACHE_SUFFIX)

  def no_parse(path):
    raise AssertionError(f"parsed {path} again")
  monkeypatch.setattr(listops, "read_tsv", no_parse)
  second = task.load("train", data_dir=str(tmp_path))
  for key in first:
    np.testing.assert_array_equal(first[key], second[key])
  write_tsv(tsv, rows[:-1])  # new size and time: the cache is stale
  with pytest.raises(AssertionError, match="parsed"):
    task.load("train", data_dir=str(tmp_path))
  monkeypatch.undo()
  assert task.load("train", data_dir=str(tmp_path))["targets"].shape == (len(rows) - 1,)


def test_tsv_parse_cache_unwritable(tmp_path, small, monkeypatch):
  write_tsv(tmp_path / "basic_train.tsv", zip(small["train"]["lines"], small["train"]["targets"]))
  write_tsv(tmp_path / "basic_test.tsv", zip(small["test"]["lines"], small["test"]["targets"]))

  def read_only(path, **arrays):
    raise PermissionError(f"read-only: {path}")
  monkeypatch.setattr(common, "save_npz_atomic", read_only)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    outs = [get_task("listops").load(s, data_dir=str(tmp_path), shuffle_seed=None)
            for s in ("train", "test", "train")]
  assert len([w for w in caught if "parse cache" in str(w.message)]) == 1  # said once
  np.testing.assert_array_equal(outs[0]["targets"], small["train"]["targets"])
  np.testing.assert_array_equal(outs[1]["targets"], small["test"]["targets"])
  assert not [n for n in os.listdir(tmp_path) if n.endswith(".npz")]


def test_tsv_errors(tmp_path):
  task = get_task("listops")
  with pytest.raises(DataNotFoundError) as e:
    task.load("train", data_dir=str(tmp_path))
  msg = str(e.value)
  assert "listops" in msg and str(tmp_path) in msg and "lra_release" in msg
  write_tsv(tmp_path / "basic_train.tsv",
            [("( ( [MAX 2 ) 3 ) ] )", 3), ("( ( [MAX 2 ) 3 ) ] )", 3), ("( ( [MAX 2 ) 3 ) ] )", 3),
             ("( ( [MUL 2 ) 3 ) ] )", 6)])
  with pytest.raises(MalformedDataError, match=r"basic_train.tsv:5: unknown ListOps token '\[MUL'"):
    task.load("train", data_dir=str(tmp_path))
  write_tsv(tmp_path / "basic_train.tsv", [("( [MAX 2 ] )", "x")])
  with pytest.raises(MalformedDataError, match=r"basic_train.tsv:2: target"):
    task.load("train", data_dir=str(tmp_path))
  write_tsv(tmp_path / "basic_train.tsv", [("( [MAX 2 ] )", 2)], header=False)
  with pytest.raises(MalformedDataError, match=r"basic_train.tsv:1: expected the header"):
    task.load("train", data_dir=str(tmp_path))


def test_generated_cache(tmp_path):
  kw = dict(cache_dir=str(tmp_path / "a"), num_train=40, num_val=10, num_test=10, seed=7,
            workers=1, progress=False)
  task = get_task("listops")
  train = task.load("train", **kw)
  test = task.load("test", **kw)
  assert train["inputs"].shape == (40, 2000) and test["inputs"].shape == (10, 2000)
  gen_dir = listops.generated_dir(7, 40, 10, 10, str(tmp_path / "a"))
  assert sorted(os.listdir(gen_dir)) == ["basic_test.tsv", "basic_train.tsv", "basic_val.tsv",
                                         "info.json", "tokens.npz"]
  # The TSVs in the cache read back to the same arrays.
  from_tsv = task.load("train", data_dir=gen_dir)
  np.testing.assert_array_equal(from_tsv["inputs"], train["inputs"])
  np.testing.assert_array_equal(from_tsv["targets"], train["targets"])
  # Same seed, other cache dir: byte-identical files.
  kw["cache_dir"] = str(tmp_path / "b")
  task.load("validation", **kw)
  other = listops.generated_dir(7, 40, 10, 10, str(tmp_path / "b"))
  for name in ("basic_train.tsv", "basic_val.tsv", "basic_test.tsv"):
    assert (open(os.path.join(gen_dir, name), "rb").read()
            == open(os.path.join(other, name), "rb").read())


def test_cache_env_var(tmp_path, monkeypatch):
  monkeypatch.setenv("SPECTRAFORMER_JAX_CACHE", str(tmp_path))
  assert listops.default_cache_dir() == os.path.join(str(tmp_path), "listops")
