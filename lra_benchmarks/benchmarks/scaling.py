"""Data-parallel scaling of the trainer: steps/s and examples/s on 1, 2, 4, ... devices.

    python -m lra_benchmarks.benchmarks.scaling \\
        --configs=configs/listops_posrf_qmc.py,configs/text_posrf_qmc.py \\
        --devices=1,2,4,8 --modes=weak,strong --steps=300 --out_dir=scaling_h200x8

Every point is one run of the trainer (``python -m lra_benchmarks.train``), in a fresh process
that sees only the first ``k`` devices (GPU: ``CUDA_VISIBLE_DEVICES``; CPU:
``--xla_force_host_platform_device_count=k``), one process at a time; its figures are the ones
the trainer writes to ``results.json`` (compiled train steps only, evaluation excluded).

* **weak** scaling: the global batch grows with the devices, ``B_k = k * b`` (``b`` the config's
  ``batch_size``, i.e. the per-device batch stays fixed); efficiency
  ``E_k = X_k / (k * X_1)`` with ``X`` the examples per second.
* **strong** scaling: one global batch for every ``k``, ``B = K * b`` (``K`` the largest count);
  efficiency ``E_k = (s_k / s_1) / k`` with ``s`` the steps per second.

A point whose ``results.json`` is complete is not run again (re-run the command to resume);
a failed point is recorded with its error and the rest go on. Writes ``scaling.json`` and
``scaling.md`` to ``--out_dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

from lra_benchmarks import study_report
from lra_benchmarks.benchmarks import common

MODES = ("weak", "strong")
PLATFORMS = ("gpu", "cpu")
RESULTS = "results.json"


@dataclasses.dataclass(frozen=True)
class Point:
  """One training run: ``config`` (path) on ``devices`` devices with ``global_batch``."""
  config: str
  mode: str
  devices: int
  global_batch: int

  @property
  def name(self) -> str:
    """``<config file stem>[_<argument>]-<mode>-<devices>``, e.g. ``text_posrf_qmc-weak-4``."""
    path, _, argument = self.config.partition(":")
    stem = os.path.splitext(os.path.basename(path))[0]
    if argument:
      stem += "_" + argument.replace(",", "_")
    return f"{stem}-{self.mode}-{self.devices}"


def config_batch(spec: str) -> int:
  """The ``batch_size`` of the config ``spec`` (``path`` or ``path:argument``, as the trainer's
  ``--config`` takes it)."""
  path, _, argument = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--configs: no config file {path!r}.")
  loader_spec = importlib.util.spec_from_file_location("_scaling_config", path)
  module = importlib.util.module_from_spec(loader_spec)
  loader_spec.loader.exec_module(module)
  config = module.get_config(argument) if argument else module.get_config()
  return int(config.batch_size)


def make_points(configs: Sequence[str], devices: Sequence[int], modes: Sequence[str],
                batches: dict[str, int]) -> list[Point]:
  """Every (config, mode, device count); ``batches`` maps a config to its per-device batch."""
  largest = max(devices)
  return [Point(c, mode, k, batches[c] * (k if mode == "weak" else largest))
          for c in configs for mode in modes for k in devices]


def efficiency(point: Point, steps_per_second: float, base: Optional[dict]) -> Optional[float]:
  """``E_k`` of the module doc against ``base`` (the same config and mode on 1 device)."""
  if base is None or not base.get("steps_per_second"):
    return None
  if point.mode == "weak":
    examples = steps_per_second * point.global_batch
    return examples / (point.devices * base["steps_per_second"] * base["global_batch"])
  return steps_per_second / base["steps_per_second"] / point.devices


def child_env(platform: str, devices: int, base: Optional[dict[str, str]] = None) -> dict[str, str]:
  """The environment of a run that may use only the first ``devices`` devices."""
  env = dict(os.environ if base is None else base)
  if platform == "gpu":
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(devices))
  else:
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
  return env


def command(point: Point, workdir: str, steps: int, data_dir: Optional[str],
            sets: Sequence[str]) -> list[str]:
  """The trainer's command line for ``point``: ``steps`` steps, one evaluation at the end."""
  cmd = [sys.executable, "-m", "lra_benchmarks.train", f"--config={point.config}",
         f"--workdir={workdir}", f"--config.batch_size={point.global_batch}",
         f"--config.num_train_steps={steps}", f"--config.eval_every={steps}",
         f"--config.checkpoint_every={steps}", "--config.progress_bar=False"]
  if data_dir:
    cmd.append(f"--config.data_dir={data_dir}")
  return cmd + [f"--config.{s}" for s in sets]


def read_results(workdir: str) -> Optional[dict]:
  """The run's ``results.json`` if it is complete (has ``steps_per_second``), else None."""
  results = study_report.read_json(os.path.join(workdir, RESULTS))
  return results if results and isinstance(results.get("steps_per_second"), (int, float)) else None


def failure_summary(output: str, limit: int = 600) -> str:
  """What a failed run printed that says why: its error and check-failure lines (at most five)
  and the end of its output, within about ``limit`` characters each."""
  lines = output.splitlines()
  causes = [l for l in lines if any(k in l for k in ("Error", "Check failed", "Fatal", "F0", "F1"))]
  head = "\n".join(causes[:5])[:limit]
  return (head + "\n...\n" if head else "") + output[-limit:]


