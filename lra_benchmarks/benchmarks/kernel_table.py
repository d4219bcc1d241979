"""Relative MSE of the softmax-kernel estimate for every pair (the first table of docs/estimators.md).

    python -m lra_benchmarks.benchmarks.kernel_table --out docs/kernel_table.json

For every registered (component, weight) pair (learned weights at their init, GERF at its init
A = 0): draw ``--draws`` independent W (m = ``--num_features``, d = ``--dim``), take ``--n``
queries and ``--n`` keys, i.i.d. Gaussian vectors normalised to unit norm, as ONE attention head
(so data-dependent parameters -- OPRF's A*, SADERF's Psi, the DERF optima -- come from the
whole head, as in attention), estimate ``exp(x . y)`` for all n x n pairs with
``phi_x @ phi_y.T`` (``stabilize=False``) and report

    relative MSE = mean over draws and pairs of (estimate - exp(x . y))^2 / exp(x . y)^2

with its Monte-Carlo standard error (over draws), and the mean relative bias.  Prints a
markdown table (rows: components, columns: weights) and writes all numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spectraformer_jax import kernels
from spectraformer_jax import registry


def unit_pairs(key: jax.Array, n: int, d: int) -> tuple[jax.Array, jax.Array]:
  """``n`` queries and ``n`` keys [1, n, d]: i.i.d. Gaussian vectors scaled to unit norm."""
  kx, ky = jax.random.split(key)
  x = jax.random.normal(kx, (1, n, d))
  y = jax.random.normal(ky, (1, n, d))
  return (x / jnp.linalg.norm(x, axis=-1, keepdims=True),
          y / jnp.linalg.norm(y, axis=-1, keepdims=True))


def evaluate(num_features: int = 128, dim: int = 32, n: int = 64, draws: int = 200,
             seed: int = 0) -> dict[tuple[str, str], dict[str, float]]:
  """``{(component, weight): {rel_mse, rel_mse_se, rel_bias, rel_bias_se}}`` for every pair
  not in ``registry.REFUSED_PAIRS`` (see the module docstring)."""
  x, y = unit_pairs(jax.random.PRNGKey(seed + 1), n, dim)
  exact = kernels.softmax_kernel(x, y)[0]
  keys = jax.random.split(jax.random.PRNGKey(seed), draws)
  results = {}

  est_fns = {}
  for cname in registry.component_names():
    comp = registry.get_component(cname)
    cparams = comp.init_params(jax.random.PRNGKey(seed + 2), dim) if comp.init_params else None

    def one(w, comp=comp, cparams=cparams):
      px, py = comp.features(x, y, w, params=cparams, stabilize=False)
      est = jnp.einsum("nf,lf->nl", px[0], py[0], precision=jax.lax.Precision.HIGHEST)
      rel = (est - exact) / exact
      return jnp.mean(rel ** 2), jnp.mean(rel)

    est_fns[cname] = jax.jit(jax.vmap(one))

  for wname in sorted(registry.WEIGHTS):
    spec = registry.get_weight(wname)
    ws = jax.jit(jax.vmap(lambda k: spec.matrix(*spec.init(k, num_features, dim))))(keys)
    for cname, fn in est_fns.items():
      if (cname, wname) in registry.REFUSED_PAIRS:
        continue
      mse, bias = (np.asarray(a, np.float64) for a in fn(ws))
      results[(cname, wname)] = {
          "rel_mse": float(mse.mean()),
          "rel_mse_se": float(mse.std(ddof=1) / math.sqrt(draws)),
          "rel_bias": float(bias.mean()),
          "rel_bias_se": float(bias.std(ddof=1) / math.sqrt(draws)),
      }
  return results


def markdown(results: dict[tuple[str, str], dict[str, float]], comps: Sequence[str],
             weights: Sequence[str]) -> str:
  """Relative-MSE table: rows = components, columns = weights, "refused" for absent pairs."""
  lines = ["| component \\ weight | " + " | ".join(weights) + " |",
           "|---|" + "---|" * len(weights)]
  for c in comps:
    cells = []
    for w in weights:
      r = results.get((c, w))
      cells.append("refused" if r is None else f"{r['rel_mse']:.3g}")
    lines.append(f"| {c} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="docs/kernel_table.json")
  p.add_argument("--num_features", type=int, default=128)
  p.add_argument("--dim", type=int, default=32)
  p.add_argument("--n", type=int, default=64, help="queries and keys per head")
  p.add_argument("--draws", type=int, default=200, help="independent W draws")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  t0 = time.time()
  res = evaluate(args.num_features, args.dim, args.n, args.draws, args.seed)
  comps = registry.component_names()
  weights = sorted(registry.WEIGHTS)
  table = markdown(res, comps, weights)
  print(f"Relative MSE of the softmax-kernel estimate, m={args.num_features}, d={args.dim}, "
        f"{args.n}x{args.n} unit-norm Gaussian pairs per head, {args.draws} draws "
        f"(stabilize=False; learned weights and GERF at init).\n")
  print(table)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      json.dump({"config": vars(args), "backend": jax.default_backend(),
                 "seconds": time.time() - t0, "markdown": table,
                 "results": [{"component": c, "weight": w, **r} for (c, w), r in res.items()]},
                f, indent=1)


if __name__ == "__main__":
  main()
