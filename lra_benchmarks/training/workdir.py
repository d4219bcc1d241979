"""The workdir guard: a workdir belongs to one run. Its config is stored in ``config.json``;
reusing the workdir with a config that trains a different model (or the same model on other
data, or with another optimiser) is an error naming the differing keys, unless
``config.resume == "force"``. Keys that only say how long or how visibly to train may change."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import ml_collections

CONFIG_FILE = "config.json"
RESUME_MODES = ("auto", "force")

# Keys a resumed run may change: the budget, the schedule of evaluations/checkpoints/logs, and
# where the data or memory come from. Every other key defines what is trained.
FREE_KEYS = frozenset({
    "num_train_steps", "eval_every", "num_eval_steps", "patience", "checkpoint_every",
    "checkpoint_every_seconds", "keep_checkpoints", "log_every", "progress_bar",
    "eval_batch_size", "memory_fraction", "resume", "data_dir",
})


class WorkdirError(ValueError):
  """The workdir cannot be used for this run; the message says why and what to do."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{"model": {"weight": "qmc"}} -> {"model.weight": "qmc"}``."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple]:
  """``{key: (old, new)}`` for the non-free keys (dotted) in both configs whose values differ.
  A key in only one of them is not compared: it was added or removed since the old run."""
  a, b = flatten(old), flatten(new)
  return {key: (a[key], b[key]) for key in sorted(set(a) & set(b))
          if key not in FREE_KEYS and a[key] != b[key]}


def prepare(workdir: str, config: ml_collections.ConfigDict) -> str:
  """Makes ``workdir`` (absolute path returned) and checks it against ``config``.

  A workdir holding checkpoints or results of a run whose stored config differs from ``config``
  in a non-free key raises WorkdirError (unless ``config.resume == "force"``).
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir={workdir} is a file, not a directory: pass a directory.")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"--workdir={workdir} cannot be created ({e.strerror}): pass a "
                       "writable directory.") from None
  if not os.access(workdir, os.W_OK):
    raise WorkdirError(f"--workdir={workdir} is not writable: pass a writable directory.")
  resume = config.get("resume", "auto")
  if resume not in RESUME_MODES:
    raise WorkdirError(f"config.resume={resume!r}: must be one of {RESUME_MODES}.")
  stored = load_json(os.path.join(workdir, CONFIG_FILE))
  if stored is not None and has_run(workdir) and resume != "force":
    diff = config_differences(stored, json.loads(json.dumps(config.to_dict(), default=str)))
    if diff:
      listed = ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in diff.items())
      raise WorkdirError(
          f"{workdir} holds a run with a different config: {listed}. Use a new --workdir, or "
          "pass --config.resume=force to continue that run's checkpoint with this config.")
  return workdir


def store_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes ``config`` to ``workdir/config.json`` (the config the workdir's run now follows)."""
  write_json(os.path.join(workdir, CONFIG_FILE), config.to_dict())


def has_run(workdir: str) -> bool:
  """Whether ``workdir`` holds checkpoints or results of an earlier run."""
  return any(os.path.isdir(os.path.join(workdir, d)) and os.listdir(os.path.join(workdir, d))
             for d in ("checkpoints", "best")) or os.path.exists(
                 os.path.join(workdir, "results.json"))


def load_json(path: str) -> Any:
  """The JSON value in ``path``, or None if there is none (or it is not JSON)."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def write_json(path: str, value: Any) -> None:
  """Writes ``value`` as indented JSON atomically (a temporary file, then a rename)."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, default=str)
  os.replace(tmp, path)
