"""Aggregation and reports of a Spectraformer study (``python -m lra_benchmarks.study``).

A study directory holds one run per ``<task>/<attention>/seed<k>/`` (the trainer's
``results.json`` and the runner's ``study_run.json``). ``collect_runs`` reads them all,
``aggregate`` groups the finished ones by (task, attention), and ``write_reports`` writes
``study.json``, ``study.csv``, ``study.md`` and ``heatmap_<task>.png``.

Accuracies in the reports are test accuracies in percent. Over the seeds of one (task, attention)
the mean is ``sum(a_k) / n`` and the spread the sample standard deviation
``sqrt(sum((a_k - mean)^2) / (n - 1))`` (None for one seed). The mean over tasks of an attention
is the plain mean of its per-task means, over the tasks it has results for.

``--compare=paper`` adds the published numbers of ``PAPER_ACCURACY`` and the difference in the
paper's standard deviations, ``(ours - paper) / paper_std``: how many of the paper's seed-to-seed
spreads our mean lies from its mean.
"""

from __future__ import annotations

import csv
import datetime
import glob
import json
import math
import os
from typing import Any, Iterable, Sequence

import numpy as np

RUN_FILE = "study_run.json"
RESULTS_FILE = "results.json"

PAPER_SOURCE = (
    "Spectraformer (Nguyen, Yin, Joshi, Salim; arXiv:2405.15310), results table of the official "
    "repository's README (github.com/cruiseresearchgroup/spectraformer, section 'Algorithms', "
    "commit 0d85da772edb20a67fd718f6c482afcfbbe2b7a1): test accuracy (%) mean (std) over seeds, "
    "m = 128 features. 'OT' is listed here as softmax; the README's 'OPRF-OR' row is OPRF-ORF "
    "(the only OPRF x ORF row). Flash attention is not in the paper.")

# (mean, std) test accuracy in percent, per attention and task; see PAPER_SOURCE.
PAPER_ACCURACY: dict[str, dict[str, tuple[float, float]]] = {
    "softmax": {"listops": (38.49, 0.80), "text": (59.72, 1.07), "retrieval": (80.86, 0.20),
                "image": (37.48, 0.83), "pathfinder": (67.56, 6.12)},
    "posrf-orf": {"listops": (34.50, 6.49), "text": (61.10, 1.76), "retrieval": (80.53, 0.33),
                  "image": (33.72, 1.03), "pathfinder": (65.52, 4.89)},
    "posrf-sorf": {"listops": (21.91, 5.98), "text": (62.06, 1.36), "retrieval": (66.33, 0.41),
                   "image": (28.70, 3.87), "pathfinder": (52.37, 5.24)},
    "posrf-qmc": {"listops": (37.05, 0.16), "text": (60.93, 0.59), "retrieval": (80.67, 0.29),
                  "image": (34.03, 0.94), "pathfinder": (67.25, 0.44)},
    "posrf-mm": {"listops": (37.13, 0.27), "text": (62.88, 1.17), "retrieval": (80.58, 0.44),
                 "image": (33.82, 0.51), "pathfinder": (67.11, 0.45)},
    "posrf-sgq": {"listops": (28.81, 7.77), "text": (62.30, 0.47), "retrieval": (78.31, 0.39),
                  "image": (37.96, 0.76), "pathfinder": (59.71, 7.87)},
    "posrf-fastfoodl": {"listops": (29.54, 5.46), "text": (64.61, 0.29),
                        "retrieval": (77.10, 1.02), "image": (38.28, 0.43),
                        "pathfinder": (66.38, 0.71)},
    "oprf-orf": {"listops": (38.05, 0.78), "text": (60.18, 0.49), "retrieval": (81.19, 0.23),
                 "image": (33.70, 0.57), "pathfinder": (67.24, 0.88)},
    "oprf-sorf": {"listops": (29.59, 3.77), "text": (64.81, 0.22), "retrieval": (77.12, 0.78),
                  "image": (37.42, 0.47), "pathfinder": (63.98, 5.38)},
    "oprf-qmc": {"listops": (37.86, 0.40), "text": (60.87, 1.85), "retrieval": (80.44, 0.20),
                 "image": (33.87, 0.69), "pathfinder": (66.81, 0.68)},
    "oprf-mm": {"listops": (38.31, 0.38), "text": (60.01, 1.01), "retrieval": (81.03, 0.31),
                "image": (33.93, 0.85), "pathfinder": (65.17, 5.17)},
    "oprf-sgq": {"listops": (37.08, 0.56), "text": (61.09, 0.77), "retrieval": (79.39, 0.94),
                 "image": (36.68, 0.28), "pathfinder": (67.53, 2.79)},
    "oprf-fastfoodl": {"listops": (37.73, 0.28), "text": (64.32, 0.61), "retrieval": (78.65, 1.94),
                       "image": (38.41, 0.66), "pathfinder": (66.76, 0.39)},
    "saderf-orf": {"listops": (37.41, 0.45), "text": (59.92, 0.90), "retrieval": (81.05, 0.18),
                   "image": (33.06, 1.02), "pathfinder": (67.11, 0.56)},
    "saderf-sorf": {"listops": (34.31, 2.50), "text": (64.82, 0.26), "retrieval": (75.24, 1.12),
                    "image": (36.76, 1.22), "pathfinder": (60.98, 4.90)},
    "saderf-qmc": {"listops": (37.18, 0.47), "text": (60.61, 2.06), "retrieval": (80.67, 0.44),
                   "image": (34.55, 0.63), "pathfinder": (67.32, 0.40)},
    "saderf-mm": {"listops": (37.17, 0.27), "text": (60.81, 1.82), "retrieval": (81.05, 0.20),
                  "image": (34.03, 1.04), "pathfinder": (65.31, 4.85)},
    "saderf-sgq": {"listops": (37.22, 0.28), "text": (62.86, 0.96), "retrieval": (78.51, 0.68),
                   "image": (37.82, 0.59), "pathfinder": (61.27, 5.38)},
    "saderf-fastfoodl": {"listops": (29.72, 7.27), "text": (64.71, 0.45),
                         "retrieval": (77.50, 0.96), "image": (38.38, 0.82),
                         "pathfinder": (66.47, 1.47)},
}

