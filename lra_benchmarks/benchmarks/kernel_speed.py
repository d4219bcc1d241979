r"""Attention core alone, forward + backward: the Pallas kernels, the XLA fused path, cuDNN flash.

At a fixed number of tokens per batch (``--tokens``; batch = tokens / n) and every length of
``--lengths``: ``q, k, v [batch, n, heads, head_dim]`` in ``--dtype``, PosRF features with
``m = --m`` (``components.posrf_log_linear`` of ``q, k`` scaled by ``head_dim**-0.25``), the
gradient of ``sum(out^2)`` with respect to ``q, k, v`` (and ``W`` for random features).
Implementations:

* ``pallas``: ``pallas_attention.positive_rf_attention_pallas`` (feature operands in ``--dtype``);
* ``xla``: ``fused.positive_rf_attention`` (the custom-VJP over XLA ops, same feature dtype);
* ``flash``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU only).

Timing: ``--warmup`` calls, then the median of ``--reps`` calls, each timed on the host clock
after ``block_until_ready`` (``common.time_calls``: dispatch included), and the time per call of
``--reps`` calls dispatched back to back (``common.time_pipelined``: as a training loop runs
them); memory: the compiled call's
``memory_analysis().temp_size_in_bytes``.  ``--pallas_configs`` (``tile:chunk:warps[:stages]``, comma
separated) are all timed at ``--tune_lengths``; the first is the one of the main table.  The
accuracy check compares the gradients and outputs of ``pallas`` and ``xla`` (both in
``--dtype``) with the float32 XLA path at the first length.

    python -m lra_benchmarks.benchmarks.kernel_speed --out_dir=docs/benchmarks

Writes ``kernel_speed.json`` and ``kernel_speed.md``.

``--mode=causal`` times the causal core instead (same inputs, same loss; lengths default
1k,4k,16k,64k): both schedules of ``causal`` (``recurrent``: the sequential scan over chunks,
``parallel``: per-chunk states, a parallel prefix scan, every chunk at once) for two cores,

* ``rf``: ``causal.causal_log_attention`` on PosRF's log-linear logits (what
  ``rf_attention(is_causal=True)`` and the layers run);
* ``features``: ``causal.causal_linear_attention`` on materialised PosRF features (the core
  timed against flash-linear-attention in the issue),

at ``causal.DEFAULT_CHUNK_SIZE``, the Pallas kernels (``pallas_causal``, features in
``--dtype``) at every ``--causal_pallas_configs`` (chunk:warps), then the ``parallel`` rf core
at every chunk of ``--chunks`` and length of ``--chunk_lengths``, and the relative error of
both schedules and the kernels (in ``--dtype``) against the float32 recurrent rf core at the
first length.  Writes ``kernel_causal.json`` and ``kernel_causal.md``.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from lra_benchmarks.benchmarks import common
from spectraformer_jax import causal, components, fused, weights
from spectraformer_jax.pallas_attention import positive_rf_attention_pallas
from spectraformer_jax.pallas_causal import causal_rf_attention_pallas

IMPLEMENTATIONS = ("pallas", "xla", "flash")
TARGET_MS = 0.35           # layer fwd + bwd at every length
TARGET_VS_FLASH_AT_MAX = 40.0  # speed-up over flash at the longest length
CAUSAL_CORES = ("rf", "features")
# flash-linear-attention's chunk_linear_attn, fwd + bwd at 65536 tokens on an H200 (PyTorch,
# measured once, n = 1k..64k): the causal target is at or below it at every length.
FLA_MS = {1024: 5.2, 4096: 4.4, 16384: 3.6, 65536: 5.8}


def rf_core(q, k, v, w, *, implementation: str, dtype, pallas_config=None):
  """PosRF attention of ``q, k, v [b, n, h, d]`` by ``implementation``: ``[b, n, h, d]`` f32."""
  scale = q.shape[-1] ** -0.25
  heads_first = lambda t: jnp.swapaxes(t, 1, 2)
  form = components.posrf_log_linear(heads_first(q) * scale, heads_first(k) * scale, w)
  if implementation == "pallas":
    tiling = {} if pallas_config is None else dict(
        zip(("block_rows", "chunk_rows", "num_warps", "num_stages"), pallas_config))
    out = positive_rf_attention_pallas(form, w, heads_first(v), feature_dtype=dtype, **tiling)
  elif implementation == "xla":
    out = fused.positive_rf_attention(form, w, heads_first(v), feature_dtype=dtype)
  else:
    raise ValueError(f"implementation must be 'pallas' or 'xla', got {implementation!r}.")
  return heads_first(out)


def _flash(q, k, v, w):
  del w
  return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


def make_step(attend: Callable, with_w: bool) -> Callable:
  """Compiled-to-be ``(q, k, v, w) -> (loss, grads)`` of ``loss = sum(attend(...)^2)``."""
  def loss(q, k, v, w):
    return jnp.sum(jnp.square(attend(q, k, v, w).astype(jnp.float32)))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3) if with_w else (0, 1, 2)))


def inputs(n: int, args):
  """``q, k, v [tokens / n, n, heads, head_dim]`` in ``args.dtype`` and ``W [m, head_dim]``."""
  ks = jax.random.split(jax.random.key(0), 4)
  shape = (args.tokens // n, n, args.heads, args.head_dim)
  qkv = [jax.random.normal(kk, shape, jnp.float32).astype(args.dtype) for kk in ks[:3]]
  return (*qkv, weights.orf(ks[3], args.m, args.head_dim))


def attend_fn(implementation: str, args, pallas_config=None) -> Callable:
  if implementation == "flash":
    return _flash
  extra = {} if pallas_config is None else {"pallas_config": pallas_config}
  return functools.partial(rf_core, implementation=implementation, dtype=args.dtype, **extra)


def measure(step: Callable, arrays, args) -> dict:
  """Median time and compiled temporaries of one fwd+bwd call."""
  start = time.perf_counter()
  compiled = step.lower(*arrays).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  row = common.time_calls(lambda: compiled(*arrays), warmup=args.warmup, reps=args.reps)
  row["pipelined_ms"] = common.time_pipelined(lambda: compiled(*arrays), warmup=1,
                                              reps=args.reps)
  row["compile_s"] = compile_s
  row["temp_mib"] = None if mem is None else mem.temp_size_in_bytes / common.MIB
  return row


def accuracy(n: int, args) -> dict:
  """Relative L2 error of the outputs and every gradient against the float32 XLA path."""
  arrays = inputs(n, args)
  ref_fn = functools.partial(rf_core, implementation="xla", dtype=jnp.float32)
  with jax.default_matmul_precision("highest"):
    ref = jax.jit(ref_fn)(*arrays), make_step(ref_fn, True)(*arrays)[1]
  result = {}
  for impl in ("pallas", "xla"):
    fn = attend_fn(impl, args, parse_config(args.pallas_configs)[0])
    got = jax.jit(fn)(*arrays), make_step(fn, True)(*arrays)[1]
    errs = [float(jnp.linalg.norm((a - b).astype(jnp.float32)) /
                  jnp.linalg.norm(b.astype(jnp.float32)))
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref))]
    result[impl] = dict(zip(["out", "dq", "dk", "dv", "dW"], errs))
  return result


def _parse_colon_ints(text: str, sizes: tuple[int, ...], form: str) -> list[tuple[int, ...]]:
  """Comma-separated items of ``sizes`` colon-separated integers, e.g. ``"64:4,128:8"``."""
  configs = []
  for item in common.parse_list(text):
    parts = item.split(":")
    if len(parts) not in sizes:
      raise ValueError(f"a {form}, got {item!r}.")
    configs.append(tuple(int(p) for p in parts))
  return configs


def parse_config(text: str) -> list[tuple[int, ...]]:
  """``"128:512:4,64:512:4:3"`` -> ``[(128, 512, 4), (64, 512, 4, 3)]``
  (tile:chunk:warps[:stages])."""
  return _parse_colon_ints(text, (3, 4), "pallas config is tile:chunk:warps[:stages]")


def run(args) -> dict:
  """Every implementation at every length, the tuning table and the accuracy check."""
  on_gpu = jax.default_backend() == "gpu"
  impls = [i for i in common.parse_list(args.implementations) if i != "flash" or on_gpu]
  configs = parse_config(args.pallas_configs)
  rows = []
  for n in [common.parse_length(x) for x in common.parse_list(args.lengths)]:
    arrays = inputs(n, args)
    for impl in impls:
      step = make_step(attend_fn(impl, args, configs[0]), impl != "flash")
      row = {"n": n, "batch": args.tokens // n, "implementation": impl}
      try:
        row.update(measure(step, arrays, args))
      except Exception as err:  # pylint: disable=broad-except
        row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
      rows.append(row)
      print(row, flush=True)
  tuning = []
  for n in [common.parse_length(x) for x in common.parse_list(args.tune_lengths) or []]:
    arrays = inputs(n, args)
    for config in configs:
      row = {"n": n, "config": ":".join(map(str, config))}
      try:
        row.update(measure(make_step(attend_fn("pallas", args, config), True), arrays, args))
      except Exception as err:  # pylint: disable=broad-except
        row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
      tuning.append(row)
      print(row, flush=True)
  check = accuracy(common.parse_length(common.parse_list(args.lengths)[0]), args)
  print(check, flush=True)
  return {"environment": common.environment(), "args": {k: str(v) for k, v in
                                                        vars(args).items()},
          "rows": rows, "tuning": tuning, "accuracy": check}


def markdown(result: dict) -> str:
  """The per-length table (ms, ratios, temporaries), the tuning table and the accuracy check."""
  by = {(r["n"], r["implementation"]): r for r in result["rows"]}
  lengths = sorted({r["n"] for r in result["rows"]})
  ms = lambda n, i: by.get((n, i), {}).get("median_ms")
  ratio = lambda a, b: None if a is None or b is None else a / b
  pipe = lambda n, i: by.get((n, i), {}).get("pipelined_ms")
  table = [[n, by[(n, "pallas")]["batch"] if (n, "pallas") in by else None,
            ms(n, "pallas"), ms(n, "xla"), ms(n, "flash"),
            ratio(ms(n, "pallas"), ms(n, "xla")), ratio(ms(n, "flash"), ms(n, "pallas")),
            *(pipe(n, i) for i in IMPLEMENTATIONS),
            ratio(pipe(n, "flash"), pipe(n, "pallas")),
            *(by.get((n, i), {}).get("temp_mib") for i in IMPLEMENTATIONS)]
           for n in lengths]
  main_config = common.parse_list(result["args"]["pallas_configs"])[0]
  lines = ["# Attention core forward + backward: Pallas vs XLA vs cuDNN flash", "",
           common.environment_markdown(result["environment"]), "",
           f"Pallas tiling of the main table (tile:chunk:warps[:stages]): {main_config}. "
           "ms: median of calls waited for one by one (dispatch included); pipelined: calls "
           "dispatched back to back.", "",
           common.markdown_table(
               ["n", "batch", "pallas ms", "xla ms", "flash ms", "pallas / xla",
                "flash / pallas", "pallas pipelined", "xla pipelined", "flash pipelined",
                "flash / pallas pipelined", "pallas temp MiB", "xla temp MiB",
                "flash temp MiB"], table)]
  errors = [f"- {r['implementation']} n={r['n']}: {r['error']}" for r in result["rows"]
            if "error" in r]
  if errors:
    lines += ["", "Failures:", *errors]
  p = [ms(n, "pallas") for n in lengths if ms(n, "pallas") is not None]
  if p:
    lines += ["", f"Targets: pallas <= {TARGET_MS} ms at every length: max {max(p):.3f} ms; "
              f"flash / pallas at n = {lengths[-1]}: "
              f"{common.fmt(ratio(ms(lengths[-1], 'flash'), ms(lengths[-1], 'pallas')))} "
              f"(target >= {TARGET_VS_FLASH_AT_MAX})."]
  if result["tuning"]:
    lines += ["", "Pallas tiling (tile:chunk:warps[:stages]):", "",
              common.markdown_table(["n", "config", "ms", "pipelined ms", "temp MiB"],
                                    [[r["n"], r["config"], r.get("median_ms", r.get("error")),
                                      r.get("pipelined_ms"), r.get("temp_mib")]
                                     for r in result["tuning"]])]
  acc = result["accuracy"]
  lines += ["", "Relative L2 error against the float32 XLA path (first length):", "",
            common.markdown_table(["implementation", *next(iter(acc.values())).keys()],
                                  [[k, *v.values()] for k, v in acc.items()])]
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- causal


def causal_core(q, k, v, w, *, core: str, schedule: str, chunk: int, num_warps: int = 4):
  """Causal PosRF attention of ``q, k, v [b, n, h, d]`` (module doc): ``[b, n, h, d]`` f32.
  ``core="pallas"``: ``pallas_causal`` (``schedule`` unused; features in ``q``'s dtype)."""
  heads_first = lambda t: jnp.swapaxes(t, 1, 2)
  scale = q.shape[-1] ** -0.25
  x, y = (heads_first(t).astype(jnp.float32) * scale for t in (q, k))
  v = heads_first(v)
  if core == "pallas":
    out = causal_rf_attention_pallas(components.posrf_log_linear(x, y, w), w, v,
                                     feature_dtype=q.dtype, chunk_rows=chunk,
                                     num_warps=num_warps)
  elif core == "rf":
    form = components.posrf_log_linear(x, y, w)
    lq = components.log_linear_logits(form.xq, w, form.col, form.row_q)
    lk = components.log_linear_logits(form.xk, w, form.col, form.row_k)
    out = causal.causal_log_attention(lq, lk, v, chunk_size=chunk, schedule=schedule)
  elif core == "features":
    phi_q, phi_k = components.posrf_features(x, y, w)
    out = causal.causal_linear_attention(phi_q, phi_k, v, chunk, guard=False,
                                         schedule=schedule)
  else:
    raise ValueError(f"core must be one of {CAUSAL_CORES + ('pallas',)}, got {core!r}.")
  return heads_first(out)


def _timed(step: Callable, arrays, args, **row) -> dict:
  """``row`` with ``measure``'s figures, or the error that stopped it."""
  try:
    row.update(measure(step, arrays, args))
  except Exception as err:  # pylint: disable=broad-except
    row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
  print(row, flush=True)
  return row


def causal_accuracy(n: int, args) -> dict:
  """Relative L2 error of the output and the q, k, v gradients of both schedules (rf core,
  ``--dtype`` inputs) against the float32 recurrent rf core at ``HIGHEST`` precision."""
  arrays = inputs(n, args)
  rel = lambda a, b: float(jnp.linalg.norm((a - b).astype(jnp.float32))
                           / jnp.linalg.norm(b.astype(jnp.float32)))
  core = lambda schedule: functools.partial(causal_core, core="rf", schedule=schedule,
                                            chunk=causal.DEFAULT_CHUNK_SIZE)
  f32 = [t.astype(jnp.float32) for t in arrays]
  with jax.default_matmul_precision("highest"):
    ref = jax.jit(core("recurrent"))(*f32), make_step(core("recurrent"), False)(*f32)[1]
  chunk, warps = parse_causal_config(args.causal_pallas_configs)[0]
  fns = {schedule: core(schedule) for schedule in causal.SCHEDULES}
  fns["pallas"] = functools.partial(causal_core, core="pallas", schedule="", chunk=chunk,
                                    num_warps=warps)
  result = {}
  for name, fn in fns.items():
    try:
      got = jax.jit(fn)(*arrays), make_step(fn, False)(*arrays)[1]
    except Exception as err:  # pylint: disable=broad-except
      result[name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
      continue
    result[name] = dict(zip(["out", "dq", "dk", "dv"],
                            [rel(a, b) for a, b in zip(jax.tree.leaves(got),
                                                       jax.tree.leaves(ref))]))
  return result


def parse_causal_config(text: str) -> list[tuple[int, ...]]:
  """``"64:4,128:8"`` -> ``[(64, 4), (128, 8)]`` (chunk:warps of the causal Pallas kernels)."""
  return _parse_colon_ints(text, (2,), "causal pallas config is chunk:warps")


def run_causal(args) -> dict:
  """Both schedules of both cores at every length, the chunk table, the accuracy check."""
  lengths = [common.parse_length(x) for x in common.parse_list(args.lengths)]
  rows = []
  for n in lengths:
    arrays = inputs(n, args)
    for core in CAUSAL_CORES:
      for schedule in causal.SCHEDULES:
        step = make_step(functools.partial(causal_core, core=core, schedule=schedule,
                                           chunk=causal.DEFAULT_CHUNK_SIZE), False)
        rows.append(_timed(step, arrays, args, n=n, batch=args.tokens // n, core=core,
                           schedule=schedule))
  kernels = []
  for n in lengths:
    arrays = inputs(n, args)
    for chunk, warps in parse_causal_config(args.causal_pallas_configs):
      step = make_step(functools.partial(causal_core, core="pallas", schedule="", chunk=chunk,
                                         num_warps=warps), False)
      kernels.append(_timed(step, arrays, args, n=n, config=f"{chunk}:{warps}"))
  chunks = []
  for n in [common.parse_length(x) for x in common.parse_list(args.chunk_lengths) or []]:
    arrays = inputs(n, args)
    for chunk in common.parse_list(args.chunks, int):
      step = make_step(functools.partial(causal_core, core="rf", schedule="parallel",
                                         chunk=chunk), False)
      chunks.append(_timed(step, arrays, args, n=n, chunk=chunk))
  check = causal_accuracy(lengths[0], args)
  print(check, flush=True)
  return {"environment": common.environment(), "args": {k: str(v) for k, v in
                                                        vars(args).items()},
          "chunk_size": causal.DEFAULT_CHUNK_SIZE, "rows": rows, "pallas": kernels,
          "chunks": chunks, "accuracy": check}


def causal_markdown(result: dict) -> str:
  """Per length: both schedules of both cores (ms, speed-up, temporaries), fla's figure; the
  chunk table; the accuracy check."""
  by = {(r["n"], r["core"], r["schedule"]): r for r in result["rows"]}
  lengths = sorted({r["n"] for r in result["rows"]})
  get = lambda n, c, s, key="median_ms": by.get((n, c, s), {}).get(key)
  ratio = lambda a, b: None if a is None or b is None else a / b
  table = []
  for n in lengths:
    row = [n, int(result["args"]["tokens"]) // n]
    for core in CAUSAL_CORES:
      rec, par = get(n, core, "recurrent"), get(n, core, "parallel")
      row += [rec, par, ratio(rec, par)]
    row += [get(n, "rf", s, "temp_mib") for s in ("recurrent", "parallel")] + [FLA_MS.get(n)]
    table.append(row)
  header = ["n", "batch"]
  for core in CAUSAL_CORES:
    header += [f"{core} recurrent ms", f"{core} parallel ms", f"{core} speed-up"]
  header += [f"rf {s} temp MiB" for s in ("recurrent", "parallel")] + ["fla ms (issue)"]
  lines = ["# Causal attention core forward + backward: recurrent scan vs chunk-parallel", "",
           common.environment_markdown(result["environment"]), "",
           f"Chunk size {result['chunk_size']} (the default); tokens per batch "
           f"{result['args']['tokens']}, heads {result['args']['heads']}, head_dim "
           f"{result['args']['head_dim']}, m {result['args']['m']}, inputs "
           f"{result['args']['dtype']}.", "", common.markdown_table(header, table)]
  errors = [f"- {r['core']} {r['schedule']} n={r['n']}: {r['error']}" for r in result["rows"]
            if "error" in r]
  if errors:
    lines += ["", "Failures:", *errors]
  par = [get(n, "rf", "parallel") for n in lengths if get(n, "rf", "parallel") is not None]
  if par:
    lines += ["", f"rf parallel: {min(par):.3g}-{max(par):.3g} ms over n = {lengths[0]}.."
              f"{lengths[-1]} (max / min {max(par) / min(par):.2f}); target: at or below "
              "fla at every n (3.6 ms at n = 16384)."]
  if result.get("pallas"):
    lines += ["", "Pallas kernels (`pallas_causal`, chunk:warps), same inputs:", "",
              common.markdown_table(
                  ["n", "config", "ms", "pipelined ms", "temp MiB", "fla ms (issue)"],
                  [[r["n"], r["config"], r.get("median_ms", r.get("error")),
                    r.get("pipelined_ms"), r.get("temp_mib"), FLA_MS.get(r["n"])]
                   for r in result["pallas"]])]
  if result["chunks"]:
    lines += ["", "Parallel rf core by chunk size:", "",
              common.markdown_table(["n", "chunk", "ms", "temp MiB"],
                                    [[r["n"], r["chunk"], r.get("median_ms", r.get("error")),
                                      r.get("temp_mib")] for r in result["chunks"]])]
  acc = result["accuracy"]
  columns = ["out", "dq", "dk", "dv"]
  lines += ["", "Relative L2 error against the float32 recurrent rf core (first length):", "",
            common.markdown_table(["core", *columns],
                                  [[k, *(v.get(c, v.get("error")) for c in columns)]
                                   for k, v in acc.items()])]
  return "\n".join(lines) + "\n"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--mode", default="bidirectional", choices=["bidirectional", "causal"])
  parser.add_argument("--lengths", default=None,
                      help="default: 512,1k,2k,4k,8k,16k,32k,64k (bidirectional), "
                      "1k,4k,16k,64k (causal)")
  parser.add_argument("--tokens", type=int, default=65536)
  parser.add_argument("--heads", type=int, default=2)
  parser.add_argument("--head_dim", type=int, default=32)
  parser.add_argument("--m", type=int, default=128)
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--implementations", default=",".join(IMPLEMENTATIONS))
  parser.add_argument("--pallas_configs", default="128:512:8")
  parser.add_argument("--tune_lengths", default="")
  parser.add_argument("--chunks", default="32,64,128,256", help="causal: chunk sizes to time")
  parser.add_argument("--chunk_lengths", default="4k,64k", help="causal: lengths of --chunks")
  parser.add_argument("--causal_pallas_configs", default="128:8",
                      help="causal: chunk:warps of the Pallas kernels, timed at every length")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--out_dir", default="docs/benchmarks")
  args = parser.parse_args(argv)
  args.dtype = jnp.dtype(args.dtype)
  if args.lengths is None:
    args.lengths = "1k,4k,16k,64k" if args.mode == "causal" else "512,1k,2k,4k,8k,16k,32k,64k"
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
  args = parse_args(argv)
  causal_mode = args.mode == "causal"
  result = run_causal(args) if causal_mode else run(args)
  name = "kernel_causal" if causal_mode else "kernel_speed"
  os.makedirs(args.out_dir, exist_ok=True)
  common.write_json(os.path.join(args.out_dir, f"{name}.json"), result)
  common.write_text(os.path.join(args.out_dir, f"{name}.md"),
                    (causal_markdown if causal_mode else markdown)(result))
  return result


if __name__ == "__main__":
  main()
