"""LRA data: one module per task, a flat registry, and shared batching.

>>> task = get_task("listops")
>>> train = task.load("train")          # {"inputs": int32[N, 2000], "targets": int32[N]}

Beyond LRA, two per-token tasks: ``mqar`` (generated multi-query associative recall) and
``lm`` (byte-level causal language modelling): targets ``int32[N, L]``, ``IGNORE`` where a
position has no target.

See each module's docstring for its on-disk format and tokenisation.
"""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np

from lra_benchmarks.data.common import DataNotFoundError, MalformedDataError, SPLITS

IGNORE = -1
"""Target of a position without one (per-token tasks): no loss, not counted in accuracy."""


@dataclasses.dataclass(frozen=True)
class Task:
  """One task. ``padded``: token 0 is padding (mask ``inputs != 0``); when
  False (image, pathfinder, mqar, lm) every position is real. ``per_token``: targets are
  ``int32[N, L]`` (``IGNORE`` where there is none) and the model predicts at every position;
  ``causal``: position t may see tokens <= t only."""
  name: str
  vocab_size: int  # includes the pad id 0
  num_classes: int
  dual: bool  # two inputs ("inputs1", "inputs2"): retrieval
  padded: bool
  default_max_length: int
  per_token: bool = False
  causal: bool = False

  def sizes(self, **options) -> tuple[int, int]:
    """``(vocab_size, num_classes)`` under the task's options: a per-token task predicts its
    own tokens, so a ``vocab_size`` option (MQAR) sets both."""
    vocab = int(options.get("vocab_size", self.vocab_size))
    return vocab, (vocab if self.per_token else self.num_classes)

  def load(self, split: str, *, data_dir: str | None = None, max_length: int | None = None,
           **options) -> dict[str, np.ndarray]:
    """``split`` in {"train", "validation", "test"} -> {"inputs": int32[N, L] (retrieval:
    "inputs1", "inputs2"), "targets": int32[N]}, 0-padded to exactly L = max_length
    (default ``default_max_length``; pathfinder: resolution ** 2). Every split is shuffled
    once with a fixed seed (``common.SHUFFLE_SEED``), so any prefix is a random sample."""
    module = importlib.import_module(f"lra_benchmarks.data.{self.name}")  # lazy: tfds only where needed
    return module.load(split, data_dir=data_dir, max_length=max_length, **options)


TASKS: dict[str, Task] = {
    "listops": Task("listops", vocab_size=17, num_classes=10, dual=False, padded=True,
                    default_max_length=2000),
    "text": Task("text", vocab_size=257, num_classes=2, dual=False, padded=True,
                 default_max_length=4000),
    "retrieval": Task("retrieval", vocab_size=257, num_classes=2, dual=True, padded=True,
                      default_max_length=4000),
    "image": Task("image", vocab_size=256, num_classes=10, dual=False, padded=False,
                  default_max_length=1024),
    "pathfinder": Task("pathfinder", vocab_size=256, num_classes=2, dual=False, padded=False,
                       default_max_length=1024),
    "mqar": Task("mqar", vocab_size=8192, num_classes=8192, dual=False, padded=False,
                 default_max_length=256, per_token=True, causal=True),
    "lm": Task("lm", vocab_size=257, num_classes=257, dual=False, padded=False,
               default_max_length=512, per_token=True, causal=True),
}


def get_task(name: str) -> Task:
  """The ``Task`` registered as ``name``; raises ValueError (listing the valid
  names) for an unknown one."""
  try:
    return TASKS[name]
  except KeyError:
    raise ValueError(f"unknown task {name!r}; valid names: {sorted(TASKS)}") from None


__all__ = ["Task", "TASKS", "get_task", "SPLITS", "IGNORE", "DataNotFoundError",
           "MalformedDataError"]