COMPARE_CHOICES = ("none", "paper")
TASK_ORDER = ("listops", "text", "retrieval", "image", "pathfinder")


def read_json(path: str) -> dict | None:
  """The JSON object in ``path``; None if the file is missing or not a complete JSON object."""
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def is_complete(results: dict | None) -> bool:
  """True if ``results`` (a parsed results.json) holds a finite ``test_accuracy``."""
  if not results:
    return False
  acc = results.get("test_accuracy")
  return isinstance(acc, (int, float)) and math.isfinite(acc)


def split_attention(attention: str) -> tuple[str | None, str | None]:
  """``"posrf-orf"`` -> ``("posrf", "orf")``; ``"softmax"`` / ``"flash"`` -> ``(None, None)``."""
  if "-" in attention:
    component, weight = attention.split("-", 1)
    return component, weight
  return None, None


def run_row(run_dir: str, root: str) -> dict[str, Any] | None:
  """One run's row from ``run_dir`` = ``root/<task>/<attention>/seed<k>``; None if that folder
  holds neither ``study_run.json`` nor ``results.json``.

  ``status``: "done" (complete results), else the runner's status ("failed", "running") or
  "incomplete" (results.json without test accuracy, or no runner record).
  """
  meta = read_json(os.path.join(run_dir, RUN_FILE))
  results = read_json(os.path.join(run_dir, RESULTS_FILE))
  if meta is None and results is None:
    return None
  rel = os.path.relpath(run_dir, root)
  task, attention, seed_dir = rel.split(os.sep)[-3:]
  meta = meta or {}
  results = results or {}
  done = is_complete(results)
  status = "done" if done else meta.get("status", "incomplete")
  if status == "done" and not done:
    status = "incomplete"
  component, weight = split_attention(attention)
  acc = results.get("test_accuracy") if done else None
  val = results.get("validation_accuracy", results.get("best_validation_accuracy"))
  return {
      "task": task, "attention": attention, "component": component, "weight": weight,
      "seed": int(seed_dir[len("seed"):]) if seed_dir.startswith("seed") else seed_dir,
      "status": status,
      "test_accuracy_pct": 100.0 * acc if acc is not None else None,
      "validation_accuracy_pct": 100.0 * val if done and isinstance(val, (int, float)) else None,
      "protocol": results.get("protocol"),
      "best_step": results.get("best_step"),
      "steps": results.get("steps"),
      "train_wall_time_s": results.get("train_wall_time_s"),
      "steps_per_second": results.get("steps_per_second"),
      "peak_memory_bytes": results.get("peak_memory_bytes"),
      "peak_memory_source": results.get("peak_memory_source"),
      "device_kind": results.get("device_kind"),
      "overrides": meta.get("overrides"),
      "wall_s": meta.get("wall_s"),
      "error": meta.get("error") if status == "failed" else None,
      "dir": rel,
  }


