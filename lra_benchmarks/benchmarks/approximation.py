"""Kernel-approximation quality of every (component, weight) combination.

For each combination and number of features m, the relative Frobenius error against exact
softmax attention of

* the attention matrix: ``A_hat = diag(phi(Q) phi(K)^T 1)^-1 phi(Q) phi(K)^T`` (the raw
  normalised estimator, no denominator guard) vs ``A = softmax(Q K^T / sqrt(d))``;
* the attention output: ``attention.rf_attention(q, k, v, W, ...)`` (the code path the models
  use, guard included) vs ``A V``;

on random Gaussian q/k (entries N(0, scale^2), so the logits have standard deviation
scale^2) at several scales, and, with ``--checkpoint WORKDIR``, on the q/k/v that a trained
model computes on its evaluation data.  Each figure is the mean over ``--seeds`` independent
draws of W (and of q/k/v for the random inputs); the JSON also keeps the standard deviation.

    python -m lra_benchmarks.benchmarks.approximation --out_dir=benchmark_results
    python -m lra_benchmarks.benchmarks.approximation --pairs=posrf:orf,oprf:qmc --m=32,64 \
        --n=128 --seeds=2

Writes ``approximation.json``, ``approximation.md`` and ``approximation_heatmap.png``
(component x weight, at ``--heatmap_m`` and the scale nearest 1).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lra_benchmarks import data as lra_data
from lra_benchmarks import models
from lra_benchmarks import train_lib
from lra_benchmarks.benchmarks import common
from spectraformer_jax import attention
from spectraformer_jax import registry

DEFAULT_M = (32, 64, 128, 256)
DEFAULT_SCALES = (0.5, 1.0, 1.5)


# ----------------------------------------------------------------------------- core


def _exact(q, k, v, kv_mask):
  """Exact softmax attention matrix [b, h, n, l] and output [b, n, h, d] (float32)."""
  d = q.shape[-1]
  logits = jnp.einsum("bnhd,blhd->bhnl", q, k, precision=jax.lax.Precision.HIGHEST) / math.sqrt(d)
  if kv_mask is not None:
    logits = jnp.where(kv_mask[:, None, None, :], logits, -jnp.inf)
  attn = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhnl,blhd->bnhd", attn, v, precision=jax.lax.Precision.HIGHEST)
  return attn, out


def _rel_err(approx, exact, mask=None):
  """Relative Frobenius error ``|approx - exact| / |exact|`` over the real (masked) entries."""
  diff = (approx - exact) ** 2
  ref = exact**2
  if mask is not None:
    diff, ref = jnp.where(mask, diff, 0.0), jnp.where(mask, ref, 0.0)
  return jnp.sqrt(jnp.sum(diff) / jnp.sum(ref))


@functools.partial(jax.jit, static_argnames=("component",))
def attention_errors(q, k, v, w, cparams, kv_mask, *, component: str):
  """(matrix error, output error) of one combination on q/k/v [b, n, h, d].

  ``kv_mask`` bool[b, n] (True = real token) or None; masked positions are left out of both
  the keys and the error (queries at padding are not scored).
  """
  spec = registry.get_component(component)
  d = q.shape[-1]
  attn, out = _exact(q, k, v, kv_mask)
  # The registry layout is [..., n, d] with heads leading.
  x = jnp.swapaxes(q, 1, 2) * d**-0.25
  y = jnp.swapaxes(k, 1, 2) * d**-0.25
  mask_bh = None if kv_mask is None else kv_mask[:, None, :]
  phi_x, phi_y = spec.features(x, y, w, x_mask=mask_bh, y_mask=mask_bh, params=cparams,
                               stabilize=True)
  scores = jnp.einsum("bhnf,bhlf->bhnl", phi_x, phi_y, precision=jax.lax.Precision.HIGHEST)
  attn_hat = scores / jnp.sum(scores, axis=-1, keepdims=True)
  out_hat = attention.rf_attention(q, k, v, w, component=component, params=cparams,
                                   kv_mask=kv_mask, q_mask=kv_mask)
  if kv_mask is None:
    mat_mask = out_mask = None
  else:
    mat_mask = kv_mask[:, None, :, None] & kv_mask[:, None, None, :]
    out_mask = kv_mask[:, :, None, None]
  return (_rel_err(attn_hat, attn, mat_mask),
          _rel_err(out_hat.astype(jnp.float32), out, out_mask))


def draw_features(component: str, weight: str, key, m: int, d: int):
  """(W float32[m, d], component params or None) for one combination."""
  comp, wspec = registry.check_pair(component, weight)
  kw, kc = jax.random.split(key)
  params, buffers = wspec.init(kw, m, d)
  w = jnp.asarray(wspec.matrix(params, buffers), jnp.float32)
  cparams = comp.init_params(kc, d) if comp.init_params is not None else None
  return w, cparams


@functools.lru_cache(maxsize=None)
def _drawer(component: str, weight: str, m: int, d: int):
  """``keys [draws] -> (W [draws, m, d], params)``, compiled once per combination and m."""
  return jax.jit(jax.vmap(lambda key: draw_features(component, weight, key, m, d)))


def evaluate(component: str, weight: str, m: int, inputs: Sequence[tuple], seed: int) -> dict:
  """Mean/std over ``inputs`` (one (q, k, v, mask) per draw) of both errors, one W per draw."""
  keys = jax.random.split(jax.random.PRNGKey(seed), len(inputs))
  ws, cparams = _drawer(component, weight, m, inputs[0][0].shape[-1])(keys)
  mat, out = [], []
  for i, (q, k, v, mask) in enumerate(inputs):
    cp = None if cparams is None else jax.tree.map(lambda a, i=i: a[i], cparams)
    e_mat, e_out = attention_errors(q, k, v, ws[i], cp, mask, component=component)
    mat.append(e_mat)
    out.append(e_out)
  mat_a, out_a = np.asarray(jax.device_get(mat)), np.asarray(jax.device_get(out))
  return {"matrix_err": float(np.mean(mat_a)), "matrix_err_std": float(np.std(mat_a)),
          "output_err": float(np.mean(out_a)), "output_err_std": float(np.std(out_a)),
          "draws": len(inputs)}


def gaussian_inputs(seed: int, scale: float, draws: int, batch: int, n: int, heads: int,
                    d: int) -> list[tuple]:
  """``draws`` independent (q, k, v, None) with q, k entries N(0, scale^2) and v N(0, 1)."""
  out = []
  for i in range(draws):
    kq, kk, kv = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed + 7919), i), 3)
    shape = (batch, n, heads, d)
    out.append((scale * jax.random.normal(kq, shape), scale * jax.random.normal(kk, shape),
                jax.random.normal(kv, shape), None))
  return out


# ----------------------------------------------------------------------------- checkpoint


def checkpoint_inputs(workdir: str, *, num_batches: int = 1, split: str = "validation",
                      max_batch: int = 4, arrays: Optional[dict] = None) -> dict[str, list[tuple]]:
  """q/k/v of every attention layer of a trained model (a trainer workdir: ``config.json`` and
  orbax checkpoints, the best one if present, else the latest) on ``num_batches`` batches of
  ``max_batch`` examples of ``split`` (or of ``arrays``, a ``Task.load``-style dict).

  Returns ``{layer_path: [(q, k, v, kv_mask), ...]}``, q/k/v float32 [b, n, h, d] from the
  layers' ``query``/``key``/``value`` projections (``capture_intermediates``; retrieval: the
  first document), kv_mask = tokens != 0 for padded tasks.
  """
  import json  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  workdir = os.path.abspath(workdir)
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  task = lra_data.get_task(config.task)
  model = models.build_model(models.ModelConfig.from_config(
      config.model, vocab_size=task.vocab_size, num_classes=task.num_classes,
      max_len=config.seq_len), dual=task.dual, padded=task.padded)
  folder = next(os.path.join(workdir, d) for d in ("best", "checkpoints")
                if os.path.isdir(os.path.join(workdir, d)))
  with ocp.CheckpointManager(folder, item_names=("state", "meta")) as mngr:
    state = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]
  variables = {"params": state["params"]}
  if state.get("random_features"):
    variables["random_features"] = state["random_features"]
  if arrays is None:
    arrays = task.load(split, data_dir=config.data_dir, max_length=config.max_length)
  arrays = train_lib._pad_to(arrays, config.seq_len)  # pylint: disable=protected-access
  names = ("inputs1", "inputs2") if task.dual else ("inputs",)
  found: dict[str, list[tuple]] = {}
  for i in range(num_batches):
    batch = {k: jnp.asarray(arrays[k][i * max_batch:(i + 1) * max_batch]) for k in names}
    if batch[names[0]].shape[0] == 0:
      break
    _, state_vars = model.apply(
        variables, *(batch[k] for k in names), train=False, mutable=["intermediates"],
        capture_intermediates=lambda mdl, method: (mdl.name in ("query", "key", "value")
                                                   and method == "__call__"))
    mask = (batch[names[0]] != 0) if task.padded else None
    for path, q, k, v in _projections(state_vars["intermediates"]):
      found.setdefault(path, []).append((q.astype(jnp.float32), k.astype(jnp.float32),
                                         v.astype(jnp.float32), mask))
  if not found:
    raise ValueError(f"No query/key/value projections found in the model of {workdir!r}.")
  return found


def _projections(tree, prefix=""):
  """Yields (path, q, k, v) for every dict in ``tree`` holding query, key and value (the
  first call's outputs)."""
  if not hasattr(tree, "items"):
    return
  if {"query", "key", "value"} <= set(tree.keys()):
    get = lambda name: tree[name]["__call__"][0]
    yield prefix or "attention", get("query"), get("key"), get("value")
  for name, sub in tree.items():
    if name not in ("query", "key", "value"):
      yield from _projections(sub, f"{prefix}/{name}" if prefix else name)


# ----------------------------------------------------------------------------- reports


def heatmap(results: list[dict], path: str, *, m: int, scale: Any, source: str) -> None:
  """Component x weight heatmaps (matrix and output error) for one m and input set."""
  plt = common.pyplot()
  rows = [r for r in results if r["m"] == m and r["source"] == source and r["scale"] == scale]
  comps = sorted({r["component"] for r in rows})
  weights = sorted({r["weight"] for r in rows})
  fig, axes = plt.subplots(1, 2, figsize=(1.2 + 0.75 * len(weights) * 2, 1.5 + 0.45 * len(comps)),
                           squeeze=False)
  for ax, metric, title in zip(axes[0], ("matrix_err", "output_err"),
                               ("attention matrix", "attention output")):
    grid = np.full((len(comps), len(weights)), np.nan)
    for r in rows:
      value = r[metric]
      if value is not None and np.isfinite(value):
        grid[comps.index(r["component"]), weights.index(r["weight"])] = value
    finite = grid[np.isfinite(grid) & (grid > 0)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (1e-3, 1.0)
    im = ax.imshow(np.log10(grid), cmap="viridis_r", aspect="auto",
                   vmin=np.log10(lo), vmax=np.log10(max(hi, lo * 1.01)))
    ax.set_xticks(range(len(weights)), weights, rotation=45, ha="right")
    ax.set_yticks(range(len(comps)), comps)
    for i in range(len(comps)):
      for j in range(len(weights)):
        text = "x" if not np.isfinite(grid[i, j]) else f"{grid[i, j]:.2g}"
        ax.text(j, i, text, ha="center", va="center", fontsize=6, color="w")
    ax.set_title(f"rel. error, {title}\nm={m}, {source}" + (f", scale {scale}" if scale else ""),
                 fontsize=8)
    fig.colorbar(im, ax=ax, label="log10 relative error")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def markdown(results: list[dict], env: dict, settings: dict) -> str:
  """One table per input set: rows = combinations, columns = m (matrix / output error)."""
  lines = ["# Kernel approximation: relative error vs exact softmax attention\n",
           common.environment_markdown(env),
           f"Settings: {settings}. Cells: attention-matrix error / attention-output error "
           "(relative Frobenius norm, mean over draws).\n"]
  sources = []
  for r in results:
    key = (r["source"], r["scale"])
    if key not in sources:
      sources.append(key)
  ms = sorted({r["m"] for r in results})
  for source, scale in sources:
    title = source if scale is None else f"{source}, scale {scale} (logit std {scale**2:.3g})"
    lines.append(f"\n## {title}\n")
    rows = {}
    for r in results:
      if (r["source"], r["scale"]) == (source, scale):
        rows.setdefault((r["component"], r["weight"]), {})[r["m"]] = r
    table = []
    for (comp, weight), by_m in sorted(rows.items()):
      cells = [comp, weight]
      for m in ms:
        r = by_m.get(m)
        cells.append("-" if r is None else f"{common.fmt(r['matrix_err'])} / "
                     f"{common.fmt(r['output_err'])}")
      table.append(cells)
    lines.append(common.markdown_table(["component", "weight"] + [f"m={m}" for m in ms], table))
  return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  """Parses the CLI flags (``None``: ``sys.argv[1:]``); argparse exits on bad ones."""
  p = argparse.ArgumentParser(prog="python -m lra_benchmarks.benchmarks.approximation",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--pairs", default="all", help="'all' or component:weight,...")
  p.add_argument("--components", default=None, help="comma list filter on components")
  p.add_argument("--weights", default=None, help="comma list filter on weights")
  p.add_argument("--m", default=",".join(map(str, DEFAULT_M)), help="numbers of features")
  p.add_argument("--scales", default=",".join(map(str, DEFAULT_SCALES)),
                 help="std of the Gaussian q/k entries; empty for none")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--n", type=int, default=512, help="sequence length")
  p.add_argument("--heads", type=int, default=2)
  p.add_argument("--head_dim", type=int, default=32)
  p.add_argument("--seeds", type=int, default=3, help="independent draws per cell")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--checkpoint", default=None, help="a trainer workdir: also use its q/k/v")
  p.add_argument("--checkpoint_batches", type=int, default=1)
  p.add_argument("--checkpoint_max_batch", type=int, default=4,
                 help="examples per checkpoint batch kept (the exact n x n matrix is O(b n^2))")
  p.add_argument("--heatmap_m", type=int, default=128)
  p.add_argument("--out_dir", default="benchmark_results")
  p.add_argument("--quiet", action="store_true")
  return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  """Runs the benchmark and writes its files into ``--out_dir``.

  A cell that raises is kept with ``matrix_err``/``output_err`` None and its
  ``"error"``; bad ``--pairs`` raise ValueError (from ``common.select_pairs``).

  Returns:
    {"environment", "settings", "results": one dict per (component, weight, m,
    input set)}, as written to ``approximation.json``.
  """
  args = parse_args(argv)
  pairs = common.select_pairs(args.pairs, common.parse_list(args.components),
                              common.parse_list(args.weights))
  ms = common.parse_list(args.m, int) or list(DEFAULT_M)
  scales = common.parse_list(args.scales, float) or []
  input_sets: list[tuple[str, Any, list[tuple]]] = []
  for scale in scales:
    input_sets.append(("gaussian", scale, gaussian_inputs(args.seed, scale, args.seeds, args.batch,
                                                           args.n, args.heads, args.head_dim)))
  if args.checkpoint:
    layers = checkpoint_inputs(args.checkpoint, num_batches=args.checkpoint_batches,
                               max_batch=args.checkpoint_max_batch)
    for path, draws in layers.items():
      # One W draw per seed, cycling through the captured batches.
      input_sets.append((f"checkpoint:{path}", None,
                         [draws[i % len(draws)] for i in range(args.seeds)]))
  env = common.environment()
  results = []
  start = time.time()
  with jax.default_matmul_precision("highest"):
    for comp, weight in pairs:
      for m in ms:
        for source, scale, inputs in input_sets:
          row = {"component": comp, "weight": weight, "m": m, "source": source, "scale": scale}
          try:
            row.update(evaluate(comp, weight, m, inputs, args.seed))
          except Exception as err:  # pylint: disable=broad-except
            row.update({"matrix_err": None, "output_err": None,
                        "error": f"{type(err).__name__}: {err}"})
          results.append(row)
      if not args.quiet:
        print(f"[approximation] {comp}-{weight} done ({time.time() - start:.0f} s)", flush=True)
  settings = {"batch": args.batch, "n": args.n, "heads": args.heads, "head_dim": args.head_dim,
              "draws": args.seeds, "m": ms, "scales": scales, "checkpoint": args.checkpoint}
  os.makedirs(args.out_dir, exist_ok=True)
  common.write_json(os.path.join(args.out_dir, "approximation.json"),
                    {"environment": env, "settings": settings, "results": results})
  text = markdown(results, env, settings)
  common.write_text(os.path.join(args.out_dir, "approximation.md"), text)
  hm = args.heatmap_m if args.heatmap_m in ms else ms[len(ms) // 2]
  if scales:
    source, scale = "gaussian", min(scales, key=lambda s: abs(s - 1.0))
  else:
    source, scale = input_sets[0][0], None
  heatmap(results, os.path.join(args.out_dir, "approximation_heatmap.png"), m=hm, scale=scale,
          source=source)
  if not args.quiet:
    print(text)
  return {"environment": env, "settings": settings, "results": results}


if __name__ == "__main__":
  main(sys.argv[1:])
