"""Data-dependent parameters of the component functions, from query/key statistics.

Every function here is pure, takes queries ``x[..., n, d]`` and keys ``y[..., l, d]`` (the
already ``d**-0.25``-scaled inputs of the components) with optional boolean masks
``x_mask[..., n]`` / ``y_mask[..., l]`` (True = real token), reduces over the length axis -2
and only over unmasked positions, and returns one parameter set per leading index
(batch, head).  Outputs are float32 and wrapped in ``jax.lax.stop_gradient``: the parameters
are treated as constants of the estimator (conditional on them the estimators stay unbiased,
since the random frequencies omega are independent of the data).

Derivation shared by OPRF, SDERF, ADERF and SADERF (Likhosherstov et al., "Chefs' Random
Tables", 2022, and "Dense-Exponential Random Features", 2023), written for the softmax kernel
(the Gaussian->softmax factor exp(|x|^2/2 + |y|^2/2) is deterministic, so it does not change
the optimum).  For one coordinate direction with parameter ``a < 1/8`` put
``rho = 1 / (1 - 8 a)``; the log second moment of the feature product, averaged over all
(query, key) pairs, is (up to parameter-free terms)

    log((1 + rho) / (2 rho)) + log(rho) / 2 + rho * phi  (+ const)          (per direction)

where ``phi`` is the mean over pairs of the squared (rescaled) sum ``(x_i + y_j)`` along that
direction.  Setting the derivative to zero gives ``2 phi rho^2 + (2 phi + 1) rho - 1 = 0``;
for a scalar ``a`` shared by ``d`` directions (OPRF) the same with ``1 -> d`` and
``phi = mean |x_i + y_j|^2``:

    rho* = (sqrt((2 phi + d)^2 + 8 d phi) - 2 phi - d) / (4 phi)
         = 2 d / (sqrt((2 phi + d)^2 + 8 d phi) + 2 phi + d)     (the stable form used here)
    A*   = (1 - 1 / rho*) / 8  <= 0.

ADERF/SADERF also rescale ``x -> Psi x``, ``y -> Psi^-1 y`` (which keeps every ``x . y``);
the term ``psi^2 mean x_k^2 + psi^-2 mean y_k^2`` is minimised by
``psi_k = (sum_j y_jk^2 / sum_i x_ik^2)^(1/4)``.  SDERF instead rotates into the eigenbasis
of ``Phi = mean_(i,j) (x_i + y_j)(x_i + y_j)^T`` (von Neumann's trace inequality makes the
aligned basis optimal) and solves the scalar problem per eigen-direction.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from spectraformer_jax._dtypes import f32 as _f32

_TINY = 1e-12


def _weights(x, mask):
  """Float weights [..., n, 1] (1 for real tokens) and their count [..., 1, 1] (>= 1)."""
  if mask is None:
    w = jnp.ones(x.shape[:-1] + (1,), jnp.float32)
  else:
    w = jnp.broadcast_to(mask, x.shape[:-1]).astype(jnp.float32)[..., None]
  count = jnp.maximum(jnp.sum(w, axis=-2, keepdims=True), 1.0)
  return w, count


def masked_mean(x, mask: Optional[jax.Array] = None):
  """Mean of ``x[..., n, k]`` over axis -2 restricted to ``mask[..., n]``: float32 [..., k]."""
  x = _f32(x)
  w, count = _weights(x, mask)
  return (jnp.sum(x * w, axis=-2) / count[..., 0, :])


def pair_sq_norm_mean(x, y, x_mask=None, y_mask=None):
  """``phi = mean over (i, j) of |x_i + y_j|^2`` in O((n + l) d), float32 [...].

  ``|x_i + y_j|^2 = |x_i|^2 + |y_j|^2 + 2 x_i . y_j``, so the pair mean is
  ``mean|x|^2 + mean|y|^2 + 2 mean(x) . mean(y)``.
  """
  x, y = _f32(x), _f32(y)
  mx2 = masked_mean(jnp.sum(x * x, -1, keepdims=True), x_mask)[..., 0]
  my2 = masked_mean(jnp.sum(y * y, -1, keepdims=True), y_mask)[..., 0]
  cross = jnp.sum(masked_mean(x, x_mask) * masked_mean(y, y_mask), -1)
  return jax.lax.stop_gradient(jnp.maximum(mx2 + my2 + 2.0 * cross, 0.0))


def pair_sq_coord_mean(x, y, x_mask=None, y_mask=None):
  """Per coordinate ``k``: mean over (i, j) of ``(x_ik + y_jk)^2``, float32 [..., d]."""
  x, y = _f32(x), _f32(y)
  mx2 = masked_mean(x * x, x_mask)
  my2 = masked_mean(y * y, y_mask)
  cross = masked_mean(x, x_mask) * masked_mean(y, y_mask)
  return jax.lax.stop_gradient(jnp.maximum(mx2 + my2 + 2.0 * cross, 0.0))


def optimal_rho(phi, d):
  """The variance-minimising ``rho* in (0, 1]`` for pair statistic ``phi >= 0`` and ``d`` dims.

  Stable (rationalised) form of ``(sqrt((2 phi + d)^2 + 8 d phi) - 2 phi - d) / (4 phi)``;
  ``phi -> 0`` gives ``rho* -> 1`` (A* = 0, i.e. PosRF).
  """
  phi = _f32(phi)
  d = jnp.float32(d)
  s = 2.0 * phi + d
  return 2.0 * d / (jnp.sqrt(s * s + 8.0 * d * phi) + s)


def a_from_rho(rho):
  """``A = (1 - 1/rho) / 8`` (``<= 0`` for ``rho <= 1``)."""
  return (1.0 - 1.0 / _f32(rho)) / 8.0


def oprf_a(x, y, x_mask=None, y_mask=None):
  """OPRF's scalar ``A*`` per leading index (float32 [...]), under stop_gradient.

  ``phi = mean_(i,j) |x_i + y_j|^2`` over unmasked pairs, ``rho* = optimal_rho(phi, d)``,
  ``A* = (1 - 1/rho*) / 8``.
  """
  d = x.shape[-1]
  phi = pair_sq_norm_mean(x, y, x_mask, y_mask)
  return jax.lax.stop_gradient(a_from_rho(optimal_rho(phi, d)))


def saderf_psi(x, y, x_mask=None, y_mask=None):
  """SADERF's diagonal rescaling ``Psi`` per leading index: float32 [..., d], stop_gradient.

  ``psi_k = (sum_j y_jk^2 / sum_i x_ik^2)^(1/4)`` over unmasked positions (means are used,
  which only rescales by the constant ``(l / n)^(1/4)`` when lengths differ; the sums of the
  paper and the means give the same minimiser of the pair-averaged objective, whose terms
  are means).  Applied as ``x -> x * psi``, ``y -> y / psi``; ``x . y`` is unchanged.
  Coordinates that are (numerically) zero on either side get ``psi = 1``.
  """
  mx2 = masked_mean(_f32(x) ** 2, x_mask)
  my2 = masked_mean(_f32(y) ** 2, y_mask)
  ok = (mx2 > _TINY) & (my2 > _TINY)
  psi = jnp.where(ok, (jnp.maximum(my2, _TINY) / jnp.maximum(mx2, _TINY)) ** 0.25, 1.0)
  return jax.lax.stop_gradient(psi)


def aderf_params(x, y, x_mask=None, y_mask=None):
  """Diagonal ADERF: ``(psi[..., d], a[..., d])`` per leading index, under stop_gradient.

  ``psi`` as in ``saderf_psi``; then per coordinate ``a_k = (1 - 1/rho_k)/8`` with
  ``rho_k = optimal_rho(phi_k, 1)`` and ``phi_k = mean_(i,j) (psi_k x_ik + y_jk / psi_k)^2``.
  """
  psi = saderf_psi(x, y, x_mask, y_mask)
  xs = _f32(x) * psi[..., None, :]
  ys = _f32(y) / psi[..., None, :]
  phi_k = pair_sq_coord_mean(xs, ys, x_mask, y_mask)
  a = a_from_rho(optimal_rho(phi_k, 1))
  return jax.lax.stop_gradient(psi), jax.lax.stop_gradient(a)


def pair_outer_mean(x, y, x_mask=None, y_mask=None):
  """``Phi = mean_(i,j) (x_i + y_j)(x_i + y_j)^T`` in O((n + l) d^2): float32 [..., d, d]."""
  x, y = _f32(x), _f32(y)
  wx, cx = _weights(x, x_mask)
  wy, cy = _weights(y, y_mask)
  mxx = jnp.einsum("...ni,...nj->...ij", x * wx, x) / cx
  myy = jnp.einsum("...ni,...nj->...ij", y * wy, y) / cy
  mx = masked_mean(x, x_mask)
  my = masked_mean(y, y_mask)
  outer = mx[..., :, None] * my[..., None, :]
  return jax.lax.stop_gradient(mxx + myy + outer + jnp.swapaxes(outer, -1, -2))


def sderf_params(x, y, x_mask=None, y_mask=None):
  """SDERF: ``(Q[..., d, d], a[..., d])`` per leading index, under stop_gradient.

  ``Phi = Q diag(phi_k) Q^T`` (eigh); per eigen-direction ``a_k = (1 - 1/rho_k)/8`` with
  ``rho_k = optimal_rho(phi_k, 1)``.  The features use the symmetric matrices
  ``Q diag(.) Q^T`` built from these (continuous in ``Phi`` whatever the order or signs of
  the eigenvectors).
  """
  phi = pair_outer_mean(x, y, x_mask, y_mask)
  evals, q = jnp.linalg.eigh(phi)
  a = a_from_rho(optimal_rho(jnp.maximum(evals, 0.0), 1))
  return jax.lax.stop_gradient(q), jax.lax.stop_gradient(a)
