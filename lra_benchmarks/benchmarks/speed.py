r"""Speed and memory of every attention on the LRA model, and a sequence-length sweep.

Two parts, both in one process so that every table compares like with like:

1. **Train steps.**  For every selected (component, weight) combination and for plain (``softmax``)
   and ``flash`` softmax: the time of one full train step (forward, backward, gradient clipping
   and AdamW, ``train_lib.make_train_step``) of the study's model
   (``lra_benchmarks.config_lib.task_config``: 2 layers, dim 64, 2 heads of 32, MLP 128,
   m = 128) at the study's shapes (ListOps b32 n2048, Text b32 n4096, Retrieval b16 two
   documents of 4096, Image b256 n1024), on random tokens (no padding), with dropout on as in
   training.  Timing: ``--warmup`` steps, then the median of ``--reps`` steps, each timed on the
   host clock after ``block_until_ready``.
   Peak memory, two ways (both in the JSON):

   * ``static``: the compiled step's ``memory_analysis()`` (arguments + outputs + temporaries -
     donated), for every configuration (any backend);
   * ``process``: ``peak_bytes_in_use`` of a *fresh process* that builds the model and runs two
     steps (``XLA_PYTHON_CLIENT_PREALLOCATE=false``), on backends that report it (GPU/TPU),
     for the configurations of ``--process_memory`` (the peak never resets, so one process
     per configuration).

2. **Sweep.**  The attention layer alone (``layers.RFMultiHeadDotProductAttention``: projections,
   attention, output projection), forward + backward, at lengths ``--sweep_lengths`` with a fixed
   number of tokens per batch (``--sweep_tokens``; batch = tokens / length).  Per attention: the
   fitted log-log slope of time against length (0 = linear cost per sequence, 1 = quadratic, at
   fixed tokens) and the crossover length against flash.

    python -m lra_benchmarks.benchmarks.speed --out_dir=benchmark_results
    python -m lra_benchmarks.benchmarks.speed --tasks=text --pairs=posrf:orf --sweep_lengths=1k,4k

Writes ``speed.json``, ``speed.md``, ``speed_steps.png`` and ``speed_sweep.png``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import subprocess
import sys
import time
import traceback
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lra_benchmarks import config_lib
from lra_benchmarks import data as lra_data
from lra_benchmarks import models
from lra_benchmarks import train_lib
from lra_benchmarks.benchmarks import common
from spectraformer_jax import baselines as _efficient_baselines
from spectraformer_jax import layers

# The study's shapes: (batch, length); retrieval feeds two documents of this length.
TASK_SHAPES = {"listops": (32, 2048), "text": (32, 4096), "retrieval": (16, 4096),
               "image": (256, 1024)}

# The official PyTorch implementation on an H100 with the study's model, the reference of the
# speed and memory targets below:
# (task, attention name) -> (ms per train step, peak MiB).
PYTORCH_H100 = {
    ("listops", "posrf-orf"): (15.3, 1214),
    ("text", "posrf-orf"): (22.4, 2360),
    ("text", "oprf-fastfoodl"): (48.1, 1766),
    ("text", "softmax"): (129.0, 17171),
}
TARGET_SPEEDUP = 6.0       # every combination at least 6x faster per step than PyTorch ...
TARGET_MEMORY = 0.5        # ... with at most 0.5x its peak memory
TARGET_VS_FLASH_TIME = 0.6  # Text PosRF-ORF: at most 0.6x the step time of our flash ...
TARGET_VS_FLASH_MEMORY = 1.0  # ... and at most 1.0x its peak memory

BASELINES = ("softmax", "flash") + tuple(_efficient_baselines.KINDS)  # --baselines=all


# ----------------------------------------------------------------------------- variants


def variant_name(variant: tuple) -> str:
  kind, comp, weight = variant
  return kind if kind != "spectraformer" else common.pair_name(comp, weight)


def parse_variant(name: str) -> tuple:
  if name in BASELINES:
    return (name, None, None)
  comp, weight = name.split("-", 1)
  return ("spectraformer", comp, weight)


def select_variants(args) -> list[tuple]:
  pairs = common.select_pairs(args.pairs, common.parse_list(args.components),
                              common.parse_list(args.weights))
  baselines = common.parse_list(args.baselines) if args.baselines != "none" else []
  baselines = list(BASELINES) if baselines is None else baselines
  for b in baselines:
    if b not in BASELINES:
      raise ValueError(f"Unknown baseline {b!r}; choose from {BASELINES} or 'none'.")
  return [(b, None, None) for b in baselines] + [("spectraformer", c, w) for c, w in pairs]


# ----------------------------------------------------------------------------- train step


def _parse_like(current, value: str):
  """``value`` converted to the type of ``current`` ("false"/"0" are False for a bool)."""
  if isinstance(current, bool):
    if value.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"expected a bool (true/false), got {value!r}")
    return value.lower() in ("true", "1")
  return type(current)(value)


def task_config(task: str, variant: tuple, args):
  """The task's base config with the variant's attention and the benchmark's overrides."""
  config = config_lib.task_config(task)
  kind, comp, weight = variant
  config.model.attention = kind
  if kind == "spectraformer":
    config.model.component, config.model.weight = comp, weight
  config.model.num_features = args.m
  if args.dtype:
    config.model.dtype = args.dtype
  for item in common.parse_list(args.model) or []:
    field, value = item.split("=", 1)
    config.model[field] = _parse_like(config.model[field], value)
  batch, length = TASK_SHAPES[task]
  config.batch_size = args.batch or batch
  config.seq_len = config.max_length = args.length or length
  return config


