"""Discretely-induced random features (Likhosherstov et al., "Chefs' Random Tables", 2022).

``exp(x . y) = prod_l sum_k (x_l y_l)^k / k!``.  For integer frequencies ``omega in Z_+^d`` with
independent coordinates ``omega_l ~ p_l`` (``p_l(k) > 0`` for every k >= 0),

    f(omega, x) = prod_l x_l^omega_l / sqrt(omega_l! p_l(omega_l))

gives ``E[f(omega, x) f(omega, y)] = sum_omega prod_l (x_l y_l)^omega_l / omega_l! = exp(x . y)``:
an unbiased estimator of the softmax kernel, with signed features (``x_l < 0`` and odd
``omega_l``).  With ``m`` frequencies, ``phi(x)_r = f(omega_r, x) / sqrt(m)``.

* **PoisRF**: ``p_l = Poisson(lambda_l)``: ``log|f| = sum_l omega_l (log|x_l| - log(lambda_l)/2)
  + sum_l lambda_l / 2``.  Per coordinate ``E[(f(x) f(y))^2] = exp(lambda_l + (x_l y_l)^2 /
  lambda_l)``; averaged over the (query, key) pairs of a head its log is minimised by
  ``lambda_l = sqrt(mean_i x_il^2 mean_j y_jl^2)`` (``lambda_params``; clipped to [1e-3, 8]).
* **GeomRF**: ``p_l(k) = (1 - q_l) q_l^k`` (geometric): ``log|f| = sum_l [omega_l (log|x_l| -
  log(q_l)/2) - log(omega_l!)/2] - sum_l log(1 - q_l)/2``, with ``q_l`` the same statistic
  clipped to [1e-3, 0.9] (the optimum of the second moment for small ``|x_l y_l|``).

The frequencies come from the weight matrix ``W`` (any of the Gaussian ones) by the quantile
transform ``omega_rl = F_l^-1(Phi(W_rl))`` (``Phi`` the standard normal CDF, ``F_l`` the CDF
of ``p_l``): for rows with ``N(0, I)`` marginals (iid, orf, qmc, ...) the ``omega_r`` have
exactly the law above, so every Gaussian weight matrix carries over (QMC points give
quasi-random integer frequencies, orthogonal rows correlated ones).  The Poisson quantile is
computed on ``POISSON_MAX`` support points (``P(omega >= 32) < 1e-9`` for ``lambda <= 8``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy import special, stats as jstats

from spectraformer_jax import components as C
from spectraformer_jax import stats
from spectraformer_jax._dtypes import f32 as _f32

POISSON_MAX = 32
LAMBDA_RANGE = (1e-3, 8.0)
GEOMETRIC_RANGE = (1e-3, 0.9)
_TINY = 1e-30


def lambda_params(x, y, x_mask=None, y_mask=None):
  """``sqrt(mean_i x_il^2 * mean_j y_jl^2)`` per leading index and coordinate, float32
  ``[..., d]`` under ``stop_gradient`` (unclipped)."""
  mx = stats.masked_mean(_f32(x) ** 2, x_mask)
  my = stats.masked_mean(_f32(y) ** 2, y_mask)
  return jax.lax.stop_gradient(jnp.sqrt(mx * my))


def poisson_frequencies(w, lam):
  """``omega = F^-1(Phi(W))`` for Poisson(``lam``): ``W [m, d]``, ``lam [..., d]`` ->
  float32 ``[..., m, d]`` (non-negative integers, at most ``POISSON_MAX - 1``)."""
  u = jstats.norm.cdf(_f32(w))
  k = jnp.arange(POISSON_MAX, dtype=jnp.float32)
  lam = _f32(lam)[..., None, :, None]  # [..., 1, d, 1]
  log_pmf = k * jnp.log(lam) - lam - special.gammaln(k + 1.0)
  cdf = jnp.cumsum(jnp.exp(log_pmf), axis=-1)  # [..., 1, d, K]
  return jnp.sum(u[..., None] > cdf, axis=-1).astype(jnp.float32)


def geometric_frequencies(w, q):
  """``omega = F^-1(Phi(W))`` for the geometric law ``(1 - q) q^k``: ``floor(log(1 - u) /
  log q)`` with ``log(1 - u) = log Phi(-W)``; float32 ``[..., m, d]``."""
  log_tail = jstats.norm.logcdf(-_f32(w))
  return jnp.floor(log_tail / jnp.log(_f32(q))[..., None, :])


def _signed_log_features(x, omega, col):
  """``(log|f|, sign)`` of ``prod_l x_l^omega_l exp(col)``: ``x [..., n, d]``,
  ``omega [..., m, d]``, ``col [..., m]`` -> two ``[..., n, m]`` arrays."""
  hp = jax.lax.Precision.HIGHEST
  x = _f32(x)
  log_abs = jnp.log(jnp.maximum(jnp.abs(x), _TINY))
  logits = jnp.einsum("...nd,...md->...nm", log_abs, omega, precision=hp) + col[..., None, :]
  odd = jnp.einsum("...nd,...md->...nm", (x < 0).astype(jnp.float32), omega, precision=hp)
  return logits, 1.0 - 2.0 * jnp.mod(odd, 2.0)


def _pair_features(x, y, omega, col, y_mask, stabilize):
  """Pair features from the frequencies and the per-feature log constant ``col``."""
  lx, sx = _signed_log_features(x, omega, col)
  ly, sy = _signed_log_features(y, omega, col)
  yb = C._key_mask(y, y_mask)  # pylint: disable=protected-access
  if stabilize:
    lx = lx - C.row_max(lx)
  phi_y = C._key_exp(ly, yb, stabilize) * sy  # pylint: disable=protected-access
  return jnp.exp(lx) * sx, phi_y


def poisrf_features(x, y, w, *, x_mask=None, y_mask=None, params=None, stabilize=True):
  """Pair PoisRF features (registry contract), float32 ``[..., n, m]`` / ``[..., l, m]``;
  signed, unbiased for ``exp(x . y)`` (module doc)."""
  del params
  C._check(x, y, w)  # pylint: disable=protected-access
  lam = jnp.clip(lambda_params(x, y, x_mask, y_mask), *LAMBDA_RANGE)  # [..., d]
  omega = poisson_frequencies(w, lam)
  col = (0.5 * jnp.sum(lam, -1)[..., None] - 0.5 * math.log(w.shape[0])
         - 0.5 * jnp.einsum("...md,...d->...m", omega, jnp.log(lam)))
  return _pair_features(x, y, omega, col, y_mask, stabilize)


def geomrf_features(x, y, w, *, x_mask=None, y_mask=None, params=None, stabilize=True):
  """Pair GeomRF features (registry contract), float32 ``[..., n, m]`` / ``[..., l, m]``;
  signed, unbiased for ``exp(x . y)`` (module doc)."""
  del params
  C._check(x, y, w)  # pylint: disable=protected-access
  q = jnp.clip(lambda_params(x, y, x_mask, y_mask), *GEOMETRIC_RANGE)  # [..., d]
  omega = geometric_frequencies(w, q)
  col = (-0.5 * jnp.sum(jnp.log1p(-q), -1)[..., None] - 0.5 * math.log(w.shape[0])
         - 0.5 * jnp.einsum("...md,...d->...m", omega, jnp.log(q))
         - 0.5 * jnp.sum(special.gammaln(omega + 1.0), -1))
  return _pair_features(x, y, omega, col, y_mask, stabilize)