def collect_runs(root: str) -> list[dict[str, Any]]:
  """Rows (``run_row``) of every run under ``root/<task>/<attention>/seed<k>/``, sorted by
  task (LRA order), attention and seed."""
  rows = []
  for run_dir in glob.glob(os.path.join(root, "*", "*", "seed*")):
    if os.path.isdir(run_dir):
      row = run_row(run_dir, root)
      if row is not None:
        rows.append(row)
  rows.sort(key=lambda r: (_task_rank(r["task"]), r["attention"], str(r["seed"])))
  return rows


def _task_rank(task: str) -> tuple[int, str]:
  return (TASK_ORDER.index(task) if task in TASK_ORDER else len(TASK_ORDER), task)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
  """(mean, sample standard deviation with n - 1; None when n < 2) of ``values`` (n >= 1)."""
  a = np.asarray(values, dtype=np.float64)
  if a.size == 0:
    raise ValueError("mean_std needs at least one value")
  return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1 else None)


def _mean_of(rows: Iterable[dict], key: str) -> float | None:
  vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
  return float(np.mean(vals)) if vals else None


def paper_entry(task: str, attention: str) -> tuple[float, float] | None:
  """The paper's (mean, std) accuracy in percent for ``attention`` on ``task``, or None."""
  return PAPER_ACCURACY.get(attention, {}).get(task)


def aggregate(rows: Sequence[dict], compare: str = "none") -> dict[str, Any]:
  """Groups the finished ``rows`` by (task, attention) and by attention.

  Returns ``{"groups": [...], "attentions": [...]}``: per group ``n``, ``seeds``,
  ``accuracy_mean_pct``, ``accuracy_std_pct``, means of ``train_wall_time_s`` and
  ``steps_per_second``, the largest ``peak_memory_bytes``, and (``compare="paper"``)
  ``paper_mean_pct``, ``paper_std_pct``, ``diff_pct`` = ours - paper and
  ``diff_paper_std`` = diff / paper std. Per attention: the mean over its tasks of the
  accuracy means (``accuracy_mean_over_tasks_pct``, ``tasks``), of the train time and of
  the peak memory.
  """
  if compare not in COMPARE_CHOICES:
    raise ValueError(f"compare must be one of {COMPARE_CHOICES}, got {compare!r}")
  done = [r for r in rows if r["status"] == "done"]
  keys = sorted({(r["task"], r["attention"]) for r in done},
                key=lambda k: (_task_rank(k[0]), k[1]))
  groups = []
  for task, attention in keys:
    members = [r for r in done if (r["task"], r["attention"]) == (task, attention)]
    mean, std = mean_std([r["test_accuracy_pct"] for r in members])
    memory = [r["peak_memory_bytes"] for r in members
              if isinstance(r.get("peak_memory_bytes"), (int, float))]
    group = {
        "task": task, "attention": attention, "n": len(members),
        "seeds": sorted(r["seed"] for r in members),
        "accuracy_mean_pct": mean, "accuracy_std_pct": std,
        "train_wall_time_s": _mean_of(members, "train_wall_time_s"),
        "steps_per_second": _mean_of(members, "steps_per_second"),
        "peak_memory_bytes": max(memory) if memory else None,
        "peak_memory_source": members[0].get("peak_memory_source"),
        "mixed_overrides": len({json.dumps(r.get("overrides")) for r in members}) > 1,
    }
    if compare == "paper":
      paper = paper_entry(task, attention)
      group["paper_mean_pct"], group["paper_std_pct"] = paper if paper else (None, None)
      group["diff_pct"] = mean - paper[0] if paper else None
      group["diff_paper_std"] = (mean - paper[0]) / paper[1] if paper and paper[1] > 0 else None
    groups.append(group)

  attentions = []
  for attention in sorted({g["attention"] for g in groups}):
    mine = [g for g in groups if g["attention"] == attention]
    entry = {
        "attention": attention, "tasks": [g["task"] for g in mine],
        "accuracy_mean_over_tasks_pct": float(np.mean([g["accuracy_mean_pct"] for g in mine])),
        "train_wall_time_s": _mean_of(mine, "train_wall_time_s"),
        "steps_per_second": _mean_of(mine, "steps_per_second"),
        "peak_memory_bytes": _mean_of(mine, "peak_memory_bytes"),
    }
    if compare == "paper":
      papers = [paper_entry(g["task"], attention) for g in mine]
      entry["paper_mean_over_tasks_pct"] = (float(np.mean([p[0] for p in papers]))
                                            if papers and all(papers) else None)
    attentions.append(entry)
  attentions.sort(key=lambda e: -e["accuracy_mean_over_tasks_pct"])
  return {"groups": groups, "attentions": attentions}


