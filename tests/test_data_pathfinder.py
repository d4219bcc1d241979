"""Pathfinder on a folder in LRA's layout: PNGs + text metadata in .npy files."""

import numpy as np
import pytest
from PIL import Image

from lra_benchmarks.data import get_task
from lra_benchmarks.data.common import DataNotFoundError, MalformedDataError


def write_pathfinder(root, resolution=32, sub="curv_contour_length_14", n_files=2, per=10,
                     empty=(), label_of=None):
  """LRA's layout with random PNGs; labels random, or ``label_of(file, index)``."""
  base = root / f"pathfinder{resolution}" / sub
  (base / "metadata").mkdir(parents=True)
  rng = np.random.default_rng(0)
  images, labels = {}, {}
  for b in range(n_files):
    (base / "imgs" / str(b)).mkdir(parents=True)
    lines = []
    for i in range(per):
      img = rng.integers(0, 256, size=(resolution, resolution), dtype=np.uint8)
      path = base / "imgs" / str(b) / f"sample_{i}.png"
      if (b, i) in empty:
        path.write_bytes(b"")
      else:
        Image.fromarray(img, mode="L").save(path)
        images[(b, i)] = img.reshape(-1)
      label = int(rng.integers(0, 2)) if label_of is None else label_of(b, i)
      labels[(b, i)] = label
      lines.append(f"imgs/{b} sample_{i}.png {i} {label} 1.8 2 0.5 14 0")
    (base / "metadata" / f"{b}.npy").write_text("\n".join(lines) + "\n")
  return base, images, labels


def test_pathfinder_splits_tokens_labels(tmp_path):
  base, images, labels = write_pathfinder(tmp_path, empty=[(1, 3)])
  task = get_task("pathfinder")
  kw = dict(data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))
  out = {s: task.load(s, **kw) for s in ("train", "validation", "test")}
  n = 19  # 20 listed, one empty PNG dropped
  assert [out[s]["inputs"].shape[0] for s in out] == [15, 2, 2]  # floor 80% / 90%
  by_pixels = {v.tobytes(): labels[k] for k, v in images.items()}
  seen = set()
  for s in out:
    x, y = out[s]["inputs"], out[s]["targets"]
    assert x.dtype == np.int32 and x.shape[1] == 1024 and x.max() <= 255
    for row, lab in zip(x, y):
      key = row.astype(np.uint8).tobytes()
      assert by_pixels[key] == lab
      seen.add(key)
  assert len(seen) == n
  # Cached decode gives the same arrays; other data_dir forms find the folder.
  again = task.load("train", data_dir=str(base), cache_dir=str(tmp_path / "cache"))
  np.testing.assert_array_equal(again["inputs"], out["train"]["inputs"])
  nocache = task.load("train", data_dir=str(tmp_path / "pathfinder32"), cache=False)
  np.testing.assert_array_equal(nocache["inputs"], out["train"]["inputs"])


def test_pathfinder_resolution_difficulty(tmp_path):
  write_pathfinder(tmp_path, resolution=64, sub="curv_baseline", n_files=1, per=10)
  out = get_task("pathfinder").load("test", data_dir=str(tmp_path), resolution=64,
                                    difficulty="easy", cache=False)
  assert out["inputs"].shape == (1, 4096)
  with pytest.raises(DataNotFoundError, match="curv_contour_length_14"):
    get_task("pathfinder").load("test", data_dir=str(tmp_path), resolution=64)
  with pytest.raises(ValueError, match="resolution"):
    get_task("pathfinder").load("test", data_dir=str(tmp_path), resolution=48)
  with pytest.raises(ValueError, match="4096"):
    get_task("pathfinder").load("test", data_dir=str(tmp_path), resolution=64,
                                difficulty="easy", max_length=1024)


def test_pathfinder_malformed_metadata(tmp_path):
  base, _, _ = write_pathfinder(tmp_path, n_files=1, per=3)
  (base / "metadata" / "0.npy").write_text("imgs/0 sample_0.png 0 1\nimgs/0 sample_1.png\n")
  with pytest.raises(MalformedDataError, match=r"0.npy:2"):
    get_task("pathfinder").load("train", data_dir=str(tmp_path), cache=False)
