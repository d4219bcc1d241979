"""Relative error of random-feature attention vs exact softmax attention, every registered pair.

    python -m lra_benchmarks.benchmarks.attention_table --out docs/attention_table.json

For each allowed (component, weight) pair (``registry.valid_pairs()``) and m in --features:
relative Frobenius error ``|out_rf - out_exact|_F / |out_exact|_F`` of the attention outputs on
random inputs (batch 2, 2 heads, n = 512, head_dim 32; q, k ~ N(0, scale^2), v ~ N(0, 1)),
averaged over --seeds draws of W.  Prints a markdown table; writes JSON with --out.

A thin CLI over ``lra_benchmarks.benchmarks.approximation`` (which also reports the matrix
error, several scales and trained-model inputs): the same error computation, with this
table's fixed inputs and seeding so the recorded figures in docs/estimators.md reproduce.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Optional, Sequence

import jax

from lra_benchmarks.benchmarks import approximation
from spectraformer_jax import registry


def relative_errors(component: str, weight: str, features: Sequence[int], *, batch: int = 2,
                    heads: int = 2, n: int = 512, dim: int = 32, scale: float = 1.0,
                    seeds: int = 1, seed: int = 0) -> dict[int, float]:
  """{m: mean relative Frobenius output error} for one pair, over ``seeds`` draws of W.

  The inputs are fixed (one q/k/v from ``seed``); the errors come from
  ``approximation.attention_errors`` (output error only), W from ``approximation.draw_features``.
  """
  k = jax.random.split(jax.random.key(seed), 3)
  q = scale * jax.random.normal(k[0], (batch, n, heads, dim))
  kk = scale * jax.random.normal(k[1], (batch, n, heads, dim))
  v = jax.random.normal(k[2], (batch, n, heads, dim))
  out = {}
  for m in features:
    errs = []
    for s in range(seeds):
      w, cparams = approximation.draw_features(
          component, weight, jax.random.fold_in(jax.random.key(seed + 1), s), m, dim)
      _, err = approximation.attention_errors(q, kk, v, w, cparams, None, component=component)
      errs.append(float(err))
    out[m] = sum(errs) / len(errs)
  return out


def main(argv: Optional[Sequence[str]] = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default=None, help="JSON output path")
  ap.add_argument("--features", default="64,128,256")
  ap.add_argument("--scale", type=float, default=1.0, help="std of q and k entries")
  ap.add_argument("--seeds", type=int, default=1, help="W draws averaged per cell")
  ap.add_argument("--n", type=int, default=512)
  args = ap.parse_args(argv)
  features = [int(f) for f in args.features.split(",")]
  rows = []
  t0 = time.time()
  with jax.default_matmul_precision("highest"):
    for c, w in registry.valid_pairs():
      try:
        errs = relative_errors(c, w, features, n=args.n, scale=args.scale, seeds=args.seeds)
        note = ""
      except Exception as e:  # a broken pair must not hide the others
        errs, note = {m: math.nan for m in features}, f"{type(e).__name__}: {e}"[:120]
      rows.append({"component": c, "weight": w, "errors": {str(m): errs[m] for m in features},
                   "error": note})
      print(f"{c:8s} {w:10s} " + " ".join(f"{errs[m]:.4f}" for m in features), file=sys.stderr)
  header = "| component | weight | " + " | ".join(f"m={m}" for m in features) + " |"
  lines = [header, "|" + "---|" * (2 + len(features))]
  for r in rows:
    cells = [("n/a" if math.isnan(r["errors"][str(m)]) else f"{r['errors'][str(m)]:.4f}")
             for m in features]
    lines.append(f"| {r['component']} | {r['weight']} | " + " | ".join(cells) + " |")
  table = "\n".join(lines)
  print(table)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"setting": {"batch": 2, "heads": 2, "n": args.n, "head_dim": 32,
                             "scale": args.scale, "seeds": args.seeds, "features": features,
                             "backend": jax.default_backend(),
                             "seconds": round(time.time() - t0, 1)},
                 "rows": rows, "markdown": table}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