# ------------------------------------------------------------------------------- formatting


def _fmt(value: float | None, digits: int = 2) -> str:
  return "" if value is None else f"{value:.{digits}f}"


def _fmt_acc(mean: float | None, std: float | None, n: int | None = None) -> str:
  if mean is None:
    return ""
  text = f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")
  return text + (f" (n={n})" if n is not None else "")


def _mib(value: float | None) -> str:
  return "" if value is None else f"{value / 2**20:.0f}"


def markdown(rows: Sequence[dict], agg: dict, compare: str, title: str) -> str:
  """The study as Markdown: accuracy per task (and the paper's, with the difference), the
  mean over tasks, efficiency, failed runs and every run."""
  tasks = sorted({g["task"] for g in agg["groups"]}, key=_task_rank)
  by_key = {(g["task"], g["attention"]): g for g in agg["groups"]}
  counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "failed")}
  other = len(rows) - counts["done"] - counts["failed"]
  now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  out = [f"# {title}", "",
         f"{len(rows)} runs: {counts['done']} finished, {counts['failed']} failed, "
         f"{other} unfinished. Written {now}.", "",
         "## Test accuracy (%)", "",
         "Mean ± sample standard deviation over seeds (n = number of seeds); the last column is "
         "the mean over the tasks shown.", ""]
  header = ["attention"]
  for task in tasks:
    header.append(task)
    if compare == "paper":
      header += [f"{task} paper", f"{task} Δ (paper σ)"]
  header.append("mean over tasks")
  if compare == "paper":
    header.append("paper mean")
  out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for entry in agg["attentions"]:
    cells = [entry["attention"]]
    for task in tasks:
      g = by_key.get((task, entry["attention"]))
      cells.append(_fmt_acc(g["accuracy_mean_pct"], g["accuracy_std_pct"], g["n"]) if g else "")
      if compare == "paper":
        paper = paper_entry(task, entry["attention"])
        cells.append(_fmt_acc(*paper) if paper else "n/a")
        cells.append(f"{g['diff_pct']:+.2f} ({g['diff_paper_std']:+.1f}σ)"
                     if g and g.get("diff_paper_std") is not None else "")
    cells.append(_fmt(entry["accuracy_mean_over_tasks_pct"]) +
                 ("" if len(entry["tasks"]) == len(tasks) else
                  f" ({len(entry['tasks'])}/{len(tasks)} tasks)"))
    if compare == "paper":
      cells.append(_fmt(entry.get("paper_mean_over_tasks_pct")))
    out.append("| " + " | ".join(cells) + " |")
  if compare == "paper":
    out += ["", f"Paper: {PAPER_SOURCE} Δ = ours − paper in points; (σ) = Δ / paper's std. "
            "n/a: the paper has no number for it."]
  if any(g["mixed_overrides"] for g in agg["groups"]):
    mixed = [f"{g['task']}/{g['attention']}" for g in agg["groups"] if g["mixed_overrides"]]
    out += ["", f"**Warning:** runs with different `--set` overrides are averaged in: "
            f"{', '.join(mixed)}."]
  out += ["", "## Efficiency", "",
          "Mean over seeds of the training wall time (evaluation and checkpoints included) and "
          "of train steps per second; the largest peak device memory.", "",
          "| task | attention | train time (s) | steps/s | peak memory (MiB) | memory source |",
          "|---|---|---|---|---|---|"]
  for g in agg["groups"]:
    out.append(f"| {g['task']} | {g['attention']} | {_fmt(g['train_wall_time_s'], 1)} | "
               f"{_fmt(g['steps_per_second'])} | {_mib(g['peak_memory_bytes'])} | "
               f"{g['peak_memory_source'] or ''} |")
  failed = [r for r in rows if r["status"] == "failed"]
  if failed:
    out += ["", "## Failed runs", ""]
    for r in failed:
      last = (r.get("error") or "").strip().splitlines()[-1:] or ["(no output)"]
      out.append(f"- `{r['dir']}`: {last[0]} (log: `{r['dir']}/train.log`)")
  out += ["", "## Runs", "",
          "| task | attention | seed | status | test acc | val acc | best step | steps | "
          "train time (s) | steps/s | peak memory (MiB) |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    out.append(f"| {r['task']} | {r['attention']} | {r['seed']} | {r['status']} | "
               f"{_fmt(r['test_accuracy_pct'])} | {_fmt(r['validation_accuracy_pct'])} | "
               f"{r['best_step'] if r['best_step'] is not None else ''} | "
               f"{r['steps'] if r['steps'] is not None else ''} | "
               f"{_fmt(r['train_wall_time_s'], 1)} | {_fmt(r['steps_per_second'])} | "
               f"{_mib(r['peak_memory_bytes'])} |")
  return "\n".join(out) + "\n"


