r"""The Spectraformer study in one command: tasks x attentions x seeds, then the tables.

  python -m lra_benchmarks.study --tasks=listops,text \
      --attentions=posrf-orf,oprf-fastfoodl,softmax,flash --seeds=0,1,2 --workdir=DIR \
      [--set=num_train_steps=2000 --set=model.num_features=256] [--concurrent=4] \
      [--data_dir=text:/data/imdb] [--compare=paper]

Every run is a subprocess ``python -m lra_benchmarks.train --config=configs/<task>_<c>_<w>.py
--workdir=DIR/<task>/<attention>/seed<k> --config.seed=k --config.KEY=VALUE ...`` (a pair
without its own config file uses ``configs/<task>_softmax.py`` with the attention set by
overrides), its output in ``train.log`` and the runner's record in ``study_run.json`` of that
folder. ``--attentions`` takes ``<component>-<weight>`` names, ``softmax``, ``flash``, ``study``
(the study's 3 x 6 pairs of ``lra_benchmarks.config_lib`` plus softmax and flash) and ``all`` (every pair of
``spectraformer_jax.registry.valid_pairs()`` plus softmax and flash).

Re-running the same command is safe: a run whose ``results.json`` is complete and whose config
equals the requested one is skipped; an unfinished run resumes from the checkpoints in its folder
(the trainer does that); a folder that holds a different config is left alone and reported. A
failed run is recorded with the end of its log and the study goes on. ``--concurrent=N`` runs N
trainings at once on one accelerator, each limited to ``0.9 / N`` of its memory
(``XLA_PYTHON_CLIENT_MEM_FRACTION``). With several GPUs, ``--placement=per_device`` gives each
run one GPU of its own (``CUDA_VISIBLE_DEVICES``, ``HIP_VISIBLE_DEVICES`` on ROCm), started
round-robin, ``--concurrent`` runs per GPU; ``--placement=shared`` (the default) lets every run
use every device (one run sharded over all, the faster choice for few long runs). After every
run the reports ``DIR/study.{md,csv,json}`` are rewritten from every run found under DIR (so
several invocations into one DIR add up), and at the end ``DIR/heatmap_<task>.png``;
``lra_benchmarks.study_report`` describes them.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor, as_completed
import dataclasses
import datetime
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Sequence

from absl import flags
from ml_collections import config_flags

from lra_benchmarks import config_lib
from lra_benchmarks import study_report
from lra_benchmarks.data import listops
from spectraformer_jax import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
BASELINES = ("softmax", "flash")
LOG_FILE = "train.log"
MEMORY_BUDGET = 0.9  # fraction of the accelerator's memory shared by the concurrent runs
# Keys that say how a run is logged, checkpointed or placed in memory, not what it computes:
# not compared when deciding whether a finished run is the requested one.
IGNORED_CONFIG_KEYS = ("progress_bar", "log_every", "checkpoint_every", "checkpoint_every_seconds",
                       "keep_checkpoints", "memory_fraction", "resume")
FORBIDDEN_SET_KEYS = {"seed": "use --seeds", "task": "use --tasks"}
ERROR_TAIL_LINES = 20
PLACEMENTS = ("shared", "per_device")
# The variable that restricts a process to some accelerators, by jax platform (GPUs: by the
# runtime named in the client's platform version).
VISIBLE_DEVICES = {"cuda": "CUDA_VISIBLE_DEVICES", "rocm": "HIP_VISIBLE_DEVICES"}


def _study_constants() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
  """(TASKS, STUDY_COMPONENTS, STUDY_WEIGHTS) of ``lra_benchmarks.config_lib``."""
  return config_lib.TASKS, config_lib.STUDY_COMPONENTS, config_lib.STUDY_WEIGHTS


def _split_list(value: str, what: str) -> list[str]:
  items = [v.strip() for v in value.split(",") if v.strip()]
  if not items:
    raise ValueError(f"--{what} is empty; give a comma-separated list")
  return list(dict.fromkeys(items))  # order kept, duplicates dropped


def parse_tasks(value: str) -> list[str]:
  """``"listops,text"`` (or ``"all"``) -> task names; ValueError naming an unknown one."""
  tasks, _, _ = _study_constants()
  names = _split_list(value, "tasks")
  if names == ["all"]:
    return list(tasks)
  for name in names:
    if name not in tasks:
      raise ValueError(f"--tasks: unknown task {name!r}; valid: {', '.join(tasks)} or all")
  return names


def parse_attentions(value: str) -> list[str]:
  """``--attentions`` -> attention names (``<component>-<weight>``, softmax, flash), with
  ``study`` and ``all`` expanded, in order, without duplicates.

  Raises:
    ValueError: a name that is not a baseline nor a valid (component, weight) pair.
  """
  _, components, weights = _study_constants()
  out = []
  for name in _split_list(value, "attentions"):
    if name == "study":
      out += [f"{c}-{w}" for c in components for w in weights] + list(BASELINES)
    elif name == "all":
      out += [f"{c}-{w}" for c, w in registry.valid_pairs()] + list(BASELINES)
    elif name in BASELINES:
      out.append(name)
    else:
      component, _, weight = name.partition("-")
      if not weight or not _is_valid_pair(component, weight, components, weights):
        raise ValueError(
            f"--attentions: {name!r} is not a valid attention; use softmax, flash, study, all "
            "or <component>-<weight> with a pair of spectraformer_jax.registry.valid_pairs(), "
            f"e.g. posrf-orf (study components {', '.join(components)}; study weights "
            f"{', '.join(weights)})")
      out.append(name)
  return list(dict.fromkeys(out))


def _is_valid_pair(component: str, weight: str, components: Sequence[str],
                   weights: Sequence[str]) -> bool:
  if component in components and weight in weights:
    return True
  return (component, weight) in registry.valid_pairs()


def parse_seeds(value: str) -> list[int]:
  """``"0,1,2"`` -> ``[0, 1, 2]``; ValueError for a non-integer or negative seed."""
  seeds = []
  for item in _split_list(value, "seeds"):
    try:
      seed = int(item)
    except ValueError:
      raise ValueError(f"--seeds: {item!r} is not an integer") from None
    if seed < 0:
      raise ValueError(f"--seeds: {seed} is negative")
    seeds.append(seed)
  return seeds


def parse_sets(values: Sequence[str]) -> list[str]:
  """``["num_train_steps=20", ...]`` -> ``["--config.num_train_steps=20", ...]``.

  Raises:
    ValueError: an item without ``=``, or a key the runner sets itself (seed, task).
  """
  out = []
  for item in values:
    key, eq, value = item.partition("=")
    key = key.strip().removeprefix("config.")
    if not eq or not key:
      raise ValueError(f"--set={item!r}: expected KEY=VALUE, e.g. --set=num_train_steps=2000")
    if key in FORBIDDEN_SET_KEYS:
      raise ValueError(f"--set={item!r}: {key} is set per run; {FORBIDDEN_SET_KEYS[key]}")
    out.append(f"--config.{key}={value}")
  return out


def parse_data_dirs(values: Sequence[str], tasks: Sequence[str]) -> dict[str, str]:
  """``["text:/data/imdb", ...]`` -> ``{"text": "/abs/data/imdb"}``.

  Raises:
    ValueError: an item not of the form TASK:PATH, or an unknown task.
  """
  out = {}
  for item in values:
    task, colon, path = item.partition(":")
    if not colon or not path:
      raise ValueError(f"--data_dir={item!r}: expected TASK:PATH, e.g. --data_dir=text:/data")
    if task not in tasks:
      raise ValueError(f"--data_dir={item!r}: unknown task {task!r}; valid: {', '.join(tasks)}")
    out[task] = os.path.abspath(os.path.expanduser(path))
  return out


@dataclasses.dataclass(frozen=True)
class Run:
  """One training of the study: ``task`` x ``attention`` x ``seed``."""
  task: str
  attention: str
  seed: int
  config_file: str           # absolute path of the config file
  overrides: tuple[str, ...]  # "--config.KEY=VALUE" after --config.seed

  @property
  def name(self) -> str:
    return f"{self.task}/{self.attention}/seed{self.seed}"

  def workdir(self, root: str) -> str:
    return os.path.join(root, self.task, self.attention, f"seed{self.seed}")

  def flags(self) -> list[str]:
    """The trainer's config flags: ``--config=FILE --config.seed=k`` and the overrides."""
    return [f"--config={self.config_file}", f"--config.seed={self.seed}", *self.overrides]

  def command(self, root: str, python: str) -> list[str]:
    return [python, "-m", "lra_benchmarks.train", *self.flags(), f"--workdir={self.workdir(root)}"]