def build_step(task: str, variant: tuple, args):
  """(compiled train step, state, batch) for one task and attention; the step is
  ``jit(train_lib.make_train_step(...), donate_argnums=0)`` compiled ahead of time."""
  config = task_config(task, variant, args)
  info = lra_data.get_task(task)
  model_config = train_lib.validate_config(config, info)
  model = models.build_model(model_config, dual=info.dual, padded=info.padded)
  tx = train_lib.make_optimizer(config)
  step_fn = train_lib.make_train_step(model, tx, train_lib.learning_rate_schedule(config),
                                      dual=info.dual)
  b, n = config.batch_size, config.seq_len
  rng = np.random.default_rng(0)
  names = ("inputs1", "inputs2") if info.dual else ("inputs",)
  low = 1 if info.padded else 0
  batch = {k: jnp.asarray(rng.integers(low, info.vocab_size, (b, n)), jnp.int32) for k in names}
  batch["targets"] = jnp.asarray(rng.integers(0, info.num_classes, (b,)), jnp.int32)
  batch["weights"] = jnp.ones((b,), jnp.float32)
  init_key, step_key = jax.random.split(jax.random.PRNGKey(0))
  example = tuple(batch[k][:1] for k in names)

  @jax.jit
  def init_state():
    variables = models.init_variables(model, init_key, example)
    params = variables["params"]
    return train_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=tx.init(params),
                                random_features=variables.get("random_features", {}),
                                rng=step_key)

  state = init_state()
  compiled = jax.jit(step_fn, donate_argnums=(0,)).lower(state, batch).compile()
  return compiled, state, batch


def measure_step(task: str, variant: tuple, args, built=None) -> dict:
  """Times one configuration (and its static memory) in this process."""
  row = {"task": task, "attention": variant_name(variant), "batch": args.batch or
         TASK_SHAPES[task][0], "length": args.length or TASK_SHAPES[task][1]}
  try:
    compiled, state, batch = built if built is not None else build_step(task, variant, args)
    row["static_memory"] = train_lib.compiled_memory(compiled)
    holder = {"state": state}

    def call():
      holder["state"], metrics = compiled(holder["state"], batch)
      return metrics["loss"]

    row.update(common.time_calls(call, warmup=args.warmup, reps=args.reps))
    loss = float(call())
    row["finite_loss"] = bool(np.isfinite(loss))
  except Exception as err:  # pylint: disable=broad-except
    row["error"] = f"{type(err).__name__}: {str(err)[:500]}"
    row["oom"] = common.is_out_of_memory(err)
  return row


def child_memory(spec: str, args) -> dict:
  """In a fresh process: build one configuration, run two steps, report peak_bytes_in_use."""
  task, name = spec.split("/", 1)
  compiled, state, batch = build_step(task, parse_variant(name), args)
  for _ in range(2):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  return {"task": task, "attention": name, "peak_bytes": common.device_peak_bytes()}