CSV_FIELDS = ("row", "task", "attention", "component", "weight", "seed", "n", "status",
              "accuracy_pct", "accuracy_std_pct", "validation_accuracy_pct", "paper_mean_pct",
              "paper_std_pct", "diff_paper_std", "best_step", "steps", "train_wall_time_s",
              "steps_per_second", "peak_memory_bytes", "dir")


def csv_rows(rows: Sequence[dict], agg: dict) -> list[dict[str, Any]]:
  """Flat CSV records: one ``row="run"`` per run, one ``row="aggregate"`` per (task,
  attention); columns ``CSV_FIELDS``."""
  out = []
  for r in rows:
    out.append({**{k: r.get(k) for k in CSV_FIELDS}, "row": "run",
                "accuracy_pct": r["test_accuracy_pct"]})
  for g in agg["groups"]:
    component, weight = split_attention(g["attention"])
    out.append({**{k: g.get(k) for k in CSV_FIELDS}, "row": "aggregate", "component": component,
                "weight": weight, "status": "done", "accuracy_pct": g["accuracy_mean_pct"]})
  return out


# --------------------------------------------------------------------------------- heatmaps


def heatmap_grid(groups: Sequence[dict], task: str,
                 components: Sequence[str] = (), weights: Sequence[str] = ()
                 ) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
  """Component x weight grids of the mean and std accuracy (NaN where there is no result) of
  ``task``. Rows: ``components`` first, then any other component with results (sorted);
  columns likewise from ``weights``."""
  pairs = [g for g in groups if g["task"] == task and split_attention(g["attention"])[0]]
  have_c = {split_attention(g["attention"])[0] for g in pairs}
  have_w = {split_attention(g["attention"])[1] for g in pairs}
  rows = [c for c in components if c in have_c] + sorted(have_c - set(components))
  cols = [w for w in weights if w in have_w] + sorted(have_w - set(weights))
  mean = np.full((len(rows), len(cols)), np.nan)
  std = np.full((len(rows), len(cols)), np.nan)
  for g in pairs:
    c, w = split_attention(g["attention"])
    mean[rows.index(c), cols.index(w)] = g["accuracy_mean_pct"]
    if g["accuracy_std_pct"] is not None:
      std[rows.index(c), cols.index(w)] = g["accuracy_std_pct"]
  return rows, cols, mean, std


