r"""The LRA trainer's configs from one source: ``get_config("text,posrf,qmc")``.

A config is named by a spec string, which ``--config=configs/lra.py:SPEC`` passes here:

* ``TASK``: the task's base (the study's hyperparameters, softmax attention);
* ``TASK,KIND``: ``softmax``, ``flash`` (``jax.nn.dot_product_attention`` in bfloat16) or an
  efficient-attention baseline of ``spectraformer_jax.baselines`` (with the study's
  hyperparameters as ``config.model`` fields);
* ``TASK,COMPONENT,WEIGHT``: Spectraformer attention with a pair of
  ``spectraformer_jax.registry.valid_pairs()``.

The files ``configs/base_<task>.py`` and ``configs/<task>_<attention>.py`` (which users run by
name) are generated from this module, one call of ``get_config`` each:
``python -m lra_benchmarks.config_lib --write=configs`` rewrites them and
``tests/test_configs.py`` checks that they are in sync.

Defaults have one home each: the model fields are ``models.ModelConfig``'s fields with their
defaults (plus the trainer's ``redraw_every``), the per-task study hyperparameters are
``TASK_SETTINGS``, the trainer's fields ``base_config``. Spec strings are parsed here; the
fields' values are validated once, when the trainer starts (``train_lib.validate_config``). Every field can be
overridden on the command line, e.g. ``--config.model.num_features=256`` (the config is
locked: a typo is an error).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import textwrap
from typing import Any, Optional, Sequence

import ml_collections
from ml_collections import config_dict

from lra_benchmarks import models
from spectraformer_jax import baselines

# The combinations the Spectraformer study evaluated on all five LRA tasks (the results table
# of the official repository, cruiseresearchgroup/spectraformer): 3 components x 6 weights.
STUDY_COMPONENTS = ("posrf", "oprf", "saderf")
STUDY_WEIGHTS = ("orf", "sorf", "qmc", "mm", "sgq", "fastfoodl")
TASKS = ("listops", "text", "retrieval", "image", "pathfinder")
SOFTMAX_KINDS = ("softmax", "flash")
BASELINES = tuple(baselines.KINDS)

# The study's per-task hyperparameters (Spectraformer / Skyformer LRA configs), with a line on
# the task for the generated files' docstrings. The study's Image config sets no patience.
TASK_SETTINGS: dict[str, dict[str, Any]] = {
    "listops": dict(max_length=2000, seq_len=2048, batch_size=32, learning_rate=1e-4,
                    warmup_steps=1000, eval_every=500, checkpoint_every=500, num_eval_steps=62),
    "text": dict(max_length=4000, seq_len=4096, batch_size=32, learning_rate=1e-4,
                 warmup_steps=80, eval_every=500, checkpoint_every=500, num_eval_steps=200),
    "retrieval": dict(max_length=4000, seq_len=4096, batch_size=16, learning_rate=2e-4,
                      warmup_steps=800, eval_every=1000, checkpoint_every=1000,
                      num_eval_steps=300),
    "image": dict(max_length=1024, seq_len=1024, batch_size=256, learning_rate=1e-4,
                  warmup_steps=175, eval_every=50, checkpoint_every=500, num_eval_steps=20,
                  patience=0),
    "pathfinder": dict(max_length=1024, seq_len=1024, batch_size=128, learning_rate=2e-4,
                       warmup_steps=312, eval_every=500, checkpoint_every=500,
                       num_eval_steps=156),
}
TASK_TITLES = {
    "listops": "ListOps (10 classes, generated when no data_dir is given)",
    "text": "Text: IMDB byte-level classification (2 classes)",
    "retrieval": "Retrieval: AAN document matching, dual encoder (2 classes)",
    "image": "Image: grayscale CIFAR-10 pixels as tokens (10 classes)",
    "pathfinder": "Pathfinder-32, hard split (2 classes)",
}
# ModelConfig fields that come from the task and the data, not from config.model.
_NOT_MODEL_FIELDS = ("vocab_size", "num_classes", "max_len", "baseline")


def model_defaults() -> ml_collections.ConfigDict:
  """``config.model``: every ``models.ModelConfig`` field with a default, and ``redraw_every``
  (> 0: the trainer redraws fixed random features every this many steps; 0: never)."""
  model = ml_collections.ConfigDict()
  for field in dataclasses.fields(models.ModelConfig):
    if field.name not in _NOT_MODEL_FIELDS:
      model[field.name] = field.default
  model.redraw_every = 0
  return model


def base_config() -> ml_collections.ConfigDict:
  """Task-independent defaults (ListOps' sizes); ``task_config`` fills in a task's."""
  config = ml_collections.ConfigDict()
  config.task = "listops"
  # Data directory of the task (None: the task's default; ListOps generates its data).
  config.data_dir = config_dict.placeholder(str)
  config.max_length = 2000  # tokens kept per example (as LRA)
  config.seq_len = 2048     # model length: max_length rounded up to a power of two (as the study)
  config.seed = 0
  config.model = model_defaults()

  # Optimisation (study: AdamW, betas (0.9, 0.999), eps 1e-6, no weight decay, OneCycle-linear
  # schedule, gradients clipped by value at 1).
  config.batch_size = 32     # global batch, split over all devices and hosts
  config.eval_batch_size = 0  # 0: same as batch_size
  config.learning_rate = 1e-4
  config.schedule = "linear"  # "linear" (warm-up then linear decay) | "rsqrt" (LRA) | "constant"
  config.warmup_steps = 1000
  config.warmup_div_factor = 25.0  # linear: start at learning_rate / this (OneCycleLR as the study)
  config.final_div_factor = 1e4    # linear: end at learning_rate / (warmup_div_factor * this)
  config.weight_decay = 0.0
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.adam_eps = 1e-6
  config.grad_clip_value = 1.0  # clip each gradient entry to [-v, v]; 0 disables
  config.grad_clip_norm = 0.0   # clip by global norm; 0 disables

  config.num_train_steps = 50_000
  config.eval_every = 500
  config.num_eval_steps = -1     # batches per validation; -1: the whole validation split
  config.patience = 10           # stop after this many evaluations without improvement; 0: never
  config.checkpoint_every = 500
  config.checkpoint_every_seconds = 300.0  # also checkpoint when this long since the last; 0: off
  config.keep_checkpoints = 2
  # Model selection: "test" validates on the loader's validation split (as LRA and the study);
  # "heldout" validates on a fixed fraction of train and touches the test split once, at the end.
  config.validation = "test"
  config.heldout_fraction = 0.1
  # Reusing a workdir whose config.json differs in what is trained is an error; "force" resumes.
  config.resume = "auto"
  # Device memory per process: "" (JAX's default), "auto" (allocate on demand, for several
  # runs on one device) or a fraction such as "0.3" (set before JAX starts; CLI only).
  config.memory_fraction = ""
  config.log_every = 100
  config.progress_bar = True
  return config


def task_config(task: str) -> ml_collections.ConfigDict:
  """``base_config`` with ``task``'s study hyperparameters (``TASK_SETTINGS``)."""
  _check_choice("task", task, TASKS)
  config = base_config()
  config.task = task
  config.update(TASK_SETTINGS[task])
  return config


def set_attention(config: ml_collections.ConfigDict, kind: str, component: str = "posrf",
                  weight: str = "iid") -> ml_collections.ConfigDict:
  """Sets ``config.model``'s attention ``kind`` (and, for ``spectraformer``, the pair), in place;
  returns ``config``."""
  config.model.attention = kind
  config.model.component = component
  config.model.weight = weight
  return config


def parse_spec(spec: str) -> tuple[str, tuple[str, ...]]:
  """``"text,posrf,qmc"`` -> ``("text", ("posrf", "qmc"))``; ``"text"`` -> ``("text", ())``.

  Only the grammar is checked here: whether a (component, weight) pair is allowed is checked
  once, with the other fields, when the trainer starts (``train_lib.validate_config``).

  Raises:
    ValueError: an unknown task or attention kind, or too many parts, naming the valid choices.
  """
  parts = tuple(p.strip() for p in spec.split(","))
  task, attention = parts[0], parts[1:]
  _check_choice("task", task, TASKS)
  kinds = SOFTMAX_KINDS + BASELINES
  if len(attention) > 2 or (len(attention) == 1 and attention[0] not in kinds):
    raise ValueError(f"config spec {spec!r}: expected TASK, TASK,KIND with KIND one of "
                     f"{', '.join(kinds)}, or TASK,COMPONENT,WEIGHT with a pair of "
                     "spectraformer_jax.registry.valid_pairs(), e.g. text,posrf,qmc")
  return task, attention


def get_config(spec: str = "listops") -> ml_collections.ConfigDict:
  """The config named by ``spec`` (see the module docstring): the task's base with the
  attention set; flash computes in bfloat16 (cuDNN flash attention needs bf16/fp16 inputs), and
  so do the random-feature pairs (their exponentials and accumulators stay float32; the Pallas
  kernel runs on 16-bit inputs; on ListOps bfloat16 matched float32 within 0.2 points, see
  docs/results.md), a baseline adds its study hyperparameters
  (``baselines.study_hyperparameters``) to ``config.model``."""
  task, attention = parse_spec(spec)
  config = task_config(task)
  if len(attention) == 2:
    set_attention(config, "spectraformer", *attention)
    config.model.dtype = "bfloat16"
    return config
  if not attention:
    return config
  kind, = attention
  set_attention(config, kind)
  if kind == "flash":
    config.model.dtype = "bfloat16"
  elif kind in BASELINES:
    config.model.update(baselines.study_hyperparameters(kind))
  return config


def study_specs() -> list[str]:
  """The specs that have a file in ``configs/``: every task's base, softmax, flash, the
  baselines and the study's component x weight pairs."""
  specs = []
  for task in TASKS:
    specs += [task] + [f"{task},{kind}" for kind in SOFTMAX_KINDS + BASELINES]
    specs += [f"{task},{c},{w}" for c in STUDY_COMPONENTS for w in STUDY_WEIGHTS]
  return specs


def file_name(spec: str) -> str:
  """``"text,posrf,qmc"`` -> ``"text_posrf_qmc.py"``; a bare task -> ``"base_<task>.py"``."""
  task, attention = parse_spec(spec)
  return "_".join((task, *attention) if attention else ("base", task)) + ".py"


def _describe(spec: str) -> str:
  """The generated file's docstring for ``spec``: a sentence on the task and the attention."""
  task, attention = parse_spec(spec)
  if not attention:
    settings = ", ".join(f"{k}={v}" for k, v in TASK_SETTINGS[task].items())
    return (f"{TASK_TITLES[task]}, with the study's hyperparameters ({settings}; the other "
            "fields from lra_benchmarks.config_lib.base_config).")
  title = TASK_TITLES[task].split(" (")[0].split(":")[0]
  if attention == ("softmax",):
    what = "exact softmax attention (the Original Transformer baseline)"
  elif attention == ("flash",):
    what = "softmax attention through jax.nn.dot_product_attention, in bfloat16"
  elif len(attention) == 1:
    fields = ", ".join(f"{k}={v}" for k, v in baselines.study_hyperparameters(
        attention[0]).items())
    what = (f"the {attention[0]} baseline ({baselines.KINDS[attention[0]].rstrip('.')}"
            + (f"; the study's {fields}" if fields else "") + ")")
  else:
    what = f"Spectraformer {attention[0]}-{attention[1]} attention"
  return f"{title} with {what}."


def file_text(spec: str) -> str:
  """The text of ``configs/<file_name(spec)>``: a docstring and one call of ``get_config``."""
  generated = (f"Generated by ``python -m lra_benchmarks.config_lib --write=configs``; the same "
               f"as ``--config=configs/lra.py:{spec}``.")
  docstring = "\n\n".join(textwrap.fill(p, width=100) for p in (_describe(spec), generated))
  return (f'"""{docstring}\n"""\n\nfrom lra_benchmarks import config_lib\n\n\n'
          f'def get_config():\n  return config_lib.get_config("{spec}")\n')


def write_config_files(directory: str) -> list[str]:
  """Writes ``file_text(spec)`` to ``directory/file_name(spec)`` for every ``study_specs()``;
  returns the paths written."""
  paths = []
  for spec in study_specs():
    paths.append(os.path.join(directory, file_name(spec)))
    with open(paths[-1], "w", encoding="utf-8") as f:
      f.write(file_text(spec))
  return paths


def _check_choice(what: str, value: str, choices: Sequence[str]) -> None:
  """ValueError naming ``value`` and ``choices`` unless ``value`` is one of them."""
  if value not in choices:
    raise ValueError(f"Unknown {what} {value!r}; valid: {', '.join(choices)}.")


def main(argv: Optional[Sequence[str]] = None) -> None:
  """``--write=DIR``: regenerates the config files in DIR."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--write", required=True, metavar="DIR",
                      help="directory of the generated config files (configs)")
  args = parser.parse_args(argv)
  print(f"wrote {len(write_config_files(args.write))} config files to {args.write}")


if __name__ == "__main__":
  main()