_CHILD_TAG = "SPEED_CHILD_RESULT "
# The directory that holds the package: the child processes' PYTHONPATH and working directory.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def process_memory(specs: list[str], args) -> dict[str, dict]:
  """Runs ``child_memory`` for each ``task/attention`` in fresh processes, ``--memory_workers``
  at a time (after all timing, so they do not disturb it)."""
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
  base = [sys.executable, "-m", "lra_benchmarks.benchmarks.speed", f"--m={args.m}",
          f"--dtype={args.dtype}", f"--batch={args.batch}", f"--length={args.length}",
          f"--model={args.model}"]

  def run(spec):
    start = time.time()
    proc = subprocess.run(base + [f"--child_memory={spec}"], env=env, capture_output=True,
                          text=True, timeout=args.child_timeout, cwd=_ROOT)
    for line in proc.stdout.splitlines():
      if line.startswith(_CHILD_TAG):
        out = json.loads(line[len(_CHILD_TAG):])
        out["seconds"] = time.time() - start
        return spec, out
    tail = (proc.stderr or proc.stdout)[-400:]
    return spec, {"error": f"exit {proc.returncode}: {tail}", "peak_bytes": None}

  results = {}
  with concurrent.futures.ThreadPoolExecutor(max(1, args.memory_workers)) as pool:
    for spec, out in pool.map(run, specs):
      results[spec] = out
  return results


def _past_deadline(args) -> bool:
  return bool(args.max_seconds) and time.time() > args.start_time + args.max_seconds


def run_steps(tasks: list[str], variants: list[tuple], args, log) -> list[dict]:
  """Builds (``--compile_workers`` threads) and times every task x variant, one at a time."""
  rows = []
  for task in tasks:
    if _past_deadline(args):
      log(f"[steps] {task}: skipped, --max_seconds={args.max_seconds} reached")
      rows.append({"task": task, "attention": "*", "error": "skipped: --max_seconds reached"})
      continue
    jobs = [(task, v) for v in variants]

    def build(job):
      t0 = time.time()
      try:
        return build_step(job[0], job[1], args), time.time() - t0
      except Exception as err:  # pylint: disable=broad-except
        return err, time.time() - t0

    start = time.time()
    # Every build finishes before the first timing: compilation autotunes kernels on the
    # device, which would otherwise run concurrently with (and distort) the timed steps.
    with concurrent.futures.ThreadPoolExecutor(max(1, args.compile_workers)) as pool:
      results = list(pool.map(build, jobs))
    for i, job in enumerate(jobs):
      (built, build_s), results[i] = results[i], None  # free each program once timed
      if isinstance(built, Exception):
        row = {"task": task, "attention": variant_name(job[1]),
               "error": f"{type(built).__name__}: {str(built)[:500]}",
               "oom": common.is_out_of_memory(built)}
      else:
        row = measure_step(task, job[1], args, built)
      row["build_s"] = build_s
      del built
      rows.append(row)
      log(f"[steps] {task} {row['attention']}: " + (
          f"{row['median_ms']:.2f} ms" if "median_ms" in row else row.get("error", "?")[:200]))
    log(f"[steps] {task}: {len(jobs)} configurations in {time.time() - start:.0f} s")
  return rows


# ----------------------------------------------------------------------------- sweep


def build_layer_step(variant: tuple, n: int, batch: int, args):
  """Compiled forward+backward of the attention layer alone on ``x [batch, n, 64]``."""
  kind, comp, weight = variant
  dtype = jnp.dtype(args.dtype or "float32")
  kwargs = dict(component=comp, weight=weight, num_features=args.m) if kind == "spectraformer" \
      else {}
  if kind in _efficient_baselines.KINDS:
    layer = _efficient_baselines.BaselineSelfAttention(
        kind=kind, num_heads=args.sweep_heads, qkv_features=args.sweep_dim,
        out_features=args.sweep_dim, dtype=dtype)
  else:
    layer = layers.RFMultiHeadDotProductAttention(
        num_heads=args.sweep_heads, qkv_features=args.sweep_dim, out_features=args.sweep_dim,
        dtype=dtype, attention=kind, **kwargs)
  x = jax.random.normal(jax.random.PRNGKey(1), (batch, n, args.sweep_dim), dtype)
  variables = jax.jit(layer.init)(jax.random.PRNGKey(0), x[:1])

  def loss(params, x):
    out = layer.apply({**variables, "params": params}, x)
    return jnp.sum(jnp.square(out.astype(jnp.float32)))

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  compiled = grad.lower(variables["params"], x).compile()
  return compiled, variables["params"], x


