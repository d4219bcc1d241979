r"""Rank every (component, weight) combination for a task before training.

The recommendation rests on cheap measurements only:

1. **Query/key statistics of the task.**  The q, k, v that each attention layer of a softmax
   model computes on a few validation sequences of the task: from a short, seeded warm-up run
   (``--warmup_steps`` steps of the task's model, sequences cropped to ``--warmup_length``
   tokens) or from a trained model (``--checkpoint=WORKDIR``).
2. **Approximation error.**  For every combination, the relative Frobenius error of the
   attention output ``|rf_attention(q, k, v) - softmax(q k^T / sqrt(d)) v| / |softmax(...) v|``
   (``benchmarks.approximation``), one independent draw of W per ``--draws``, on each layer's
   q/k/v.  The combination's **error** is the mean over layers of the mean over draws; its
   **std** the mean over layers of the standard deviation over draws (the spread of a single
   draw, i.e. the estimator's variability).  The attention-matrix error is kept in the JSON.
3. **Speed and memory** of one train step: the rows of a speed-benchmark JSON
   (``--speed_json``) or, otherwise, ``benchmarks.speed.measure_step`` in this process at the
   task's shape; ``--budget`` drops combinations slower than that many ms per step.

Combinations are ranked by error (lowest first).  ``--validate=STUDY_JSON`` adds the measured
test accuracy of every ranked combination in a study (``lra_benchmarks.study``'s
``study.json``) and the Spearman rank correlation between the recommendation score
(``-error``: higher is better) and that accuracy.

    python -m lra_benchmarks.recommend --task=listops --pairs=study \
        --speed_json=docs/benchmarks/speed_h200_listops_text.json \
        --validate=docs/benchmarks/study_listops_h200/study.json --out=recommend_listops

Writes ``recommend.json``, ``recommend.md`` and ``recommend.png`` (needs matplotlib) in
``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import ml_collections
import numpy as np
import scipy.stats

from lra_benchmarks import data as lra_data
from lra_benchmarks import train_lib
from lra_benchmarks.benchmarks import approximation, common, speed

Layers = dict[str, list[tuple]]  # layer path -> [(q, k, v, kv_mask)], q/k/v float32[b, n, h, d]


# ----------------------------------------------------------------------------- combinations


def select_pairs(spec: str) -> list[tuple[str, str]]:
  """The combinations to rank: ``"all"`` (every ``registry.valid_pairs()``), ``"study"`` (the
  study's components x weights, ``configs.base``) or a comma list of ``component:weight``."""
  if spec.strip() == "study":
    base = importlib.import_module("configs.base")
    return [(c, w) for c in base.STUDY_COMPONENTS for w in base.STUDY_WEIGHTS]
  return common.select_pairs(spec)


# ----------------------------------------------------------------------------- q/k statistics


def warmup_config(task: str, *, steps: int, batch: int, length: int, seed: int,
                  data_dir: Optional[str] = None) -> ml_collections.ConfigDict:
  """The task's base config (``configs/base_<task>.py``) with softmax attention, trained for
  ``steps`` steps of ``batch`` sequences cropped to ``length`` tokens (tasks without padding
  keep every pixel), learning rate 1e-3 after ``steps // 10`` warm-up steps, one validation
  batch, no early stopping."""
  config = importlib.import_module(f"configs.base_{task}").get_config()
  config.model.attention = "softmax"
  if lra_data.get_task(task).padded:
    config.max_length = config.seq_len = length
  config.data_dir = data_dir
  config.seed = seed
  config.batch_size = batch
  config.learning_rate = 1e-3
  config.warmup_steps = steps // 10
  config.num_train_steps = config.eval_every = config.checkpoint_every = steps
  config.log_every = max(1, min(config.log_every, steps))
  config.num_eval_steps = 1
  config.patience = 0
  config.progress_bar = False
  return config


def warmup_datasets(config: ml_collections.ConfigDict, examples: int = 0) -> dict[str, dict]:
  """``{"train", "validation", "test"}`` arrays for the warm-up run: the task's splits cropped
  to ``config.max_length``, the evaluation splits cut to ``max(batch_size, examples)`` rows (a
  random sample: splits are shuffled).  Generated ListOps (no ``data_dir``) is a small seeded
  set of one epoch (``num_train_steps * batch_size`` expressions) instead of the full 96k."""
  task = lra_data.get_task(config.task)
  keep = max(config.batch_size, examples)
  options = {}
  if config.task == "listops" and config.data_dir is None:
    options = {"num_train": config.num_train_steps * config.batch_size, "num_val": keep,
               "num_test": keep, "seed": config.seed, "workers": 1, "progress": False}
  out = {}
  for split in ("train", "validation", "test"):
    arrays = task.load(split, data_dir=config.data_dir, max_length=config.max_length, **options)
    out[split] = arrays if split == "train" else {k: v[:keep] for k, v in arrays.items()}
  return out


def warmup_projections(config: ml_collections.ConfigDict, workdir: str, examples: int,
                       datasets: Optional[dict[str, dict]] = None) -> Layers:
  """Trains ``config`` in ``workdir`` (``train_lib.train_and_evaluate``; ``datasets`` default
  ``warmup_datasets``) and returns every layer's q/k/v on ``examples`` validation sequences."""
  datasets = warmup_datasets(config, examples) if datasets is None else datasets
  train_lib.train_and_evaluate(config, workdir, datasets=datasets)
  validation = {k: v[:examples] for k, v in datasets["validation"].items()}
  return approximation.checkpoint_inputs(workdir, max_batch=examples, arrays=validation)


def checkpoint_task(workdir: str) -> str:
  """The task a trainer workdir was trained on (its ``config.json``); FileNotFoundError naming
  what is missing otherwise."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"--checkpoint={workdir}: no such directory; pass the workdir of a "
                            "`python -m lra_benchmarks.train` run of the task.")
  config_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"--checkpoint={workdir} holds no config.json: it is not a trainer "
                            "workdir (pass the --workdir given to lra_benchmarks.train).")
  with open(config_path, encoding="utf-8") as f:
    return json.load(f).get("task")


# ----------------------------------------------------------------------------- error


def approximation_errors(layers: Layers, pairs: Sequence[tuple[str, str]], *, m: int,
                         draws: int, seed: int,
                         log: Callable[[str], None] = lambda _: None) -> list[dict]:
  """One row per pair: ``error``/``error_std`` (attention output) and ``matrix_error``/
  ``matrix_error_std`` (attention matrix), each the mean over layers of the mean / standard
  deviation over ``draws`` draws of W (``approximation.evaluate`` with the first captured
  batch of the layer and ``seed``).  A pair that raises gets None and its ``failure``."""
  rows = []
  with jax.default_matmul_precision("highest"):
    for comp, weight in pairs:
      row: dict[str, Any] = {"component": comp, "weight": weight,
                             "combination": common.pair_name(comp, weight)}
      try:
        per_layer = [approximation.evaluate(comp, weight, m, [batches[0]] * draws, seed)
                     for batches in layers.values()]
        for key, name in (("error", "output_err"), ("matrix_error", "matrix_err")):
          row[key] = float(np.mean([r[name] for r in per_layer]))
          row[f"{key}_std"] = float(np.mean([r[f"{name}_std"] for r in per_layer]))
      except Exception as err:  # pylint: disable=broad-except
        row.update(error=None, error_std=None, failure=f"{type(err).__name__}: {err}"[:300])
      rows.append(row)
      log(f"[recommend] error {row['combination']}: {common.fmt(row['error'])}")
  return rows


# ----------------------------------------------------------------------------- speed


def _speed_entry(row: dict) -> dict[str, Any]:
  """``{"ms_per_step", "memory_mib", "memory_source"}`` of one timed ``benchmarks.speed`` step
  row (memory: fresh-process peak, else static, ``speed.step_memory_bytes``)."""
  memory, source = speed.step_memory_bytes(row)
  return {"ms_per_step": row["median_ms"],
          "memory_mib": None if memory is None else memory / common.MIB,
          "memory_source": source}


def speed_from_json(path: str, task: str) -> dict[str, dict]:
  """``{combination: {"ms_per_step", "memory_mib", "memory_source"}}`` from the step rows of a
  ``benchmarks.speed`` JSON for ``task`` (memory: fresh-process peak, else static)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--speed_json={path}: no such file (a speed.json written by "
                            "python -m lra_benchmarks.benchmarks.speed).")
  with open(path, encoding="utf-8") as f:
    steps = json.load(f).get("steps", [])
  out = {row["attention"]: _speed_entry(row) for row in steps
         if row.get("task") == task and row.get("median_ms") is not None}
  if not out:
    raise ValueError(f"--speed_json={path} has no timed train step of task {task!r}.")
  return out


def measure_speed(task: str, pairs: Sequence[tuple[str, str]], *, m: int, batch: int,
                  length: int, log: Callable[[str], None] = lambda _: None) -> dict[str, dict]:
  """``speed.measure_step`` of every pair in this process (float32, 1 warm-up and 3 timed
  steps of the task's model at ``batch`` x ``length``), in the format of ``speed_from_json``;
  static memory (``memory_analysis``).  Pairs whose step fails are left out."""
  settings = argparse.Namespace(m=m, dtype="", model="", batch=batch, length=length, warmup=1,
                                reps=3)
  out = {}
  for comp, weight in pairs:
    row = speed.measure_step(task, ("spectraformer", comp, weight), settings)
    if "median_ms" in row:
      out[row["attention"]] = _speed_entry(row)
    log(f"[recommend] speed {row['attention']}: "
        + (f"{row['median_ms']:.1f} ms" if "median_ms" in row else row.get("error", "?")[:200]))
  return out


def within_budget(pairs: Sequence[tuple[str, str]], speeds: dict[str, dict],
                  budget_ms: float) -> tuple[list[tuple[str, str]], list[dict]]:
  """(pairs measured at most ``budget_ms`` per step, [{"combination", "reason"}] for the
  others); ValueError when none is left, naming the fastest measured pair."""
  kept, excluded = [], []
  for comp, weight in pairs:
    name = common.pair_name(comp, weight)
    ms = speeds.get(name, {}).get("ms_per_step")
    if ms is None:
      excluded.append({"combination": name, "reason": "no speed measurement"})
    elif ms > budget_ms:
      excluded.append({"combination": name, "reason": f"{ms:.3g} ms/step > budget"})
    else:
      kept.append((comp, weight))
  if not kept:
    timed = {common.pair_name(*p): speeds[common.pair_name(*p)]["ms_per_step"] for p in pairs
             if common.pair_name(*p) in speeds}
    fastest = (f"the fastest is {min(timed, key=timed.get)} at {min(timed.values()):.3g} "
               "ms/step" if timed else "none of them has a speed measurement")
    raise ValueError(f"--budget={budget_ms:g} ms/step excludes every one of the {len(pairs)} "
                     f"combinations: {fastest}.")
  return kept, excluded


# ----------------------------------------------------------------------------- ranking


def rank(rows: Sequence[dict]) -> list[dict]:
  """``rows`` sorted by error (lowest first; failed or non-finite errors last, in input order),
  each with its 1-based ``rank``."""
  def key(indexed):
    i, row = indexed
    error = row.get("error")
    ok = error is not None and math.isfinite(error)
    return (not ok, error if ok else 0.0, i)
  ordered = [dict(row) for _, row in sorted(enumerate(rows), key=key)]
  for i, row in enumerate(ordered):
    row["rank"] = i + 1
  return ordered


def spearman(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
  """Spearman's rank correlation of ``x`` and ``y`` (ties get their mean rank) with its
  two-sided p-value (t approximation, ``scipy.stats.spearmanr``) and ``n``."""
  if len(x) != len(y) or len(x) < 3:
    raise ValueError(f"a rank correlation needs two sequences of the same length >= 3, got "
                     f"lengths {len(x)} and {len(y)}.")
  result = scipy.stats.spearmanr(np.asarray(x, float), np.asarray(y, float))
  return {"rho": float(result.statistic), "p_value": float(result.pvalue), "n": len(x)}


def study_accuracies(path: str, task: str) -> dict[str, float]:
  """``{attention: mean test accuracy (%)}`` of ``task`` in a study's ``study.json``."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--validate={path}: no such file (a study.json written by "
                            "python -m lra_benchmarks.study).")
  with open(path, encoding="utf-8") as f:
    groups = json.load(f).get("groups", [])
  return {g["attention"]: g["accuracy_mean_pct"] for g in groups
          if g.get("task") == task and g.get("accuracy_mean_pct") is not None}


def validate(ranked: list[dict], accuracies: dict[str, float], source: str) -> dict[str, Any]:
  """Adds ``accuracy_pct`` to the ranked rows found in ``accuracies`` and returns the Spearman
  correlation between the score ``-error`` and that accuracy over them (ValueError when fewer
  than 3 ranked combinations with a finite error have an accuracy)."""
  xs, ys = [], []
  for row in ranked:
    acc = accuracies.get(row["combination"])
    row["accuracy_pct"] = acc
    if acc is not None and row.get("error") is not None and math.isfinite(row["error"]):
      xs.append(-row["error"])
      ys.append(acc)
  if len(xs) < 3:
    raise ValueError(f"--validate={source}: only {len(xs)} of the ranked combinations have a "
                     "measured accuracy for this task; the correlation needs at least 3.")
  return {"source": source, "score": "-error (attention-output relative error)",
          **spearman(xs, ys)}


# ----------------------------------------------------------------------------- reports


def table(ranked: Sequence[dict], validation: Optional[dict]) -> str:
  """A markdown table (rank, combination, error, std, ms/step, MiB[, accuracy]) and, when
  validated, the rank correlation line."""
  header = ["rank", "combination", "error", "std", "ms/step", "MiB"]
  if validation:
    header.append("accuracy %")
  rows = []
  for r in ranked:
    cells = [r["rank"], r["combination"], r.get("error"), r.get("error_std"),
             r.get("ms_per_step"), r.get("memory_mib")]
    rows.append(cells + ([r.get("accuracy_pct")] if validation else []))
  text = common.markdown_table(header, rows)
  if validation:
    text += (f"\nSpearman rank correlation between the score (-error) and the measured accuracy "
             f"({validation['source']}): rho = {validation['rho']:+.3f}, p = "
             f"{validation['p_value']:.3g}, n = {validation['n']}.\n")
  return text


def plot(ranked: Sequence[dict], path: str, validation: Optional[dict]) -> bool:
  """Error vs ms/step (and vs accuracy when validated), one labelled point per combination;
  False (nothing written) when matplotlib is missing."""
  try:
    plt = common.pyplot()
  except ImportError:
    return False
  panels = [("ms_per_step", "ms per train step")]
  if validation:
    panels.append(("accuracy_pct", "measured test accuracy (%)"))
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
  for ax, (key, label) in zip(axes[0], panels):
    points = [r for r in ranked if r.get(key) is not None and r.get("error") is not None
              and math.isfinite(r["error"]) and r["error"] > 0]
    ax.scatter([r["error"] for r in points], [r[key] for r in points], s=12)
    for r in points:
      ax.annotate(r["combination"], (r["error"], r[key]), fontsize=6)
    errors = [r["error"] for r in points]
    wide = bool(points) and max(errors) > 10 * min(errors)
    if wide:
      ax.set_xscale("log")
    ax.set_xlabel("relative attention-output error" + (" (log)" if wide else ""))
    ax.set_ylabel(label)
    if not points:
      ax.set_title("no measurements", fontsize=8)
  if validation:
    axes[0][-1].set_title(f"Spearman rho(-error, accuracy) = {validation['rho']:+.2f} "
                          f"(p = {validation['p_value']:.2g}, n = {validation['n']})", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  """Parses the CLI flags (``None``: ``sys.argv[1:]``); argparse exits on malformed ones."""
  p = argparse.ArgumentParser(prog="python -m lra_benchmarks.recommend",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--task", required=True, help=f"one of {', '.join(lra_data.TASKS)}")
  p.add_argument("--pairs", default="all", help="'all', 'study' or component:weight,...")
  p.add_argument("--m", type=int, default=128, help="random features per head")
  p.add_argument("--draws", type=int, default=4, help="draws of W per combination and layer")
  p.add_argument("--seed", type=int, default=0, help="seed of the warm-up run and of the draws")
  p.add_argument("--checkpoint", default=None,
                 help="a trainer workdir of the task: its q/k/v instead of a warm-up run")
  p.add_argument("--examples", type=int, default=2, help="validation sequences scored")
  p.add_argument("--warmup_steps", type=int, default=200)
  p.add_argument("--warmup_batch", type=int, default=8)
  p.add_argument("--warmup_length", type=int, default=512,
                 help="tokens kept per sequence in the warm-up (tasks with padding)")
  p.add_argument("--data_dir", default=None, help="the task's data (default: the task's own)")
  p.add_argument("--speed_json", default=None, help="a benchmarks.speed JSON (speed.json)")
  p.add_argument("--measure_speed", action=argparse.BooleanOptionalAction, default=True,
                 help="without --speed_json: time every combination's train step here")
  p.add_argument("--speed_batch", type=int, default=0, help="0: the task's batch")
  p.add_argument("--speed_length", type=int, default=0, help="0: the task's length")
  p.add_argument("--budget", type=float, default=None, help="ms per train step at most")
  p.add_argument("--validate", default=None, help="a study.json with measured accuracies")
  p.add_argument("--out", default="recommend_results", help="output directory")
  p.add_argument("--quiet", action="store_true")
  return p.parse_args(argv)


def _check(args: argparse.Namespace) -> None:
  """Fails fast, before any computation, on a bad task, path, budget or count."""
  lra_data.get_task(args.task)  # ValueError listing the valid tasks
  for name in ("m", "draws", "examples", "warmup_steps", "warmup_batch", "warmup_length"):
    if getattr(args, name) <= 0:
      raise ValueError(f"--{name}={getattr(args, name)}: must be a positive integer.")
  if args.checkpoint is not None and checkpoint_task(args.checkpoint) != args.task:
    raise ValueError(f"--checkpoint={args.checkpoint} was trained on task "
                     f"{checkpoint_task(args.checkpoint)!r}, not --task={args.task!r}.")
  if args.validate is not None and not os.path.isfile(args.validate):
    raise FileNotFoundError(f"--validate={args.validate}: no such file (a study.json written by "
                            "python -m lra_benchmarks.study).")
  if args.budget is not None:
    if not args.budget > 0:
      raise ValueError(f"--budget={args.budget}: must be a positive number of ms per step.")
    if args.speed_json is None and not args.measure_speed:
      raise ValueError("--budget needs speed figures: give --speed_json or drop "
                       "--no-measure_speed.")


def main(argv: Optional[Sequence[str]] = None) -> dict:
  """Ranks the combinations and writes ``recommend.json``, ``recommend.md`` and
  ``recommend.png`` into ``--out``.

  Raises:
    ValueError / FileNotFoundError naming the bad flag (unknown task, missing checkpoint,
    study or speed file, a budget that excludes every combination).

  Returns:
    {"environment", "settings", "ranking" (rows, best first), "excluded", "validation"}, as
    written to ``recommend.json``.
  """
  args = parse_args(argv)
  _check(args)
  log = (lambda _: None) if args.quiet else (lambda s: print(s, flush=True))
  start = time.time()
  pairs = select_pairs(args.pairs)
  speeds: dict[str, dict] = {}
  if args.speed_json is not None:
    speeds = speed_from_json(args.speed_json, args.task)
  elif args.measure_speed:
    base = importlib.import_module(f"configs.base_{args.task}").get_config()
    speeds = measure_speed(args.task, pairs, m=args.m, batch=args.speed_batch or base.batch_size,
                           length=args.speed_length or base.seq_len, log=log)
  excluded: list[dict] = []
  if args.budget is not None:
    pairs, excluded = within_budget(pairs, speeds, args.budget)
  os.makedirs(args.out, exist_ok=True)
  if args.checkpoint is not None:
    source = f"checkpoint {os.path.abspath(args.checkpoint)}"
    layers = approximation.checkpoint_inputs(args.checkpoint, max_batch=args.examples)
  else:
    config = warmup_config(args.task, steps=args.warmup_steps, batch=args.warmup_batch,
                           length=args.warmup_length, seed=args.seed, data_dir=args.data_dir)
    source = (f"softmax warm-up: {args.warmup_steps} steps, batch {args.warmup_batch}, "
              f"length {config.seq_len}, seed {args.seed}")
    log(f"[recommend] {source}")
    workdir = os.path.join(args.out, f"warmup_s{args.warmup_steps}_b{args.warmup_batch}_"
                           f"n{config.seq_len}_seed{args.seed}")  # reused by a rerun
    layers = warmup_projections(config, workdir, args.examples)
  rows = approximation_errors(layers, pairs, m=args.m, draws=args.draws, seed=args.seed, log=log)
  for row in rows:
    row.update(speeds.get(row["combination"], {}))
  ranked = rank(rows)
  validation = None
  if args.validate is not None:
    validation = validate(ranked, study_accuracies(args.validate, args.task), args.validate)
  settings = {k: v for k, v in vars(args).items() if k != "quiet"}
  settings.update(source=source, layers=list(layers),
                  shape=[list(batches[0][0].shape) for batches in layers.values()],
                  seconds=time.time() - start)
  result = {"environment": common.environment(), "settings": settings, "ranking": ranked,
            "excluded": excluded, "validation": validation}
  common.write_json(os.path.join(args.out, "recommend.json"), result)
  text = (f"# Recommended combinations for {args.task}\n\n"
          + common.environment_markdown(result["environment"])
          + f"\nq/k from: {source}; m = {args.m}, {args.draws} draws.\n\n"
          + table(ranked, validation))
  common.write_text(os.path.join(args.out, "recommend.md"), text)
  if not plot(ranked, os.path.join(args.out, "recommend.png"), validation):
    log("[recommend] matplotlib is not installed: no plot (pip install -e '.[bench]').")
  log(text)
  return result


if __name__ == "__main__":
  try:
    main(sys.argv[1:])
  except (ValueError, FileNotFoundError) as error:
    sys.exit(f"recommend: {error}")