def make_runs(tasks: Sequence[str], attentions: Sequence[str], seeds: Sequence[int],
              sets: Sequence[str], data_dirs: dict[str, str]) -> list[Run]:
  """Runs ordered seed-major (every attention gets seed 0 before any gets seed 1), then task.

  Overrides, in order (the trainer applies the last one): the attention of a pair without its
  own config file, ``progress_bar=False``, ``data_dir`` from ``data_dirs``, then ``sets``.
  """
  runs = []
  for seed in seeds:
    for task in tasks:
      for attention in attentions:
        extra = []
        if attention in BASELINES:
          config_file = os.path.join(CONFIGS, f"{task}_{attention}.py")
        else:
          component, weight = attention.split("-", 1)
          config_file = os.path.join(CONFIGS, f"{task}_{component}_{weight}.py")
          if not os.path.exists(config_file):
            config_file = os.path.join(CONFIGS, f"{task}_softmax.py")
            extra = ["--config.model.attention=spectraformer",
                     f"--config.model.component={component}", f"--config.model.weight={weight}"]
        if not os.path.exists(config_file):
          raise ValueError(f"no config file {config_file} for {task}/{attention}")
        extra.append("--config.progress_bar=False")
        if task in data_dirs:
          extra.append(f"--config.data_dir={data_dirs[task]}")
        runs.append(Run(task, attention, seed, config_file, tuple(extra) + tuple(sets)))
  return runs