def run_sweep(variants: list[tuple], lengths: list[int], args, log) -> list[dict]:
  rows = []
  for variant in variants:
    for n in lengths:
      batch = max(1, args.sweep_tokens // n)
      row = {"attention": variant_name(variant), "length": n, "batch": batch}
      if _past_deadline(args):
        row["error"] = "skipped: --max_seconds reached"
        rows.append(row)
        continue
      if (variant[0] in ("softmax", "kernelized") and args.softmax_max_length
          and n > args.softmax_max_length):
        row["error"] = ("skipped: plain softmax above "
                        f"--softmax_max_length={args.softmax_max_length}")
        rows.append(row)
        continue
      try:
        compiled, params, x = build_layer_step(variant, n, batch, args)
        row["static_memory"] = train_lib.compiled_memory(compiled)
        call = lambda c=compiled, p=params, xx=x: c(p, xx)
        row.update(common.time_calls(call, warmup=args.warmup, reps=args.reps))
        del call, compiled, params, x  # free the device buffers before the next length
      except Exception as err:  # pylint: disable=broad-except
        row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        row["oom"] = common.is_out_of_memory(err)
      rows.append(row)
      log(f"[sweep] {row['attention']} n={n} b={batch}: " + (
          f"{row['median_ms']:.3f} ms" if "median_ms" in row else row.get("error", "?")[:120]))
  return rows


def fit_sweep(rows: list[dict]) -> dict[str, dict]:
  """Per attention: log-log slope of time vs length (fixed tokens), and crossover vs flash."""
  series: dict[str, dict[int, float]] = {}
  for r in rows:
    if r.get("median_ms"):
      series.setdefault(r["attention"], {})[r["length"]] = r["median_ms"]
  fits = {}
  for name, pts in series.items():
    ns = sorted(pts)
    fit = {"points": len(ns)}
    if len(ns) >= 2:
      slope, intercept = np.polyfit(np.log(ns), np.log([pts[n] for n in ns]), 1)
      fit.update(slope=float(slope), exponent_per_sequence=float(slope + 1.0),
                 intercept=float(intercept))
    fits[name] = fit
  flash = series.get("flash")
  for name, fit in fits.items():
    if name in BASELINES or not flash:
      continue
    fit["crossover_vs_flash"] = crossover(series[name], flash, fit, fits.get("flash", {}))
  return fits


def crossover(rf: dict[int, float], flash: dict[int, float], rf_fit: dict, flash_fit: dict):
  """The length from which ``rf`` is faster than ``flash`` (log-log interpolation between the
  measured lengths; ``{"length": None, "note": ...}`` outside the measured range, with the
  extrapolation of the two fitted lines where they cross)."""
  common_ns = sorted(set(rf) & set(flash))
  if not common_ns:
    return {"length": None, "note": "no common lengths"}
  diff = [math.log(rf[n]) - math.log(flash[n]) for n in common_ns]
  if diff[0] <= 0 and all(d <= 0 for d in diff):
    return {"length": common_ns[0], "note": "faster than flash at every measured length"}
  for (n0, d0), (n1, d1) in zip(zip(common_ns, diff), zip(common_ns[1:], diff[1:])):
    if d0 > 0 >= d1:
      t = d0 / (d0 - d1)
      return {"length": float(math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0)))),
              "note": "interpolated"}
  if "slope" in rf_fit and "slope" in flash_fit and flash_fit["slope"] > rf_fit["slope"]:
    x = (rf_fit["intercept"] - flash_fit["intercept"]) / (flash_fit["slope"] - rf_fit["slope"])
    return {"length": float(math.exp(x)), "note": "extrapolated from the fitted lines"}
  return {"length": None, "note": "slower than flash at every measured length"}


# ----------------------------------------------------------------------------- reports