def write_heatmap(path: str, task: str, groups: Sequence[dict],
                  components: Sequence[str] = (), weights: Sequence[str] = ()) -> bool:
  """Writes the annotated component x weight heatmap of ``task`` (mean test accuracy, with
  the std over seeds) to ``path``; the exact baselines go in the title. Returns False (and
  writes nothing) when the task has no component-weight result."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  rows, cols, mean, std = heatmap_grid(groups, task, components, weights)
  if not rows:
    return False
  fig, ax = plt.subplots(figsize=(1.3 * len(cols) + 2.5, 0.9 * len(rows) + 1.8))
  im = ax.imshow(np.ma.masked_invalid(mean), cmap="viridis", aspect="auto")
  ax.set_xticks(range(len(cols)), cols)
  ax.set_yticks(range(len(rows)), rows)
  ax.set_xlabel("weight matrix")
  ax.set_ylabel("component function")
  finite = mean[np.isfinite(mean)]
  middle = (finite.min() + finite.max()) / 2
  for i in range(len(rows)):
    for j in range(len(cols)):
      if np.isfinite(mean[i, j]):
        text = f"{mean[i, j]:.2f}" + (f"\n±{std[i, j]:.2f}" if np.isfinite(std[i, j]) else "")
        ax.text(j, i, text, ha="center", va="center", fontsize=8,
                color="black" if mean[i, j] > middle else "white")
      else:
        ax.text(j, i, "—", ha="center", va="center", color="grey")
  baselines = [f"{g['attention']} {g['accuracy_mean_pct']:.2f}" for g in groups
               if g["task"] == task and not split_attention(g["attention"])[0]]
  ax.set_title(f"{task}: test accuracy (%)" + (f"  [{', '.join(baselines)}]" if baselines else ""))
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def _atomic_write(path: str, text: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8", newline="") as f:
    f.write(text)
  os.replace(tmp, path)


def write_reports(root: str, *, compare: str = "none", heatmaps: bool = True,
                  components: Sequence[str] = (), weights: Sequence[str] = (),
                  say=print) -> dict[str, Any]:
  """Writes ``root/study.{json,csv,md}`` and (``heatmaps``) ``root/heatmap_<task>.png`` from
  every run under ``root``; returns the study.json content. Without matplotlib the heatmaps
  are skipped and ``say`` is told so."""
  rows = collect_runs(root)
  agg = aggregate(rows, compare)
  study = {"root": os.path.abspath(root), "compare": compare,
           "paper_source": PAPER_SOURCE if compare == "paper" else None,
           "runs": rows, **agg}
  _atomic_write(os.path.join(root, "study.json"), json.dumps(study, indent=1) + "\n")
  tmp = os.path.join(root, f"study.csv.tmp-{os.getpid()}")
  with open(tmp, "w", encoding="utf-8", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(csv_rows(rows, agg))
  os.replace(tmp, os.path.join(root, "study.csv"))
  _atomic_write(os.path.join(root, "study.md"),
                markdown(rows, agg, compare, f"Spectraformer study: {os.path.abspath(root)}"))
  if heatmaps:
    try:
      import matplotlib  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      say("matplotlib is not installed: heatmaps skipped (pip install matplotlib).")
    else:
      for task in sorted({g["task"] for g in agg["groups"]}, key=_task_rank):
        write_heatmap(os.path.join(root, f"heatmap_{task}.png"), task, agg["groups"],
                      components, weights)
  return study