def run_point(point: Point, args: argparse.Namespace) -> dict[str, Any]:
  """Runs (or reuses) one point and returns its row."""
  workdir = os.path.join(args.out_dir, "runs", point.name)
  row: dict[str, Any] = dataclasses.asdict(point)
  results = read_results(workdir)
  if results is None:
    if os.path.isdir(workdir):
      shutil.rmtree(workdir)  # an unfinished point restarts: its timing must cover one process
    cmd = command(point, workdir, args.steps, args.data_dir, args.set or [])
    proc = subprocess.run(cmd, env=child_env(args.platform, point.devices), capture_output=True,
                          text=True, timeout=args.timeout, check=False)
    results = read_results(workdir)
    if results is None:
      row["error"] = f"exit {proc.returncode}: {failure_summary(proc.stderr or proc.stdout)}"
      return row
  if results.get("devices") != point.devices:
    row["error"] = (f"the run saw {results.get('devices')} devices, not {point.devices}: "
                    "fewer devices than asked for?")
  sps = float(results["steps_per_second"])
  row.update(steps_per_second=sps, examples_per_second=sps * point.global_batch,
             peak_memory_bytes=results.get("peak_memory_bytes"),
             device_kind=results.get("device_kind"), jax_version=results.get("jax_version"))
  return row


def add_efficiency(rows: list[dict[str, Any]]) -> None:
  """Fills ``efficiency`` of every row against its config and mode on one device."""
  base = {(r["config"], r["mode"]): r for r in rows
          if r["devices"] == 1 and "steps_per_second" in r}
  for r in rows:
    if "steps_per_second" in r:
      r["efficiency"] = efficiency(Point(r["config"], r["mode"], r["devices"], r["global_batch"]),
                                   r["steps_per_second"], base.get((r["config"], r["mode"])))


def markdown(rows: Sequence[dict[str, Any]], args: argparse.Namespace) -> str:
  """The scaling table."""
  kinds = sorted({str(r.get("device_kind")) for r in rows if r.get("device_kind")})
  head = (f"# Data-parallel scaling of the trainer\n\nDevices: {', '.join(kinds) or 'unknown'} "
          f"({args.platform}); {args.steps} steps per point; commit {common.git_commit()}.\n\n"
          "Weak: global batch = devices x per-device batch, efficiency = examples/s / "
          "(devices x examples/s on 1). Strong: fixed global batch, efficiency = speed-up / "
          "devices.\n\n")
  table = common.markdown_table(
      ["config", "mode", "devices", "global batch", "steps/s", "examples/s", "efficiency",
       "peak MiB", "error"],
      [[os.path.basename(r["config"]), r["mode"], r["devices"], r["global_batch"],
        common.fmt(r.get("steps_per_second")), common.fmt(r.get("examples_per_second")),
        common.fmt(r.get("efficiency")),
        common.fmt(r["peak_memory_bytes"] / common.MIB if r.get("peak_memory_bytes") else None),
        (r.get("error") or "")[:120].replace("\n", " ").replace("|", "/")] for r in rows])
  return head + table + "\n"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m lra_benchmarks.benchmarks.scaling",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--configs", required=True, help="comma-separated config files")
  p.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts")
  p.add_argument("--modes", default="weak,strong", help=f"comma-separated, of {MODES}")
  p.add_argument("--steps", type=int, default=300, help="train steps per point")
  p.add_argument("--platform", choices=PLATFORMS,
                 default="gpu" if shutil.which("nvidia-smi") else "cpu",
                 help="how a run is limited to k devices (default: gpu if nvidia-smi exists)")
  p.add_argument("--data_dir", default=None, help="passed to every run as --config.data_dir")
  p.add_argument("--set", action="append", metavar="KEY=VALUE",
                 help="config override for every run (repeatable)")
  p.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
  p.add_argument("--out_dir", required=True)
  args = p.parse_args(argv)
  args.configs = common.parse_list(args.configs)
  args.devices = sorted(set(common.parse_list(args.devices, int)))
  args.modes = common.parse_list(args.modes)
  bad = [m for m in args.modes if m not in MODES]
  if bad:
    p.error(f"--modes: unknown {bad}; choose from {MODES}.")
  if not args.devices or args.devices[0] < 1:
    p.error(f"--devices: counts must be >= 1, got {args.devices}.")
  if 1 not in args.devices:
    p.error("--devices must include 1: efficiency is measured against one device.")
  if args.steps < 1:
    p.error(f"--steps must be >= 1, got {args.steps}.")
  return args


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
  args = parse_args(argv)
  try:
    batches = {c: config_batch(c) for c in args.configs}
  except FileNotFoundError as err:
    raise SystemExit(str(err)) from None
  points = make_points(args.configs, args.devices, args.modes, batches)
  os.makedirs(args.out_dir, exist_ok=True)
  rows, start = [], time.time()
  for i, point in enumerate(points):
    row = run_point(point, args)
    rows.append(row)
    done = time.time() - start
    eta = done / (i + 1) * (len(points) - i - 1)
    status = (f"{row['steps_per_second']:.1f} steps/s" if "steps_per_second" in row
              else "failed")
    print(f"[{i + 1}/{len(points)}] {point.name}: {status} | elapsed {done:.0f} s, "
          f"ETA {eta:.0f} s", flush=True)
  add_efficiency(rows)
  common.write_json(os.path.join(args.out_dir, "scaling.json"),
                    {"steps": args.steps, "platform": args.platform, "commit": common.git_commit(),
                     "rows": rows})
  common.write_text(os.path.join(args.out_dir, "scaling.md"), markdown(rows, args))
  print(markdown(rows, args))
  return rows


if __name__ == "__main__":
  main()