def step_memory_bytes(row: dict) -> tuple[Optional[int], str]:
  """The peak memory figure of a step row: fresh-process peak if measured, else static."""
  if row.get("process_peak_bytes"):
    return row["process_peak_bytes"], "process"
  static = row.get("static_memory") or {}
  if static.get("total_bytes"):
    return static["total_bytes"], "static"
  return None, "-"


def targets(step_rows: list[dict], fits: dict) -> list[dict]:
  """The issue-6 targets, each with the measured figures and met / not met / not measured."""
  out = []
  by = {(r["task"], r["attention"]): r for r in step_rows if r.get("median_ms")}
  for task in ("listops", "text"):
    ref_ms, ref_mib = PYTORCH_H100[(task, "posrf-orf")]
    rows = [r for (t, name), r in by.items() if t == task and name not in BASELINES]
    if not rows:
      continue
    worst_t = max(rows, key=lambda r: r["median_ms"])
    mems = [(step_memory_bytes(r)[0] or 0, r) for r in rows]
    worst_m = max(mems, key=lambda p: p[0])
    ok_t = worst_t["median_ms"] <= ref_ms / TARGET_SPEEDUP
    ok_m = worst_m[0] / common.MIB <= ref_mib * TARGET_MEMORY
    out.append({"target": f"{task}: every combination >= {TARGET_SPEEDUP:g}x faster per step "
                          f"than PyTorch PosRF-ORF ({ref_ms} ms)",
                "measured": f"slowest {worst_t['attention']} {worst_t['median_ms']:.2f} ms "
                            f"(limit {ref_ms / TARGET_SPEEDUP:.2f} ms); {len(rows)} combinations",
                "met": ok_t})
    out.append({"target": f"{task}: every combination <= {TARGET_MEMORY:g}x the peak memory of "
                          f"PyTorch PosRF-ORF ({ref_mib} MiB)",
                "measured": f"largest {worst_m[1]['attention']} {worst_m[0] / common.MIB:.0f} MiB "
                            f"({step_memory_bytes(worst_m[1])[1]}; limit "
                            f"{ref_mib * TARGET_MEMORY:.0f} MiB)",
                "met": ok_m})
  for (task, name), (ref_ms, ref_mib) in PYTORCH_H100.items():
    r = by.get((task, name))
    if r is None or name == "posrf-orf":
      continue
    mem = step_memory_bytes(r)
    out.append({"target": f"{task} {name}: >= {TARGET_SPEEDUP:g}x faster and <= "
                          f"{TARGET_MEMORY:g}x memory than PyTorch ({ref_ms} ms, {ref_mib} MiB)",
                "measured": f"{r['median_ms']:.2f} ms ({ref_ms / r['median_ms']:.1f}x), "
                            f"{(mem[0] or 0) / common.MIB:.0f} MiB ({mem[1]})",
                "met": (r["median_ms"] <= ref_ms / TARGET_SPEEDUP
                        and (mem[0] or math.inf) / common.MIB <= ref_mib * TARGET_MEMORY)})
  rf, fl = by.get(("text", "posrf-orf")), by.get(("text", "flash"))
  if rf and fl:
    t_ratio = rf["median_ms"] / fl["median_ms"]
    m_rf, m_fl = step_memory_bytes(rf), step_memory_bytes(fl)
    m_ratio = (m_rf[0] / m_fl[0]) if m_rf[0] and m_fl[0] else None
    out.append({"target": f"text posrf-orf step time <= {TARGET_VS_FLASH_TIME:g}x flash",
                "measured": f"{rf['median_ms']:.2f} / {fl['median_ms']:.2f} ms = {t_ratio:.2f}x",
                "met": t_ratio <= TARGET_VS_FLASH_TIME})
    out.append({"target": f"text posrf-orf peak memory <= {TARGET_VS_FLASH_MEMORY:g}x flash",
                "measured": (f"{m_rf[0] / common.MIB:.0f} / {m_fl[0] / common.MIB:.0f} MiB = "
                             f"{m_ratio:.2f}x ({m_rf[1]})") if m_ratio else "-",
                "met": None if m_ratio is None else m_ratio <= TARGET_VS_FLASH_MEMORY})
  rf_fits = {k: v for k, v in fits.items() if k not in BASELINES and "slope" in v}
  if rf_fits:
    worst = max(rf_fits.items(), key=lambda kv: kv[1]["slope"])
    out.append({"target": "attention layer cost linear in n (slope ~0 at fixed tokens)",
                "measured": f"largest slope {worst[0]} {worst[1]['slope']:.2f} "
                            f"(flash {fits.get('flash', {}).get('slope', float('nan')):.2f})",
                "met": worst[1]["slope"] < 0.2})
  return out