def resolve_config(run: Run) -> dict[str, Any]:
  """The config the trainer will build for ``run`` (same parser: ml_collections'
  ``config_flags``), as the JSON-normalised dict the trainer stores in results.json.

  Raises:
    ValueError: an override names no config field or has a bad value (the parser's message).
  """
  argv = ["study", *run.flags()]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=values,
                                  lock_config=True, sys_argv=argv)
  try:
    values(argv)
    config = values["config"].value
  except Exception as e:  # absl and ml_collections raise assorted errors for a bad override
    raise ValueError(f"{run.name}: bad config override ({type(e).__name__}: {e})") from e
  return normalise_config(config.to_dict())


def normalise_config(config: dict[str, Any]) -> dict[str, Any]:
  """JSON round trip (as results.json stores it) without the keys that do not change results."""
  out = json.loads(json.dumps(config, default=str))
  for key in IGNORED_CONFIG_KEYS:
    out.pop(key, None)
  return out


def config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
  """Dotted keys whose values differ between the nested dicts ``a`` and ``b`` (keys present in
  one only included), ignoring ``IGNORED_CONFIG_KEYS`` at the top level."""
  out = []
  for key in sorted(set(a) | set(b)):
    if not prefix and key in IGNORED_CONFIG_KEYS:
      continue
    va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
    if isinstance(va, dict) and isinstance(vb, dict):
      out += config_diff(va, vb, f"{prefix}{key}.")
    elif va != vb:
      out.append(f"{prefix}{key}")
  return out


