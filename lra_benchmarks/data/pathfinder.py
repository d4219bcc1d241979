"""Pathfinder (and Path-X), pixels as tokens, from LRA's release layout.

Layout: ``<root>/pathfinder{R}/{curv_baseline, curv_contour_length_9,
curv_contour_length_14}/`` (difficulty easy / intermediate / hard; LRA's
Pathfinder is ``pathfinder32`` hard, Path-X is ``pathfinder128`` hard), each with
``metadata/*.npy`` and ``imgs/<batch>/sample_<i>.png``. Despite the suffix the
metadata files are text: one image per line, space-separated, field 0 the image
folder (``imgs/<batch>``), field 1 the file name, field 3 the label (0/1), as
LRA's tfds builder reads them. Empty (0-byte) PNGs are skipped, as LRA filters
them. ``data_dir`` may be ``<root>``, ``<root>/pathfinder{R}`` or the curv folder.

Tokens: grayscale pixel values 0..255 of the R x R PNG (read with Pillow,
converted to mode "L" if needed) in row-major order, length R*R (1024 for
R = 32), vocab 256, no padding. Splits (LRA: ``[:80%]``, ``[80%:90%]``,
``[90%:]`` of tfds' shuffled order): examples in metadata order (files sorted
by number), permuted with ``split_seed`` (default ``common.SHUFFLE_SEED``), then train = first
floor(0.8 N), validation = up to floor(0.9 N), test = the rest. The permutation is also the
one-time shuffle of every split: the metadata lists examples in file order, and any prefix of
a split is a random sample of the set.

Decoded images are cached (``cache=True``) as one ``.npz`` per folder under
``$SPECTRAFORMER_JAX_CACHE/pathfinder``, keyed by the folder's path and its
metadata files' sizes and times.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os

import numpy as np

from lra_benchmarks.data import common

VOCAB_SIZE = 256
NUM_CLASSES = 2
RESOLUTIONS = (32, 64, 128, 256)
DIFFICULTIES = {"easy": "curv_baseline", "intermediate": "curv_contour_length_9",
                "hard": "curv_contour_length_14"}


def find_dir(data_dir: str, resolution: int, difficulty: str) -> str:
  """The curv folder (holding ``metadata/``) for ``resolution`` and ``difficulty``.

  Tries ``data_dir/pathfinder{R}/<curv>``, ``data_dir/lra_release/pathfinder{R}/<curv>``,
  ``data_dir/<curv>`` and ``data_dir`` itself (only if named ``<curv>``).

  Raises:
    KeyError: ``difficulty`` is not a key of ``DIFFICULTIES``.
    DataNotFoundError: none of those has ``metadata/``.
  """
  sub = DIFFICULTIES[difficulty]
  tried = []
  for d in (os.path.join(data_dir, f"pathfinder{resolution}", sub),
            os.path.join(data_dir, "lra_release", f"pathfinder{resolution}", sub),
            os.path.join(data_dir, sub), data_dir):
    tried.append(os.path.join(d, "metadata"))
    if os.path.isdir(os.path.join(d, "metadata")) and (
        d != data_dir or os.path.basename(os.path.normpath(d)) == sub):
      return d
  raise common.missing("pathfinder", tried, common.LRA_RELEASE_HOW)


def read_metadata(folder: str) -> tuple[list[str], np.ndarray]:
  """Reads ``folder/metadata/*.npy`` (text; files in numeric order).

  Returns:
    (PNG paths under ``folder``, labels int32 ``[N]``), in metadata order.

  Raises:
    DataNotFoundError: no ``.npy`` metadata file.
    MalformedDataError: a line lacks 4 fields or its label is not 0/1.
  """
  meta_dir = os.path.join(folder, "metadata")
  files = sorted((n for n in os.listdir(meta_dir) if n.endswith(".npy")), key=common.numeric_key)
  if not files:
    raise common.missing("pathfinder", [os.path.join(meta_dir, "*.npy")], common.LRA_RELEASE_HOW)
  paths, labels = [], []
  for name in files:
    mpath = os.path.join(meta_dir, name)
    with open(mpath, "rb") as f:
      lines = f.read().decode("utf-8", "replace").split("\n")
    for i, line in enumerate(lines, start=1):
      if not line.strip():
        continue
      m = line.split()
      if len(m) < 4 or m[3] not in ("0", "1"):
        raise common.MalformedDataError(
            f"{mpath}:{i}: expected '<imgs folder> <file.png> <index> <label 0/1> ...', "
            f"got {line[:80]!r}")
      paths.append(os.path.join(folder, m[0], m[1]))
      labels.append(int(m[3]))
  return paths, np.array(labels, dtype=np.int32)


def _decode(path: str, resolution: int) -> np.ndarray | None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise common.MalformedDataError(f"{path}: listed in metadata but missing")
  if os.path.getsize(path) == 0:
    return None  # LRA drops empty images
  with Image.open(path) as im:
    if im.mode != "L":
      im = im.convert("L")
    a = np.asarray(im, dtype=np.uint8)
  if a.shape != (resolution, resolution):
    raise common.MalformedDataError(
        f"{path}: image is {a.shape}, expected ({resolution}, {resolution})")
  return a.reshape(-1)


def _stamp(folder: str, resolution: int) -> str:
  meta_dir = os.path.join(folder, "metadata")
  h = hashlib.sha1(f"{os.path.abspath(folder)}|{resolution}|v1".encode())
  for n in sorted(os.listdir(meta_dir)):
    st = os.stat(os.path.join(meta_dir, n))
    h.update(f"{n}:{st.st_size}:{st.st_mtime_ns}".encode())
  return h.hexdigest()[:20]


def read_folder(folder: str, resolution: int, *, cache: bool = True,
                cache_dir: str | None = None,
                workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """-> (uint8 [N, R*R], int32 [N]) in metadata order, empty images dropped."""
  cpath = None
  if cache:
    cache_dir = cache_dir or os.path.join(common.cache_root(), "pathfinder")
    cpath = os.path.join(cache_dir, f"{_stamp(folder, resolution)}.npz")
    if os.path.exists(cpath):
      with np.load(cpath) as z:
        return z["images"], z["labels"]
  paths, labels = read_metadata(folder)
  workers = workers or min(32, (os.cpu_count() or 1) * 2)
  with concurrent.futures.ThreadPoolExecutor(workers) as ex:
    imgs = list(ex.map(lambda p: _decode(p, resolution), paths, chunksize=256))
  keep = np.array([im is not None for im in imgs], dtype=bool)
  images = (np.stack([im for im in imgs if im is not None]) if keep.any()
            else np.zeros((0, resolution * resolution), np.uint8))
  labels = labels[keep]
  if cpath is not None:
    os.makedirs(os.path.dirname(cpath), exist_ok=True)
    common.save_npz_atomic(cpath, images=images, labels=labels)
  return images, labels


def split_indices(n: int, split: str, split_seed: int = common.SHUFFLE_SEED) -> np.ndarray:
  """int64 indices into ``range(n)`` of ``split``: a ``split_seed`` permutation cut
  80% / 10% / 10% into train / validation / test (KeyError for another split)."""
  perm = np.random.default_rng(split_seed).permutation(n)
  a, b = (n * 8) // 10, (n * 9) // 10
  return {"train": perm[:a], "validation": perm[a:b], "test": perm[b:]}[split]


def load(split: str, *, data_dir: str | None = None, max_length: int | None = None,
         resolution: int = 32, difficulty: str = "hard",
         split_seed: int = common.SHUFFLE_SEED,
         cache: bool = True, cache_dir: str | None = None, workers: int | None = None,
         dtype=np.int32) -> dict[str, np.ndarray]:
  """Loads one split as pixel tokens (see the module docstring for the layout).

  Args:
    split: "train", "validation" or "test".
    data_dir: ``<root>``, ``<root>/pathfinder{R}`` or the curv folder (required).
    max_length: None or ``resolution ** 2`` (the only valid length).
    resolution: image side R, one of ``RESOLUTIONS``.
    difficulty: "easy", "intermediate" or "hard".
    split_seed: seed of the permutation that cuts the splits.
    cache: read / write decoded images under ``cache_dir``.
    cache_dir: default ``$SPECTRAFORMER_JAX_CACHE/pathfinder``.
    workers: PNG decoding threads.
    dtype: dtype of "inputs".

  Returns:
    {"inputs": ``dtype [N, R*R]`` values 0..255, "targets": int32 ``[N]``}.

  Raises:
    ValueError: bad ``split``, ``resolution``, ``difficulty`` or ``max_length``.
    DataNotFoundError: ``data_dir`` is None or holds no such folder.
    MalformedDataError: metadata does not parse, or a listed PNG is missing or
      not R x R.
  """
  common.check_split(split)
  if resolution not in RESOLUTIONS:
    raise ValueError(f"pathfinder: resolution must be one of {RESOLUTIONS}, got {resolution}")
  if difficulty not in DIFFICULTIES:
    raise ValueError(f"pathfinder: difficulty must be one of {list(DIFFICULTIES)}, "
                     f"got {difficulty!r}")
  seq = resolution * resolution
  if max_length is not None and int(max_length) != seq:
    raise ValueError(f"pathfinder: max_length must be {seq} ({resolution} x {resolution} "
                     f"pixels), got {max_length}")
  if data_dir is None:
    raise common.missing(
        "pathfinder", [f"<data_dir not given>/pathfinder{resolution}/{DIFFICULTIES[difficulty]}"],
        common.LRA_RELEASE_HOW)
  folder = find_dir(data_dir, resolution, difficulty)
  images, labels = read_folder(folder, resolution, cache=cache, cache_dir=cache_dir,
                               workers=workers)
  idx = split_indices(labels.shape[0], split, split_seed)
  return {"inputs": images[idx].astype(dtype), "targets": labels[idx]}