def markdown(result: dict) -> str:
  env, settings = result["environment"], result["settings"]
  lines = ["# Speed and memory\n", common.environment_markdown(env),
           f"Settings: {settings}.\n"]
  steps = result["steps"]
  if steps:
    lines.append("\n## Train step (forward, backward, AdamW)\n")
    lines.append("Time: median over reps (ms). Memory: `process` = peak_bytes_in_use of a fresh "
                 "process (MiB), `static` = compiled memory_analysis (args + outputs + temps - "
                 "donated, MiB). Ratios are against flash of the same task in this run.\n")
    for task in dict.fromkeys(r["task"] for r in steps):
      rows = [r for r in steps if r["task"] == task]
      flash = next((r for r in rows if r["attention"] == "flash" and r.get("median_ms")), None)
      b, n = rows[0].get("batch"), rows[0].get("length")
      lines.append(f"\n### {task} (batch {b}, length {n})\n")
      table = []
      for r in rows:
        static = (r.get("static_memory") or {}).get("total_bytes")
        proc = r.get("process_peak_bytes")
        ms = r.get("median_ms")
        ref = PYTORCH_H100.get((task, r["attention"]))
        table.append([
            r["attention"], ms, None if not (ms and flash) else ms / flash["median_ms"],
            None if proc is None else proc / common.MIB,
            None if static is None else static / common.MIB,
            None if not (ref and ms) else ref[0] / ms,
            r.get("error", "")[:80] if "error" in r else ""])
      lines.append(common.markdown_table(
          ["attention", "ms/step", "x flash", "process MiB", "static MiB", "speed-up vs PyTorch",
           "note"], table))
  sweep = result["sweep"]
  if sweep:
    lines.append(f"\n## Attention layer alone, forward + backward, "
                 f"{settings['sweep_tokens']} tokens per batch\n")
    lengths = sorted({r["length"] for r in sweep})
    names = list(dict.fromkeys(r["attention"] for r in sweep))
    cell = {(r["attention"], r["length"]): r for r in sweep}
    table = []
    for name in names:
      fit = result["fits"].get(name, {})
      cross = (fit.get("crossover_vs_flash") or {}).get("length")
      row = [name] + [cell.get((name, n), {}).get("median_ms") for n in lengths]
      row += [fit.get("slope"), fit.get("exponent_per_sequence"),
              None if cross is None else int(round(cross))]
      table.append(row)
    lines.append(common.markdown_table(
        ["attention"] + [f"n={n}" for n in lengths] + ["slope (fixed tokens)",
                                                       "exponent per sequence",
                                                       "crossover vs flash"], table))
    lines.append("\nms per forward+backward; slope: least-squares log-log fit of time vs length "
                 "at fixed tokens (0 = linear attention, 1 = quadratic); crossover: the length from "
                 "which the layer is faster than flash (interpolated in log-log).\n")
    mem_table = []
    for name in names:
      row = [name]
      for n in lengths:
        static = (cell.get((name, n), {}).get("static_memory") or {}).get("total_bytes")
        row.append(None if static is None else static / common.MIB)
      mem_table.append(row)
    lines.append("\nStatic memory (MiB) of the compiled layer forward+backward:\n")
    lines.append(common.markdown_table(["attention"] + [f"n={n}" for n in lengths], mem_table))
  if result["targets"]:
    lines.append("\n## Speed and memory targets\n")
    lines.append(common.markdown_table(
        ["target", "measured", "met"],
        [[t["target"], t["measured"], t["met"]] for t in result["targets"]]))
  return "\n".join(lines)