def run_state(run_dir: str, requested: dict[str, Any]) -> tuple[str, str]:
  """What to do with a run folder: ``("done" | "resume" | "new" | "conflict", detail)``.

  The recorded config is the first of results.json's ``config`` (when complete), the runner's
  ``study_run.json`` and the trainer's ``config.json``; a difference from ``requested`` is a
  conflict (detail: the differing keys).
  """
  results = study_report.read_json(os.path.join(run_dir, study_report.RESULTS_FILE))
  complete = study_report.is_complete(results)
  meta = study_report.read_json(os.path.join(run_dir, study_report.RUN_FILE)) or {}
  if complete and isinstance(results.get("config"), dict):
    recorded = results["config"]
  elif isinstance(meta.get("config"), dict):
    recorded = meta["config"]
  else:
    recorded = study_report.read_json(os.path.join(run_dir, "config.json"))
  if recorded is not None:
    diff = config_diff(normalise_config(recorded), requested)
    if diff:
      return "conflict", ", ".join(diff[:8]) + (" ..." if len(diff) > 8 else "")
  if complete:
    return "done", f"test accuracy {100 * results['test_accuracy']:.2f}%"
  if os.path.isdir(os.path.join(run_dir, "checkpoints")):
    return "resume", "from its checkpoints"
  return "new", ""


def prepare_data(runs: Sequence[Run], say: Callable[[str], None] = print) -> None:
  """Generates the default ListOps set once, before concurrent trainings would each generate
  it, when a ListOps run has no ``data_dir`` override."""
  if any(run.task == "listops" and not any(o.startswith("--config.data_dir=")
                                           for o in run.overrides) for run in runs):
    if not os.path.exists(os.path.join(listops.generated_dir(), "tokens.npz")):
      say("Generating the ListOps set once for every run ...")
    listops.ensure_generated()


def child_env(concurrent: int, preallocate: bool,
              base: dict[str, str] | None = None) -> dict[str, str]:
  """The environment of each training: ``base`` (default ``os.environ``), plus, when
  ``concurrent > 1``, ``XLA_PYTHON_CLIENT_MEM_FRACTION = 0.9 / concurrent`` and
  ``XLA_PYTHON_CLIENT_PREALLOCATE`` (``true``: reserve that share at start; ``false``: grow
  up to it)."""
  env = dict(os.environ if base is None else base)
  if concurrent > 1:
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{MEMORY_BUDGET / concurrent:.4f}"
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "true" if preallocate else "false"
  return env


def device_slots(devices: Sequence[str], per_device: int) -> list[str]:
  """``per_device`` places on each of ``devices``, round-robin: ``[d0, d1, ..., d0, d1, ...]``
  (so the first ``len(devices)`` runs start on different devices)."""
  if not devices:
    raise ValueError("--placement=per_device found no devices to place runs on.")
  return [d for _ in range(per_device) for d in devices]


