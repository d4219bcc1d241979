"""ListOps: a loader for LRA's TSVs and an exact, seeded, vectorised generator.

Grammar and distribution (LRA ``lra_benchmarks/data/listops.py``, basic task):
the tree starts at depth 1; below ``max_depth`` (10) a node is a value with
probability 0.75 (LRA draws ``r = random()`` and makes a value iff ``r > 0.25``),
otherwise an operator drawn uniformly from MIN, MAX, MED, SM with
``randint(2, max_args)`` (2..10 inclusive) children; at ``max_depth`` every node
is a value. Values are uniform on 0..9. MED is ``int(median)`` (the floor of the
mean of the middle two for an even count), SM is the sum mod 10. The length
counts values, operators and the closing ``]`` (not the parentheses); a tree is
kept iff ``500 < length < 2000``. A set is deduplicated (LRA: a Python set of
trees over all splits, unseeded); here the stream is seeded and deduplicated in
order, and split train / val / test in that order (96000 / 2000 / 2000).

Text format (LRA's ``to_string``): an operator with arguments a1..ak is written
``( ( ... ( [OP a1 ) a2 ) ... ak ) ] )`` with k + 1 opening parentheses.

Tokens (LRA's ListOps input pipeline): ``]`` is renamed ``X`` and ``(`` ``)`` are
deleted, then the text is split on whitespace and encoded by a
``TokenTextEncoder`` over the 15 tokens seen (pad 0, OOV last, vocab 17). LRA
builds that list from a Python set, so its id order changes with the hash seed;
ours is fixed (sorted): pad 0, "0".."9" -> 1..10, "X" -> 11, "[MAX" -> 12,
"[MED" -> 13, "[MIN" -> 14, "[SM" -> 15, OOV 16 (reserved, never produced: an
unknown token in a TSV is reported as malformed instead).

A TSV is parsed once: its token arrays are kept next to it in ``<file>.tokens.npz``, keyed by
the TSV's size and modification time. Every split is shuffled once with ``shuffle_seed``
(default ``common.SHUFFLE_SEED``), so any prefix of it is a random sample.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from typing import Any, Sequence
import warnings
import zipfile

import numpy as np

from lra_benchmarks.data import common

# ---------------------------------------------------------------- vocabulary
PAD_ID = 0
TOKENS = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "X", "[MAX", "[MED", "[MIN", "[SM")
VOCAB = {t: i + 1 for i, t in enumerate(TOKENS)}
OOV_ID = len(TOKENS) + 1
VOCAB_SIZE = len(TOKENS) + 2  # pad + 15 tokens + OOV = 17
X_ID = VOCAB["X"]
NUM_CLASSES = 10

# LRA's generator constants (basic task).
OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")  # LRA order; drawn uniformly
OP_IDS = np.array([VOCAB[o] for o in OPERATORS], dtype=np.uint8)
VALUE_P = 0.25
MAX_DEPTH = 10
MAX_ARGS = 10
MIN_LENGTH = 500  # exclusive
MAX_LENGTH = 2000  # exclusive
NUM_TRAIN, NUM_VAL, NUM_TEST = 96000, 2000, 2000
DEFAULT_MAX_LENGTH = 2000

CHUNK = 16384  # candidate trees per seeded chunk; part of the seed -> data contract
FORMAT_VERSION = 1

_SPLIT_FILE = {"train": "train", "validation": "val", "test": "test"}
HEADER = "Source\tTarget"

# Render table: code -> text of one token in LRA's parenthesised format.
#   0..9   value d that is an argument:          "d )"
#   10     "]" closing the root:                 "] )"
#   11     "]" closing an argument operator:     "] ) )"
#   12 + (max_args - 1) * op + (k - 2): operator with k args: "( " * (k + 1) + OP
#   12 + 4 * (max_args - 1) + d: a root that is a bare value: "d"
def _render_table(max_args: int) -> np.ndarray:
  table = ([f"{d} )" for d in range(10)] + ["] )", "] ) )"]
           + [("( " * (k + 1)) + op for op in OPERATORS for k in range(2, max_args + 1)]
           + [str(d) for d in range(10)])
  return np.array(table, dtype=object)


# ---------------------------------------------------------------- generator
def generate_chunk(seed: int, chunk: int, num_candidates: int = CHUNK, *,
                   max_depth: int = MAX_DEPTH, max_args: int = MAX_ARGS,
                   min_length: int = MIN_LENGTH, max_length: int = MAX_LENGTH,
                   render: bool = True) -> dict[str, Any]:
  """Draws ``num_candidates`` trees from the LRA distribution and keeps those in bounds.

  Trees are grown breadth-first for all candidates at once (the draws are
  independent, so the distribution is LRA's depth-first one). Returns the kept
  trees in candidate order: flat uint8 token ids, lengths, targets and (if
  ``render``) the LRA text of each tree.
  """
  rng = np.random.default_rng([int(seed), int(chunk)])
  n_cand = int(num_candidates)
  # Per level: tree id, parent index (into previous level), is_op, and per-op / per-leaf draws.
  lv_tree, lv_parent, lv_op, lv_k, lv_ot, lv_val = [], [], [], [], [], []
  tree = np.arange(n_cand, dtype=np.int64)
  parent = np.full(n_cand, -1, dtype=np.int64)
  length = np.zeros(n_cand, dtype=np.int64)
  for depth in range(1, max_depth + 1):
    n = tree.size
    if depth < max_depth:
      op = rng.random(n) <= VALUE_P  # LRA: value iff r > VALUE_P
    else:
      op = np.zeros(n, dtype=bool)
    n_op = int(op.sum())
    k = rng.integers(2, max_args + 1, size=n_op)
    ot = rng.integers(0, len(OPERATORS), size=n_op)
    val = rng.integers(0, 10, size=n - n_op)
    length += np.bincount(tree, weights=op.astype(np.float64) + 1.0,
                          minlength=n_cand).astype(np.int64)
    lv_tree.append(tree)
    lv_parent.append(parent)
    lv_op.append(op)
    lv_k.append(k)
    lv_ot.append(ot)
    lv_val.append(val)
    if n_op == 0:
      break
    parent = np.repeat(np.flatnonzero(op), k)
    tree = tree[parent]

  accept = (length > min_length) & (length < max_length)
  acc_ord = np.cumsum(accept) - 1
  n_acc = int(accept.sum())
  lengths = length[accept]

  # Restrict every level to the accepted trees and re-index parents.
  levels = []
  prev_new = None
  for d in range(len(lv_tree)):
    m = accept[lv_tree[d]]
    if not m.any():
      break
    op = lv_op[d]
    par = lv_parent[d][m]
    if d > 0:
      par = prev_new[par]
    levels.append(dict(tree=acc_ord[lv_tree[d][m]], parent=par, op=op[m],
                       k=lv_k[d][m[op]], ot=lv_ot[d][m[op]], val=lv_val[d][m[~op]]))
    prev_new = np.cumsum(m) - 1

  # Bottom-up: subtree token counts and values.
  size_next = val_next = parent_next = None
  for d in range(len(levels) - 1, -1, -1):
    L = levels[d]
    n = L["op"].size
    size = np.where(L["op"], 2, 1).astype(np.int64)
    value = np.zeros(n, dtype=np.int64)
    value[~L["op"]] = L["val"]
    op_idx = np.flatnonzero(L["op"])
    if op_idx.size:
      size += np.bincount(parent_next, weights=size_next, minlength=n).astype(np.int64)
      firsts = np.searchsorted(parent_next, op_idx, side="left")
      k = L["k"]
      cv = val_next
      mn = np.minimum.reduceat(cv, firsts)
      mx = np.maximum.reduceat(cv, firsts)
      sm = np.add.reduceat(cv, firsts) % 10
      sv = np.sort(parent_next * 16 + cv) % 16  # sorted within each sibling group
      med = (sv[firsts + (k - 1) // 2] + sv[firsts + k // 2]) // 2  # int(np.median)
      value[op_idx] = np.choose(L["ot"], [mn, mx, med, sm])
      L["firsts"] = firsts
    L["size"] = size
    L["value"] = value
    size_next, val_next, parent_next = size, value, L["parent"]

  total = int(lengths.sum())
  tokens = np.zeros(total, dtype=np.uint8)
  codes = np.zeros(total, dtype=np.int16) if render else None
  targets = levels[0]["value"].astype(np.int8) if levels else np.zeros(0, np.int8)
  n_ops_codes = 12 + len(OPERATORS) * (max_args - 1)

  # Top-down: preorder start of every node, then scatter tokens.
  start_prev = None
  for d, L in enumerate(levels):
    if d == 0:
      start = np.cumsum(lengths) - lengths
    else:
      par = L["parent"]
      cs = np.cumsum(L["size"]) - L["size"]
      first = np.searchsorted(par, par, side="left")
      start = start_prev[par] + 1 + cs - cs[first]
    op = L["op"]
    leaf_start = start[~op]
    tokens[leaf_start] = (L["val"] + 1).astype(np.uint8)
    op_start = start[op]
    tokens[op_start] = OP_IDS[L["ot"]]
    close = op_start + L["size"][op] - 1
    tokens[close] = X_ID
    if render:
      codes[leaf_start] = L["val"] + (n_ops_codes if d == 0 else 0)
      codes[op_start] = 12 + L["ot"] * (max_args - 1) + (L["k"] - 2)
      codes[close] = 10 if d == 0 else 11
    start_prev = start

  out = {"tokens": tokens, "lengths": lengths.astype(np.int32), "targets": targets,
         "num_candidates": n_cand}
  if render:
    table = _render_table(max_args)
    offs = np.concatenate([[0], np.cumsum(lengths)])
    pieces = table[codes]
    out["lines"] = [" ".join(pieces[offs[i]:offs[i + 1]].tolist()) for i in range(n_acc)]
  return out


def _chunk_worker(args):
  return args[1], generate_chunk(*args[:3], **args[3])


def generate(seed: int = 0, num_train: int = NUM_TRAIN, num_val: int = NUM_VAL,
             num_test: int = NUM_TEST, *, max_depth: int = MAX_DEPTH,
             max_args: int = MAX_ARGS, min_length: int = MIN_LENGTH,
             max_length: int = MAX_LENGTH, workers: int | None = None,
             progress: bool = True, render: bool = True) -> dict[str, dict[str, Any]]:
  """Generates a deduplicated ListOps set; the same seed gives the same set.

  The candidate stream is cut into fixed chunks of ``CHUNK`` trees, chunk ``c``
  drawn from ``np.random.default_rng([seed, c])``; chunks are consumed in order,
  so the result does not depend on ``workers``. Returns
  ``{split: {"tokens", "lengths", "targets", "lines"}}`` for train/validation/test.
  """
  need = num_train + num_val + num_test
  kw = dict(max_depth=max_depth, max_args=max_args, min_length=min_length,
            max_length=max_length, render=render)
  if workers is None:
    workers = os.cpu_count() or 1
  workers = max(1, int(workers))
  seen: set[bytes] = set()
  toks, lens, tgts, lines = [], [], [], []
  count = 0
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=need, desc="Generating ListOps", unit="ex", file=sys.stderr)

  def consume(res):
    nonlocal count
    offs = np.concatenate([[0], np.cumsum(res["lengths"], dtype=np.int64)])
    before = count
    for i in range(res["lengths"].size):
      if count >= need:
        break
      t = res["tokens"][offs[i]:offs[i + 1]]
      key = t.tobytes()
      if key in seen:
        continue
      seen.add(key)
      toks.append(t)
      lens.append(res["lengths"][i])
      tgts.append(res["targets"][i])
      if render:
        lines.append(res["lines"][i])
      count += 1
    if bar is not None:
      bar.update(count - before)

  next_chunk = 0
  accepted_per_chunk = None
  pool = None
  try:
    if workers > 1 and need > 0:
      pool = multiprocessing.get_context("spawn").Pool(workers)
    while count < need:
      if accepted_per_chunk:
        wave = int(np.ceil((need - count) / accepted_per_chunk * 1.05)) + 1
      else:
        wave = workers
      wave = max(wave, workers)
      tasks = [(seed, c, CHUNK, kw) for c in range(next_chunk, next_chunk + wave)]
      next_chunk += wave
      it = pool.imap(_chunk_worker, tasks) if pool else map(_chunk_worker, tasks)
      got = 0
      for _, res in it:
        got += res["lengths"].size
        consume(res)
        if count >= need:
          break
      accepted_per_chunk = max(got / wave, 1e-3) if accepted_per_chunk is None else \
          0.5 * accepted_per_chunk + 0.5 * max(got / wave, 1e-3)
  finally:
    if pool is not None:
      pool.terminate()
      pool.join()
    if bar is not None:
      bar.close()

  def pack(lo, hi):
    ls = np.array(lens[lo:hi], dtype=np.int32)
    flat = np.concatenate(toks[lo:hi]) if hi > lo else np.zeros(0, np.uint8)
    d = {"tokens": flat, "lengths": ls, "targets": np.array(tgts[lo:hi], dtype=np.int32)}
    if render:
      d["lines"] = lines[lo:hi]
    return d

  return {"train": pack(0, num_train),
          "validation": pack(num_train, num_train + num_val),
          "test": pack(num_train + num_val, need)}


def write_tsv(path: str, lines: list[str], targets: np.ndarray) -> None:
  """Writes LRA's TSV: header ``Source\\tTarget``, CRLF rows (Python csv's default)."""
  with open(path, "w", encoding="ascii", newline="") as f:
    f.write(HEADER + "\r\n")
    f.writelines(f"{s}\t{int(t)}\r\n" for s, t in zip(lines, targets))


def generate_to_dir(output_dir: str, seed: int = 0, num_train: int = NUM_TRAIN,
                    num_val: int = NUM_VAL, num_test: int = NUM_TEST, *,
                    workers: int | None = None, progress: bool = True,
                    task_name: str = "basic") -> dict[str, Any]:
  """Generates into ``output_dir``: LRA TSVs ``{task_name}_{train,val,test}.tsv``,
  ``tokens.npz`` (ragged token ids, for fast loading) and ``info.json``.
  Written to a temporary folder and renamed, so a reader never sees half a set."""
  t0 = time.time()
  data = generate(seed, num_train, num_val, num_test, workers=workers, progress=progress)
  gen_s = time.time() - t0
  parent = os.path.dirname(os.path.abspath(output_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = f"{os.path.abspath(output_dir)}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  arrays = {}
  for split, d in data.items():
    write_tsv(os.path.join(tmp, f"{task_name}_{_SPLIT_FILE[split]}.tsv"), d["lines"], d["targets"])
    for key in ("tokens", "lengths", "targets"):
      arrays[f"{split}_{key}"] = d[key]
  np.savez(os.path.join(tmp, "tokens.npz"), **arrays)
  info = {
      "format_version": FORMAT_VERSION, "seed": seed,
      "sizes": {s: int(d["lengths"].size) for s, d in data.items()},
      "generator": {"max_depth": MAX_DEPTH, "max_args": MAX_ARGS, "value_p": VALUE_P,
                    "min_length": MIN_LENGTH, "max_length": MAX_LENGTH, "chunk": CHUNK},
      "label_histogram": {s: np.bincount(d["targets"], minlength=10).tolist()
                          for s, d in data.items()},
      "mean_length": {s: float(d["lengths"].mean()) if d["lengths"].size else 0.0
                      for s, d in data.items()},
      "generate_seconds": round(gen_s, 2),
      "total_seconds": round(time.time() - t0, 2),
  }
  with open(os.path.join(tmp, "info.json"), "w") as f:
    json.dump(info, f, indent=1)
  try:
    os.rename(tmp, output_dir)
  except OSError:
    # Another process finished first (or output_dir exists): keep theirs.
    shutil.rmtree(tmp, ignore_errors=True)
    if not os.path.exists(os.path.join(output_dir, "tokens.npz")):
      raise
  return info


def default_cache_dir() -> str:
  """``<cache_root()>/listops``, where generated sets are kept."""
  return os.path.join(common.cache_root(), "listops")


def generated_dir(seed: int = 0, num_train: int = NUM_TRAIN, num_val: int = NUM_VAL,
                  num_test: int = NUM_TEST, cache_dir: str | None = None) -> str:
  """Folder of the generated set for these arguments (a path only; nothing is
  created): ``<cache_dir>/v{FORMAT_VERSION}-seed{seed}-{train}-{val}-{test}``."""
  cache_dir = cache_dir or default_cache_dir()
  return os.path.join(cache_dir, f"v{FORMAT_VERSION}-seed{seed}-{num_train}-{num_val}-{num_test}")


def ensure_generated(seed: int = 0, num_train: int = NUM_TRAIN, num_val: int = NUM_VAL,
                     num_test: int = NUM_TEST, cache_dir: str | None = None,
                     workers: int | None = None, progress: bool = True) -> str:
  """Returns ``generated_dir(...)``, first generating the set there unless its
  ``tokens.npz`` exists."""
  path = generated_dir(seed, num_train, num_val, num_test, cache_dir)
  if not os.path.exists(os.path.join(path, "tokens.npz")):
    generate_to_dir(path, seed, num_train, num_val, num_test, workers=workers,
                    progress=progress)
  return path


# ---------------------------------------------------------------- TSV reader
_BLANK_PARENS = bytes.maketrans(b"()\t\r", b"    ")
_FIRST_ID = np.zeros(256, dtype=np.uint8)  # id of a one-character token by its byte
for _d in range(10):
  _FIRST_ID[ord(str(_d))] = VOCAB[str(_d)]
_FIRST_ID[ord("]")] = X_ID
_FIRST_ID[ord("X")] = X_ID
_FOUR_ID = np.zeros(256, dtype=np.uint8)  # "[M?" + last byte -> id, by the last byte
_FOUR_ID[ord("X")] = VOCAB["[MAX"]
_FOUR_ID[ord("D")] = VOCAB["[MED"]
_FOUR_ID[ord("N")] = VOCAB["[MIN"]
_FOUR_MID = np.zeros(256, dtype=np.uint8)  # expected third byte for that last byte
_FOUR_MID[ord("X")] = ord("A")
_FOUR_MID[ord("D")] = ord("E")
_FOUR_MID[ord("N")] = ord("I")


def _tokenize_block(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """-> (ids, token starts, ok mask) for a space/newline-separated byte buffer."""
  space = (buf == 32) | (buf == 10)
  nonspace = ~space
  starts = np.flatnonzero(nonspace & np.concatenate([[True], space[:-1]]))
  ends = np.flatnonzero(nonspace & np.concatenate([space[1:], [True]])) + 1
  n = ends - starts
  p = np.concatenate([buf, np.full(4, 32, np.uint8)])
  c0, c1, c2, c3 = p[starts], p[starts + 1], p[starts + 2], p[starts + 3]
  ids = np.zeros(starts.size, dtype=np.uint8)
  one = n == 1
  ids[one] = _FIRST_ID[c0[one]]
  three = (n == 3) & (c0 == ord("[")) & (c1 == ord("S")) & (c2 == ord("M"))
  ids[three] = VOCAB["[SM"]
  four = (n == 4) & (c0 == ord("[")) & (c1 == ord("M")) & (c2 == _FOUR_MID[c3]) & (c2 != 0)
  ids[four] = _FOUR_ID[c3[four]]
  return ids, starts, ids != 0


def tokenize_sources(sources: list[bytes], path: str = "<memory>",
                     line_numbers: list[int] | None = None, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """LRA ListOps tokenisation (``]`` -> X, parentheses deleted, whitespace split)
  of many sources -> (flat uint8 ids, lengths). Unknown tokens raise, naming the line."""
  line_no = line_numbers if line_numbers is not None else range(1, len(sources) + 1)
  all_ids, all_lens = [], []
  for b0 in range(0, len(sources), block):
    part = sources[b0:b0 + block]
    # "( " and " )" are deleted first (cheap, shrinks the buffer ~3x); any other
    # parenthesis becomes a space, as LRA deletes them.
    joined = b" \n ".join(part).replace(b"( ", b"").replace(b" )", b"").translate(_BLANK_PARENS)
    buf = np.frombuffer(joined, dtype=np.uint8)
    ids, starts, ok = _tokenize_block(buf)
    # Sources are joined by " \n " (newline cannot occur in a row): the line of a
    # token is the number of newlines before it.
    line_of = np.searchsorted(np.flatnonzero(buf == 10), starts)
    if not ok.all():
      bad = int(np.flatnonzero(~ok)[0])
      end = int(starts[bad])
      while end < buf.size and buf[end] not in (10, 32):
        end += 1
      tok = bytes(buf[starts[bad]:end]).decode("utf-8", "replace")
      raise common.MalformedDataError(
          f"{path}:{line_no[b0 + int(line_of[bad])]}: unknown ListOps token {tok!r} "
          f"(expected one of {list(TOKENS)}, ']', '(' or ')')")
    all_ids.append(ids)
    all_lens.append(np.bincount(line_of, minlength=len(part)).astype(np.int32))
  if not all_ids:
    return np.zeros(0, np.uint8), np.zeros(0, np.int32)
  return np.concatenate(all_ids), np.concatenate(all_lens)


def read_tsv(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Reads an LRA ListOps TSV -> (flat uint8 ids, lengths, targets)."""
  with open(path, "rb") as f:
    raw = f.read()
  rows = raw.splitlines()
  if not rows or rows[0].strip() != HEADER.encode():
    got = rows[0][:60] if rows else b"<empty file>"
    raise common.MalformedDataError(
        f"{path}:1: expected the header {HEADER!r}, got {got!r}")
  sources, targets, line_numbers = [], [], []
  for i, row in enumerate(rows[1:], start=2):
    if not row.strip():
      continue
    parts = row.rsplit(b"\t", 1)
    if len(parts) != 2:
      raise common.MalformedDataError(f"{path}:{i}: expected 'Source<TAB>Target'")
    try:
      t = int(parts[1])
    except ValueError:
      raise common.MalformedDataError(
          f"{path}:{i}: target {parts[1][:20]!r} is not an integer") from None
    if not 0 <= t < NUM_CLASSES:
      raise common.MalformedDataError(f"{path}:{i}: target {t} is not in 0..9")
    sources.append(parts[0])
    targets.append(t)
    line_numbers.append(i)
  ids, lengths = tokenize_sources(sources, path, line_numbers)
  return ids, lengths, np.array(targets, dtype=np.int32)


