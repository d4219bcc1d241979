"""ADERF with full matrices (asymmetric dense-exponential RF, Likhosherstov et al., 2023).

The diagonal ADERF of ``components`` rescales coordinates; this one also rotates and mixes
them, so correlated queries and keys get their own optimal basis.  With
``f1(omega, x) = D exp(omega^T A omega + omega^T B1 x - x^T B1^T (I-4A)^-1 B1 x / 2)``,
``f2`` likewise with ``B2`` and ``B1^T (I - 4A)^-1 B2 = I``, ``E[f1(x) f2(y)] = exp(x . y)``
(``components`` module doc).  The parameters, from the head's statistics
``M1 = mean_i x_i x_i^T``, ``M2 = mean_j y_j y_j^T`` (real tokens, ridge ``1e-3 trace / d``):

1. ``S = P^(1/2)`` with ``P = M1^(-1/2) (M1^(1/2) M2 M1^(1/2))^(1/2) M1^(-1/2)`` (the geometric
   mean of ``M1^-1`` and ``M2``, ``P M1 P = M2``): ``S x`` and ``S^-1 y`` have the same second
   moment ``N = S M1 S``; ``x . y`` is unchanged;
2. ``N = Q diag(nu) Q^T``: in the coordinates ``Q^T S x``, ``Q^T S^-1 y`` both second moments
   are diagonal, and the diagonal ADERF's per-coordinate optimum (``stats.aderf_params``:
   rescaling ``psi_k``, ``a_k``) applies;
3. written basis-free (no dependence on eigenvector signs or order):
   ``A = Q diag(a) Q^T``, ``B1 = Q diag(b psi) Q^T S``, ``B2 = Q diag(b / psi) Q^T S^-1`` with
   ``b = sqrt(1 - 4a)``; then ``B1^T (I-4A)^-1 B2 = S Q diag(psi) diag(1/psi) Q^T S^-1 = I``.

Log-linear (fused path): ``log f(omega_r, x) = omega_r . x~ + col_r + row(x)`` with
``x~ = B1 x``, ``col_r = sum_k a_k ((Q^T omega_r)_k)^2 + sum_k log(1 - 4a_k)/4 - log(m)/2`` and
``row(x) = -|diag(psi) Q^T S x|^2 / 2`` (keys: ``B2``, ``1/psi``, ``S^-1``).  Positive; unbiased
given the statistics.  Costs ``O(d^3)`` per head for the two eigendecompositions.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from spectraformer_jax import components as C
from spectraformer_jax import stats
from spectraformer_jax._dtypes import f32 as _f32

RIDGE = 1e-3  # relative: M + RIDGE * trace(M)/d * I keeps float32 round-off small
_FLOOR = 1e-12


def _second_moment(x, mask):
  """``mean_i x_i x_i^T`` over real rows ``+ RIDGE trace / d I`` (few or degenerate rows make
  it singular; any ridge keeps the estimator unbiased): float32 ``[..., d, d]``."""
  x = _f32(x)
  w = jnp.ones(x.shape[:-1], jnp.float32) if mask is None else jnp.broadcast_to(
      mask, x.shape[:-1]).astype(jnp.float32)
  count = jnp.maximum(w.sum(-1), 1.0)[..., None, None]
  m = jnp.einsum("...ni,...nj->...ij", x * w[..., None], x,
                 precision=jax.lax.Precision.HIGHEST) / count
  d = x.shape[-1]
  ridge = RIDGE * jnp.trace(m, axis1=-2, axis2=-1)[..., None, None] / d + _FLOOR
  return m + ridge * jnp.eye(d, dtype=jnp.float32)


def _sym_power(m, power: float):
  """``m^power`` of a symmetric positive-definite ``m [..., d, d]`` by ``eigh``."""
  evals, vecs = jnp.linalg.eigh(m)
  evals = jnp.maximum(evals, _FLOOR) ** power
  return jnp.einsum("...ik,...k,...jk->...ij", vecs, evals, vecs,
                    precision=jax.lax.Precision.HIGHEST)


def full_aderf_params(x, y, x_mask=None, y_mask=None):
  """``(S, S^-1, Q)`` (each ``[..., d, d]``), ``psi [..., d]`` and ``a [..., d]`` per leading
  index (module doc), under ``stop_gradient``."""
  hp = jax.lax.Precision.HIGHEST
  m1, m2 = _second_moment(x, x_mask), _second_moment(y, y_mask)
  r1, r1_inv = _sym_power(m1, 0.5), _sym_power(m1, -0.5)
  inner = _sym_power(jnp.einsum("...ij,...jk,...kl->...il", r1, m2, r1, precision=hp), 0.5)
  p = jnp.einsum("...ij,...jk,...kl->...il", r1_inv, inner, r1_inv, precision=hp)
  s = _sym_power(0.5 * (p + jnp.swapaxes(p, -1, -2)), 0.5)
  n = jnp.einsum("...ij,...jk,...kl->...il", s, m1, s, precision=hp)
  _, q = jnp.linalg.eigh(0.5 * (n + jnp.swapaxes(n, -1, -2)))
  s_inv = jnp.linalg.inv(s)
  xq = jnp.einsum("...nd,...ed,...ek->...nk", _f32(x), s, q, precision=hp)
  yq = jnp.einsum("...nd,...ed,...ek->...nk", _f32(y), s_inv, q, precision=hp)
  psi, a = stats.aderf_params(xq, yq, x_mask, y_mask)
  return tuple(jax.lax.stop_gradient(t) for t in (s, s_inv, q, psi, a))


def _side(x, s, q, scale, b):
  """``(x~ = Q diag(b scale) Q^T s x, row = -|diag(scale) Q^T s x|^2 / 2)`` of one side."""
  hp = jax.lax.Precision.HIGHEST
  coords = jnp.einsum("...nd,...ed,...ek->...nk", _f32(x), s, q, precision=hp) * scale[
      ..., None, :]
  xt = jnp.einsum("...nk,...dk->...nd", coords * b[..., None, :], q, precision=hp)
  return xt, -0.5 * jnp.sum(coords * coords, -1)


def aderf_full_log_linear(x, y, w, *, x_mask=None, y_mask=None, params=None,
                          causal=False) -> C.LogLinear:
  """Full ADERF's log-features of both sides as a ``components.LogLinear`` (module doc); PosRF's
  (``S = Q = I``, ``psi = 1``, ``a = 0``: neutral statistics) when ``causal``."""
  del params
  if causal:
    return C.posrf_log_linear(x, y, w, causal=True)
  s, s_inv, q, psi, a = full_aderf_params(x, y, x_mask, y_mask)
  b = jnp.sqrt(1.0 - 4.0 * a)
  xq, row_q = _side(x, s, q, psi, b)
  xk, row_k = _side(y, s_inv, q, 1.0 / psi, b)
  wq = jnp.einsum("md,...dk->...mk", _f32(w), q, precision=jax.lax.Precision.HIGHEST)
  col = (jnp.einsum("...mk,...k->...m", wq * wq, a)
         + 0.25 * jnp.sum(jnp.log1p(-4.0 * a), -1)[..., None] - 0.5 * math.log(w.shape[0]))
  return C.LogLinear(xq, xk, col, row_q, row_k)


def aderf_full_features(x, y, w, *, x_mask=None, y_mask=None, params=None, stabilize=True,
                        causal=False):
  """Pair full-ADERF features (registry contract), float32 ``[..., n, m]`` / ``[..., l, m]``;
  positive, unbiased given the statistics."""
  return C._positive_features(  # pylint: disable=protected-access
      aderf_full_log_linear, x, y, w, x_mask, y_mask, params, stabilize, causal)