def plots(result: dict, out_dir: str) -> list[str]:
  plt = common.pyplot()
  paths = []
  steps = [r for r in result["steps"] if r.get("median_ms")]
  if steps:
    tasks = list(dict.fromkeys(r["task"] for r in steps))
    fig, axes = plt.subplots(len(tasks), 1, figsize=(max(6, 0.18 * len(steps) / len(tasks) + 3),
                                                     2.6 * len(tasks)), squeeze=False)
    for ax, task in zip(axes[:, 0], tasks):
      rows = [r for r in steps if r["task"] == task]
      colors = ["tab:red" if r["attention"] in BASELINES else "tab:blue" for r in rows]
      ax.bar(range(len(rows)), [r["median_ms"] for r in rows], color=colors)
      ax.set_xticks(range(len(rows)), [r["attention"] for r in rows], rotation=90, fontsize=6)
      ax.set_yscale("log")
      ax.set_ylabel("ms / train step")
      ax.set_title(task, fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, "speed_steps.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  sweep = [r for r in result["sweep"] if r.get("median_ms")]
  if sweep:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r["attention"] for r in sweep):
      pts = sorted((r["length"], r["median_ms"], (r.get("static_memory") or {}).get("total_bytes"))
                   for r in sweep if r["attention"] == name)
      style = dict(lw=2.2, color="k" if name == "flash" else "tab:red") if name in BASELINES \
          else dict(lw=1, alpha=0.8)
      axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name, **style)
      mem = [(p[0], p[2] / common.MIB) for p in pts if p[2]]
      if mem:
        axes[1].plot(*zip(*mem), marker="o", ms=3, label=name, **style)
    for ax, label in zip(axes, ("ms, forward + backward", "static MiB")):
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("sequence length (fixed tokens per batch)")
      ax.set_ylabel(label)
      ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=6, ncol=2)
    axes[0].set_title("attention layer alone", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, "speed_sweep.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m lra_benchmarks.benchmarks.speed",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--tasks", default="listops,text,retrieval,image",
                 help=f"comma list of {tuple(TASK_SHAPES)}, or 'none' to skip train steps")
  p.add_argument("--pairs", default="all", help="'all' or component:weight,...")
  p.add_argument("--components", default=None, help="comma list filter on components")
  p.add_argument("--weights", default=None, help="comma list filter on weights")
  p.add_argument("--baselines", default="softmax,flash", help="softmax,flash | none")
  p.add_argument("--m", type=int, default=128, help="random features per head")
  p.add_argument("--dtype", default="bfloat16",
                 help="model compute dtype (params stay float32; flash needs bfloat16)")
  p.add_argument("--batch", type=int, default=0, help="override every task's batch (0: study's)")
  p.add_argument("--length", type=int, default=0, help="override every task's length (0: study's)")
  p.add_argument("--model", default="",
                 help="overrides of config.model for tiny runs, e.g. num_layers=1,emb_dim=16")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--reps", type=int, default=10)
  p.add_argument("--compile_workers", type=int, default=4,
                 help="threads compiling configurations ahead of the (sequential) timing")
  p.add_argument("--process_memory", default="auto",
                 help="task/attention,... measured in fresh processes; 'auto': each task's "
                      "baselines, posrf-orf and oprf-fastfoodl where selected (only on backends "
                      "with memory stats); 'all'; 'none'")
  p.add_argument("--memory_workers", type=int, default=6)
  p.add_argument("--max_seconds", type=int, default=0,
                 help="start no further task or sweep point after this many seconds (0: no limit)")
  p.add_argument("--child_timeout", type=int, default=300)
  p.add_argument("--sweep_lengths", default="1k,2k,4k,8k,16k,32k,64k",
                 help="comma list (k = 1024) or 'none'")
  p.add_argument("--sweep_tokens", type=int, default=65536)
  p.add_argument("--sweep_pairs", default="auto",
                 help="'auto': every selected component with orf plus posrf/oprf with the "
                      "learnable weights; 'all': the step pairs; or component:weight,...")
  p.add_argument("--sweep_dim", type=int, default=64)
  p.add_argument("--sweep_heads", type=int, default=2)
  p.add_argument("--softmax_max_length", type=int, default=16384,
                 help="skip plain softmax in the sweep above this length (0: no limit)")
  p.add_argument("--out_dir", default="benchmark_results")
  p.add_argument("--child_memory", default=None, help=argparse.SUPPRESS)
  p.add_argument("--quiet", action="store_true")
  return p.parse_args(argv)