TSV_CACHE_SUFFIX = ".tokens.npz"
_UNWRITABLE: set[str] = set()  # folders already reported as not writable


def read_tsv_cached(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``read_tsv(path)``, parsed once: the result is kept in ``<path>.tokens.npz`` (written
  atomically) with the key ``[FORMAT_VERSION, size, mtime_ns]`` of the TSV, and read from there
  while the key matches. If the folder is not writable the TSV is parsed on every call, and a
  warning says so once per folder."""
  cache = path + TSV_CACHE_SUFFIX
  st = os.stat(path)
  key = np.array([FORMAT_VERSION, st.st_size, st.st_mtime_ns], dtype=np.int64)
  try:
    with np.load(cache) as z:
      if np.array_equal(z["key"], key):
        return z["tokens"], z["lengths"], z["targets"]
  except (OSError, ValueError, KeyError, zipfile.BadZipFile):
    pass  # no cache yet, or an unreadable one: parse and rewrite it
  ids, lengths, targets = read_tsv(path)
  try:
    common.save_npz_atomic(cache, key=key, tokens=ids, lengths=lengths, targets=targets)
  except OSError as e:
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in _UNWRITABLE:
      _UNWRITABLE.add(folder)
      warnings.warn(f"listops: cannot write the parse cache next to the TSVs in {folder} ({e}); "
                    "they will be parsed on every load", stacklevel=2)
  return ids, lengths, targets


def find_tsv_dir(data_dir: str, task_name: str = "basic") -> str:
  """The first of ``data_dir``, ``data_dir/listops-1000`` and
  ``data_dir/lra_release/listops-1000`` holding ``{task_name}_train.tsv`` or
  ``{task_name}_test.tsv``; raises DataNotFoundError if none does."""
  tried = []
  for d in (data_dir, os.path.join(data_dir, "listops-1000"),
            os.path.join(data_dir, "lra_release", "listops-1000")):
    p = os.path.join(d, f"{task_name}_train.tsv")
    tried.append(p)
    if os.path.exists(p) or os.path.exists(os.path.join(d, f"{task_name}_test.tsv")):
      return d
  raise common.missing(
      "listops", tried,
      "call get_task('listops').load(...) with data_dir=None to generate it "
      "(seeded, cached), or " + common.LRA_RELEASE_HOW)


def load(split: str, *, data_dir: str | None = None, max_length: int | None = None,
         seed: int = 0, cache_dir: str | None = None, num_train: int = NUM_TRAIN,
         num_val: int = NUM_VAL, num_test: int = NUM_TEST, workers: int | None = None,
         progress: bool = True, task_name: str = "basic",
         shuffle_seed: int | None = common.SHUFFLE_SEED,
         dtype=np.int32) -> dict[str, np.ndarray]:
  """{"inputs": [N, max_length] ids (0-padded), "targets": [N]}, shuffled.

  ``data_dir``: a folder with LRA's ``basic_{train,val,test}.tsv`` (or its
  parent holding ``listops-1000/``). ``None``: the generated set for ``seed`` in
  ``cache_dir`` (default ``$SPECTRAFORMER_JAX_CACHE/listops``, i.e.
  ``~/.cache/spectraformer_jax/listops``), generated on first use. TSVs are parsed once
  (``read_tsv_cached``). ``shuffle_seed``: seed of the split's permutation
  (``common.shuffle_split``); None keeps the source order.
  """
  common.check_split(split)
  L = common.resolve_max_length(max_length, DEFAULT_MAX_LENGTH)
  if data_dir is None:
    path = ensure_generated(seed, num_train, num_val, num_test, cache_dir, workers, progress)
    with np.load(os.path.join(path, "tokens.npz")) as z:
      ids, lengths, targets = (z[f"{split}_tokens"], z[f"{split}_lengths"],
                               z[f"{split}_targets"])
  else:
    d = find_tsv_dir(data_dir, task_name)
    p = os.path.join(d, f"{task_name}_{_SPLIT_FILE[split]}.tsv")
    if not os.path.exists(p):
      raise common.missing("listops", [p], common.LRA_RELEASE_HOW)
    ids, lengths, targets = read_tsv_cached(p)
  return common.shuffle_split({"inputs": common.ragged_to_padded(ids, lengths, L, dtype=dtype),
                               "targets": np.asarray(targets, dtype=np.int32)}, shuffle_seed)


# ---------------------------------------------------------------- reference evaluator
def evaluate_text(source: str) -> int:
  """Evaluates one LRA ListOps expression (text form, with or without parentheses)."""
  stack: list[list] = []
  result = None
  for tok in source.replace("(", " ").replace(")", " ").split():
    if tok.startswith("["):
      stack.append([tok, []])
    elif tok in ("]", "X"):
      op, args = stack.pop()
      if op == "[MIN":
        v = min(args)
      elif op == "[MAX":
        v = max(args)
      elif op == "[MED":
        v = int(np.median(args))
      elif op == "[SM":
        v = int(np.sum(args) % 10)
      else:
        raise ValueError(f"unknown operator {op}")
      if stack:
        stack[-1][1].append(v)
      else:
        result = v
    else:
      v = int(tok)
      if stack:
        stack[-1][1].append(v)
      else:
        result = v
  if stack or result is None:
    raise ValueError("unbalanced expression")
  return result


def main(argv: Sequence[str] | None = None) -> None:
  """CLI: generates a set into ``--output_dir`` (default: the loader's cache folder)
  and prints its info; exits with an error if that folder exists."""
  p = argparse.ArgumentParser(description="Generate LRA ListOps (seeded, deduplicated).")
  p.add_argument("--output_dir", default=None,
                 help="target folder (default: the cache folder the loader uses)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--num_train", type=int, default=NUM_TRAIN)
  p.add_argument("--num_val", type=int, default=NUM_VAL)
  p.add_argument("--num_test", type=int, default=NUM_TEST)
  p.add_argument("--workers", type=int, default=None)
  a = p.parse_args(argv)
  out = a.output_dir or generated_dir(a.seed, a.num_train, a.num_val, a.num_test)
  if os.path.exists(out):
    sys.exit(f"{out} exists; remove it first")
  info = generate_to_dir(out, a.seed, a.num_train, a.num_val, a.num_test, workers=a.workers)
  print(json.dumps(info, indent=1))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