def detect_devices(python: str, environ: dict[str, str] | None = None) -> tuple[str, list[str]]:
  """``(variable, ids)``: the visible-devices variable of this machine's accelerators and the
  ids to give it, one per local device (the entries of that variable when it is already set,
  else ``0..n-1``). Asks ``python`` in a subprocess so that this process never holds a device.

  Raises ValueError when the accelerators have no such variable (CPU, TPU).
  """
  environ = dict(os.environ if environ is None else environ)
  probe = ("import jax; d = jax.local_devices()[0]; "
           "print(d.platform, len(jax.local_devices()), d.client.platform_version.lower())")
  out = subprocess.run([python, "-c", probe], env={**environ,
                                                   "XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
                       capture_output=True, text=True, check=False)
  if out.returncode != 0:
    raise ValueError(f"--placement=per_device: could not list the devices: {out.stderr[-300:]}")
  platform, count, version = out.stdout.strip().splitlines()[-1].split(" ", 2)
  runtime = "rocm" if platform == "gpu" and "rocm" in version else (
      "cuda" if platform in ("gpu", "cuda") else platform)
  if runtime not in VISIBLE_DEVICES:
    raise ValueError(f"--placement=per_device needs GPUs (CUDA or ROCm); this machine's devices "
                     f"are {platform}: use --placement=shared.")
  variable = VISIBLE_DEVICES[runtime]
  given = [d for d in environ.get(variable, "").split(",") if d.strip()]
  return variable, given[:int(count)] if given else [str(i) for i in range(int(count))]


def _write_json(path: str, value: dict) -> None:
  tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class _Children:
  """The live training processes, so that an interrupted study stops them too."""

  def __init__(self):
    self._lock = threading.Lock()
    self._procs: set[subprocess.Popen] = set()
    self.stopping = False

  def start(self, *args, **kwargs) -> subprocess.Popen:
    with self._lock:
      if self.stopping:
        raise KeyboardInterrupt("study interrupted")
      proc = subprocess.Popen(*args, **kwargs)
      self._procs.add(proc)
      return proc

  def done(self, proc: subprocess.Popen) -> None:
    with self._lock:
      self._procs.discard(proc)

  def stop_all(self) -> None:
    with self._lock:
      self.stopping = True
      procs = list(self._procs)
    for proc in procs:
      proc.terminate()
    for proc in procs:
      try:
        proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        proc.kill()


def execute(run: Run, root: str, config: dict[str, Any], *, python: str, env: dict[str, str],
            children: _Children) -> dict[str, Any]:
  """Trains ``run`` in its folder (log appended to ``train.log``) and records the outcome in
  ``study_run.json``: status "done", "interrupted" (the study was stopped), or "failed" with
  the last lines of this attempt's log."""
  run_dir = run.workdir(root)
  os.makedirs(run_dir, exist_ok=True)
  meta_path = os.path.join(run_dir, study_report.RUN_FILE)
  command = run.command(root, python)
  meta = {"task": run.task, "attention": run.attention, "seed": run.seed, "status": "running",
          "command": command, "overrides": list(run.overrides), "config": config,
          "started": _now()}
  _write_json(meta_path, meta)
  log_path = os.path.join(run_dir, LOG_FILE)
  start = time.perf_counter()
  with open(log_path, "ab") as log:
    offset = log.tell()
    log.write(f"=== {_now()} {' '.join(command)}\n".encode())
    log.flush()
    proc = children.start(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
      returncode = proc.wait()
    finally:
      children.done(proc)
  meta["wall_s"] = time.perf_counter() - start
  meta["returncode"] = returncode
  meta["finished"] = _now()
  results = study_report.read_json(os.path.join(run_dir, study_report.RESULTS_FILE))
  if returncode == 0 and study_report.is_complete(results):
    meta["status"] = "done"
    meta["test_accuracy"] = results["test_accuracy"]
  elif children.stopping:
    meta["status"] = "interrupted"  # stopped by the study; the next run of it resumes here
  else:
    meta["status"] = "failed"
    with open(log_path, "rb") as f:
      f.seek(offset)
      tail = f.read().decode("utf-8", "replace").replace("\r", "\n").splitlines()
    tail = [line for line in tail if line.strip()][-ERROR_TAIL_LINES:]
    why = (f"exit code {returncode}" if returncode else
           "exit code 0 but results.json has no test accuracy")
    meta["error"] = "\n".join([why, *tail])
  _write_json(meta_path, meta)
  return meta


def _interrupt(signum: int, frame: Any) -> None:
  """SIGTERM handler: stop the study as Ctrl-C does (the trainings are terminated)."""
  del frame
  raise KeyboardInterrupt(f"signal {signum}")


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
  """One line per run: its position, outcome, and elapsed time and ETA of the study (the mean
  wall time of the runs trained so far, times the runs left, over the concurrency)."""

  def __init__(self, total: int, to_train: int, concurrent: int,
               say: Callable[[str], None] = print):
    self.total, self.left, self.concurrent, self.say = total, to_train, concurrent, say
    self.count = 0
    self.walls: list[float] = []
    self.start = time.perf_counter()

  def line(self, run: Run, outcome: str, wall: float | None = None) -> None:
    self.count += 1
    if wall is not None:
      self.walls.append(wall)
      self.left -= 1
    elapsed = time.perf_counter() - self.start
    if self.left <= 0:
      eta = "done" if self.count == self.total else "ETA 0m00s"
    elif self.walls:
      per_run = sum(self.walls) / len(self.walls)
      eta = f"ETA {_duration(per_run * self.left / min(self.concurrent, self.left))}"
    else:
      eta = "ETA ?"
    width = len(str(self.total))
    self.say(f"[{self.count:{width}d}/{self.total}] {run.name}: {outcome} | elapsed "
             f"{_duration(elapsed)}, {eta}")


def run_study(runs: Sequence[Run], root: str, *, concurrent: int = 1, preallocate: bool = True,
              python: str = sys.executable, compare: str = "none",
              placement: tuple[str, Sequence[str]] | None = None,
              say: Callable[[str], None] = print) -> dict[str, int]:
  """Runs what is not finished, ``concurrent`` at a time, and writes the reports.

  ``placement``: None (every run sees every device), or ``(variable, ids)``: one run per
  device, ``concurrent`` per device, each with ``variable`` set to its device's id (see
  ``detect_devices``).

  Returns counts ``{"done", "skipped", "failed", "conflict"}`` (skipped: finished earlier).
  """
  if concurrent < 1:
    raise ValueError(f"--concurrent must be at least 1, got {concurrent}")
  os.makedirs(root, exist_ok=True)
  _, components, weights = _study_constants()
  configs = {run: resolve_config(run) for run in runs}
  states = {run: run_state(run.workdir(root), configs[run]) for run in runs}
  todo = [run for run in runs if states[run][0] in ("new", "resume")]
  counts = {"done": 0, "skipped": 0, "failed": 0, "conflict": 0}
  say(f"Study in {root}: {len(runs)} runs, {len(todo)} to train "
      f"({sum(states[r][0] == 'resume' for r in todo)} resuming), "
      f"{sum(states[r][0] == 'done' for r in runs)} finished earlier, "
      f"{sum(states[r][0] == 'conflict' for r in runs)} in conflict; concurrent={concurrent}"
      + (f" per device, devices {placement[0]}={','.join(placement[1])}." if placement else "."))
  progress = Progress(len(runs), len(todo), concurrent, say)
  for run in runs:
    state, detail = states[run]
    if state == "done":
      counts["skipped"] += 1
      progress.line(run, f"finished earlier ({detail})")
    elif state == "conflict":
      counts["conflict"] += 1
      progress.line(run, f"SKIPPED: its folder holds a run with another config ({detail}); "
                    "remove it or use another --workdir")

  if todo:
    prepare_data(todo, say)

  def report(heatmaps: bool) -> None:
    study_report.write_reports(root, compare=compare, heatmaps=heatmaps, components=components,
                               weights=weights, say=say)

  env = child_env(concurrent, preallocate)
  slots: queue.Queue[str] = queue.Queue()
  for slot in device_slots(placement[1], concurrent) if placement else ():
    slots.put(slot)

  def place_and_execute(run: Run) -> dict[str, Any]:
    if placement is None:
      return execute(run, root, configs[run], python=python, env=env, children=children)
    device = slots.get()
    try:
      return execute(run, root, configs[run], python=python, env={**env, placement[0]: device},
                     children=children)
    finally:
      slots.put(device)

  children = _Children()
  in_main = threading.current_thread() is threading.main_thread()
  previous = signal.signal(signal.SIGTERM, _interrupt) if in_main else None
  try:
    with ThreadPoolExecutor(slots.qsize() if placement else concurrent) as pool:
      futures = {pool.submit(place_and_execute, run): run for run in todo}
      try:
        for future in as_completed(futures):
          run = futures[future]
          meta = future.result()
          if meta["status"] == "done":
            counts["done"] += 1
            outcome = f"done, test accuracy {100 * meta['test_accuracy']:.2f}%"
          else:
            counts["failed"] += 1
            outcome = (f"FAILED ({meta.get('error', meta['status']).splitlines()[-1][:160]}); log "
                       f"{os.path.join(run.workdir(root), LOG_FILE)}")
          progress.line(run, f"{outcome} in {_duration(meta['wall_s'])}", meta["wall_s"])
          report(heatmaps=False)
      except BaseException:
        children.stop_all()
        for future in futures:
          future.cancel()
        raise
  finally:
    if in_main:
      signal.signal(signal.SIGTERM, previous)
  report(heatmaps=True)
  say(f"Reports: {os.path.join(root, 'study.md')}, study.csv, study.json, heatmap_<task>.png.")
  return counts


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m lra_benchmarks.study", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tasks", default="listops",
                 help="comma-separated LRA tasks (listops,text,retrieval,image,pathfinder) or all")
  p.add_argument("--attentions", default="study",
                 help="comma-separated: <component>-<weight> (e.g. posrf-orf), softmax, flash, "
                 "study (the 18 study pairs + softmax + flash), all (every valid pair + both)")
  p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
  p.add_argument("--workdir", required=True, help="study folder (runs, logs, reports)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override for every run, passed as --config.KEY=VALUE (repeatable)")
  p.add_argument("--concurrent", type=int, default=1,
                 help="runs at once on one accelerator; each gets 0.9/N of its memory")
  p.add_argument("--preallocate", default=True, action=argparse.BooleanOptionalAction,
                 help="with --concurrent > 1: reserve each run's memory share at start "
                 "(--no-preallocate: allocate on demand up to the share)")
  p.add_argument("--placement", default="shared", choices=PLACEMENTS,
                 help="shared: every run uses every device of the host (sharded); per_device: "
                 "one run per GPU (CUDA_VISIBLE_DEVICES), --concurrent runs on each")
  p.add_argument("--data_dir", action="append", default=[], metavar="TASK:PATH",
                 help="data folder of a task (repeatable)")
  p.add_argument("--compare", default="none", choices=study_report.COMPARE_CHOICES,
                 help="paper: add the Spectraformer paper's accuracies and the difference")
  p.add_argument("--python", default=sys.executable, help="interpreter for the trainings")
  p.add_argument("--dry_run", action="store_true", help="print each run's command and state only")
  p.add_argument("--report_only", action="store_true",
                 help="only rewrite the reports from the runs under --workdir")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; returns the exit status (1 if a run failed or is in conflict)."""
  args = build_parser().parse_args(argv)
  root = os.path.abspath(os.path.expanduser(args.workdir))
  if args.report_only:
    _, components, weights = _study_constants()
    study_report.write_reports(root, compare=args.compare, components=components, weights=weights)
    print(f"Reports rewritten in {root}.")
    return 0
  try:
    tasks = parse_tasks(args.tasks)
    runs = make_runs(tasks, parse_attentions(args.attentions), parse_seeds(args.seeds),
                     parse_sets(args.set), parse_data_dirs(args.data_dir, _study_constants()[0]))
    if args.dry_run:
      for run in runs:
        state, detail = run_state(run.workdir(root), resolve_config(run))
        print(f"{run.name}: {state} {detail}\n  {' '.join(run.command(root, args.python))}")
      return 0
    placement = (detect_devices(args.python) if args.placement == "per_device" else None)
    counts = run_study(runs, root, concurrent=args.concurrent, preallocate=args.preallocate,
                       python=args.python, compare=args.compare, placement=placement)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("Study interrupted; re-run the same command to continue.", file=sys.stderr)
    return 130
  print(f"{counts['done']} trained, {counts['skipped']} finished earlier, {counts['failed']} "
        f"failed, {counts['conflict']} in conflict.")
  return 1 if counts["failed"] or counts["conflict"] else 0


if __name__ == "__main__":
  sys.exit(main())