def _sweep_variants(args, variants: list[tuple]) -> list[tuple]:
  baselines = [v for v in variants if v[0] != "spectraformer"]
  if args.sweep_pairs == "all":
    return variants
  if args.sweep_pairs != "auto":
    return baselines + [("spectraformer", c, w) for c, w in common.select_pairs(args.sweep_pairs)]
  rf = [v for v in variants if v[0] == "spectraformer"]
  comps = list(dict.fromkeys(v[1] for v in rf))
  chosen = []
  for comp in comps:
    pick = next((v for v in rf if v[1] == comp and v[2] == "orf"), None)
    chosen.append(pick or next(v for v in rf if v[1] == comp))
  chosen += [v for v in rf if v[1] in ("posrf", "oprf") and v[2] in ("fastfoodl", "gmm")]
  return baselines + list(dict.fromkeys(chosen))


def _memory_specs(args, tasks, step_specs: list[str]) -> list[str]:
  if args.process_memory == "none" or jax.default_backend() == "cpu":
    return []  # the CPU backend reports no memory stats
  if args.process_memory == "all":
    return step_specs
  if args.process_memory != "auto":
    return [s for s in common.parse_list(args.process_memory) if s in step_specs]
  names = ["softmax", "flash", "posrf-orf", "oprf-fastfoodl"]
  return [f"{t}/{n}" for t in tasks for n in names if f"{t}/{n}" in step_specs]


def main(argv: Optional[Sequence[str]] = None) -> dict:
  args = parse_args(argv)
  args.start_time = time.time()
  # No preallocation: fresh-process peaks run beside this process, and its own pool then holds
  # only what it used (must be set before the backend starts).
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if args.child_memory:
    print(_CHILD_TAG + json.dumps(child_memory(args.child_memory, args)), flush=True)
    return {}
  log = (lambda *_: None) if args.quiet else (lambda msg: print(msg, flush=True))
  tasks = [] if args.tasks == "none" else (common.parse_list(args.tasks) or list(TASK_SHAPES))
  for task in tasks:
    if task not in TASK_SHAPES:
      raise ValueError(f"Unknown task {task!r}; choose from {tuple(TASK_SHAPES)}.")
  variants = select_variants(args)
  lengths = [] if args.sweep_lengths == "none" else [
      common.parse_length(s) for s in args.sweep_lengths.split(",") if s.strip()]
  # Fresh-process peaks first, while this process holds no device memory (no preallocation).
  step_specs = [f"{t}/{variant_name(v)}" for t in tasks for v in variants]
  specs = _memory_specs(args, tasks, step_specs)
  mem, t0 = {}, time.time()
  if specs:
    mem = process_memory(specs, args)
    log(f"[memory] {len(specs)} fresh processes in {time.time() - t0:.0f} s")
  env = common.environment()
  log(f"[speed] {env['device_kind']}: {len(tasks)} tasks x {len(variants)} attentions, "
      f"sweep {len(lengths)} lengths")
  start = time.time()
  steps = run_steps(tasks, variants, args, log)
  for r in steps:
    out = mem.get(f"{r['task']}/{r['attention']}")
    if out is not None:
      r["process_peak_bytes"] = out.get("peak_bytes")
      if out.get("error"):
        r["process_memory_error"] = out["error"]
  sweep = run_sweep(_sweep_variants(args, variants), lengths, args, log) if lengths else []
  fits = fit_sweep(sweep)
  settings = {"m": args.m, "dtype": args.dtype, "model_overrides": args.model or None,
              "warmup": args.warmup, "reps": args.reps,
              "sweep_tokens": args.sweep_tokens, "batch_override": args.batch or None,
              "length_override": args.length or None}
  result = {"environment": env, "settings": settings, "steps": steps, "sweep": sweep,
            "fits": fits, "targets": targets(steps, fits), "seconds": time.time() - start}
  os.makedirs(args.out_dir, exist_ok=True)
  common.write_json(os.path.join(args.out_dir, "speed.json"), result)
  text = markdown(result)
  common.write_text(os.path.join(args.out_dir, "speed.md"), text)
  plots(result, args.out_dir)
  log(text)
  return result


if __name__ == "__main__":
  try:
    main(sys.argv[1:])
  except Exception:  # pylint: disable=broad-except
    traceback.print_exc()
    sys.exit(1)
