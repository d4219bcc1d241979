"""Byte-level causal language modelling on the text of a folder of ``.txt`` files.

Corpus: every ``*.txt`` file under ``data_dir`` (recursively, in sorted path order), joined by
newlines; without ``data_dir``, the small built-in ``BUILT_IN_CORPUS`` (a few KB, enough for
tests and a first run).  Tokens: UTF-8 bytes, byte b -> id b + 1, pad 0 (never produced),
vocabulary 257, as the Text task.

Examples: the token stream cut into consecutive windows of ``L + 1`` tokens overlapping by one
(window i starts at ``i L``); ``inputs`` are the first L tokens, ``targets`` the last L (the
next byte at each position), so every byte but the first is a target exactly once.  The windows
are split into train / validation / test by one permutation drawn from
``np.random.default_rng(seed)``: ``round(validation_fraction * W)`` and
``round(test_fraction * W)`` windows (at least one each) for validation and test, the rest for
training.  Bits per byte = mean cross-entropy in nats / ln 2.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from lra_benchmarks.data import common

VOCAB_SIZE = 257
DEFAULT_MAX_LENGTH = 512


def _txt_files(data_dir: str) -> list[str]:
  """Every ``.txt`` file under ``data_dir``, sorted by relative path; one-line errors for a
  missing folder or one without ``.txt`` files."""
  if not os.path.isdir(data_dir):
    raise common.DataNotFoundError(f"lm: data_dir={data_dir!r} is not a folder; pass a folder "
                                   "of .txt files, or no data_dir for the built-in corpus.")
  files = sorted(os.path.relpath(os.path.join(root, name), data_dir)
                 for root, _, names in os.walk(data_dir) for name in names
                 if name.endswith(".txt"))
  if not files:
    raise common.DataNotFoundError(f"lm: data_dir={data_dir!r} holds no .txt file (searched "
                                   "recursively).")
  return [os.path.join(data_dir, f) for f in files]


def corpus_tokens(data_dir: Optional[str]) -> np.ndarray:
  """int32 ``[T]``: the corpus of ``data_dir`` (or the built-in one) as byte ids ``b + 1``."""
  if data_dir is None:
    text = BUILT_IN_CORPUS.encode("utf-8")
  else:
    parts = []
    for path in _txt_files(data_dir):
      with open(path, "rb") as f:
        parts.append(f.read())
    text = b"\n".join(parts)
  return np.frombuffer(text, np.uint8).astype(np.int32) + 1


def windows(tokens: np.ndarray, length: int) -> dict[str, np.ndarray]:
  """``{"inputs", "targets"}`` int32 ``[W, length]``: ``W = (T - 1) // length`` windows,
  window i = ``tokens[i L : i L + L]`` and its next tokens ``tokens[i L + 1 : i L + L + 1]``."""
  count = (len(tokens) - 1) // length
  starts = np.arange(count)[:, None] * length + np.arange(length)[None]
  return {"inputs": tokens[starts], "targets": tokens[starts + 1]}


def load(split: str, *, data_dir: Optional[str] = None, max_length: Optional[int] = None,
         seed: int = 0, validation_fraction: float = 0.1,
         test_fraction: float = 0.1) -> dict[str, np.ndarray]:
  """The ``split`` of the corpus (module doc): ``{"inputs", "targets"}`` int32 ``[N, L]``,
  ``L = max_length`` (default 512).  Raises DataNotFoundError for a missing folder or one
  without ``.txt`` files, ValueError when the corpus is too short for three non-empty splits."""
  common.check_split(split)
  length = common.resolve_max_length(max_length, DEFAULT_MAX_LENGTH)
  for name, value in (("validation_fraction", validation_fraction),
                      ("test_fraction", test_fraction)):
    if not 0 < value < 1:
      raise ValueError(f"{name}={value!r}: must be in (0, 1).")
  data = windows(corpus_tokens(data_dir), length)
  count = len(data["inputs"])
  n_val = max(1, round(validation_fraction * count))
  n_test = max(1, round(test_fraction * count))
  if count - n_val - n_test < 1:
    source = "the built-in corpus" if data_dir is None else f"data_dir={data_dir!r}"
    raise ValueError(f"lm: {source} gives {count} windows of {length + 1} bytes, too few for "
                     "train, validation and test; use a shorter max_length or more text.")
  order = np.random.default_rng(int(seed)).permutation(count)
  chosen = {"validation": order[:n_val], "test": order[n_val:n_val + n_test],
            "train": order[n_val + n_test:]}[split]
  return {k: v[chosen] for k, v in data.items()}


BUILT_IN_CORPUS = """\
On reading slowly. A long document is not read all at once. The eye moves along a line, the
mind keeps a little of what came before, and every new word is weighed against that small store
of memory. Some words matter because they were defined on the first page; others only because
they echo the sentence just read. A good reader keeps the store small and useful.

On attention. A transformer reads differently. At every position it compares the present token
with every earlier token, gives each a weight, and takes the weighted average of what those
tokens carry. The weights come from a softmax of dot products, so the comparison of n tokens
with n tokens costs n times n operations. For a page this is cheap; for a book it is not.

On random features. The softmax kernel exp(q . k) can be written as an expectation over random
directions. Draw m directions, map the query and the key to m positive numbers each, and the
dot product of the two short vectors estimates the kernel. Attention then becomes a sum that
can be computed once: add up the key features times the values, add up the key features alone,
and every query reads its answer from these two sums. The cost grows with n, not with n squared.

On decoding. When a model writes one token at a time, the two sums are all it must remember.
Each new key adds its features to the running totals; each new query divides one total by the
other. The memory does not grow as the text grows. This is the promise of linear attention:
a state of fixed size that carries the past forward, like the reader with a small store.

On recall. A fixed state has a price. If a text binds a hundred names to a hundred numbers and
later asks for one of them, a state of fixed size must hold all the bindings at once, and an
estimate made of random directions blurs them together. Exact attention looks back and finds
the name; linear attention must remember it. Tasks of associative recall measure exactly this.

A short table of things and places.
The lamp is in the study. The key is under the mat. The letter is in the drawer.
The map is on the wall. The coin is in the jar. The book is on the shelf.
Where is the key? The key is under the mat. Where is the map? The map is on the wall.
Where is the letter? The letter is in the drawer. Where is the coin? The coin is in the jar.

A short story. The river town had one bridge and two bakers. The first baker rose at four and
sold bread by six; the second rose at six and sold cakes by noon. Travellers who crossed the
bridge in the morning spoke well of the first, and those who crossed in the afternoon spoke
well of the second, and so the town was known on both banks for its baking, though no one who
passed through ever tasted both. One winter the bridge froze, and for a week nobody crossed at
all. The bakers, with no travellers to feed, traded their wares with each other, and by spring
the bread had a little sugar in it and the cakes a little salt.

Numbers. One, two, three, four, five, six, seven, eight, nine, ten. Ten, twenty, thirty,
forty, fifty, sixty, seventy, eighty, ninety, one hundred. Two plus two is four; three times
three is nine; ten less one is nine; half of ten is five.

On measuring. A language model is judged by how surprised it is by text it has not seen. The
surprise of a byte is the negative logarithm of the probability the model gave it; averaged
over a text and taken in base two, it is the number of bits per byte. A model that knows
nothing pays eight bits for every byte; a good model of English pays about one.
"""
