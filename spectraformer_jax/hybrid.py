"""Hybrid random features (HRF; Choromanski et al., ICLR 2022) for the softmax kernel.

Two unbiased base estimators of ``exp(x . y)`` are mixed with a data-dependent weight that is
itself estimated by random features:

    K_hat(x, y) = lambda_hat(x, y) K_pos(x, y) + (1 - lambda_hat(x, y)) K_trig(x, y)

* ``K_pos``: PosRF (``exp(w x - |x|^2/2)``), accurate where the kernel is large (small angles);
* ``K_trig``: TrigRF (``exp(|x|^2/2) [cos w x, sin w x]``), accurate where it is small;
* ``lambda(x, y) = 1 - theta_xy / pi`` (the angular kernel), estimated with ``r`` Gaussian
  directions ``xi_t``: ``lambda_hat = 1/2 + (1/2r) sum_t sign(xi_t . x) sign(xi_t . y)``,
  unbiased since ``E[sign(xi . x) sign(xi . y)] = 1 - 2 theta / pi``.

``lambda_hat = a(x) . a(y)`` and ``1 - lambda_hat = a(x) . b(y)`` with
``a(x) = [1, sign(xi x)/sqrt(r)] / sqrt(2)`` and ``b(y) = [1, -sign(xi y)/sqrt(r)] / sqrt(2)``,
so ``K_hat = phi(x) . phi(y)`` with ``phi(x) = [a(x) (x) pos(x), a(x) (x) trig(x)]`` and
``phi(y) = [a(y) (x) pos(y), b(y) (x) trig(y)]`` (Kronecker products).  With ``xi``
independent of the base estimators' frequencies, ``E[K_hat] = (lambda + 1 - lambda)
exp(x . y)``: unbiased (signed features).

The ``m`` rows of ``W`` are split: ``m1 = (m - r) // 2`` PosRF rows, ``m2 = m - r - m1`` TrigRF
rows, then ``r = max(1, m // 16)`` angular rows; ``F = (r + 1) (m1 + 2 m2)`` features.  The
three groups must be independent, so HRF pairs with the ``iid`` weight only (orthogonal blocks,
structured and quasi-random matrices couple rows and bias the mixture measurably).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from spectraformer_jax import components as C


def split(m: int) -> tuple[int, int, int]:
  """``(m1, m2, r)``: PosRF, TrigRF and angular rows of ``m`` (``m >= 3``)."""
  if m < 3:
    raise ValueError(f"HRF needs num_features >= 3 (PosRF, TrigRF and angular rows), got {m}.")
  r = max(1, m // 16)
  m1 = (m - r) // 2
  return m1, m - r - m1, r


def feature_dim(m: int) -> int:
  """``(r + 1) (m1 + 2 m2)`` with ``split(m)``."""
  m1, m2, r = split(m)
  return (r + 1) * (m1 + 2 * m2)


def _parts(x, w):
  """Log-amplitudes and signed parts of one side: ``(l_pos [.., n, m1], l_trig [.., n, 1],
  trig [.., n, 2 m2], sign(xi x) [.., n, r])``."""
  m1, m2, _ = split(w.shape[0])
  p = C._project(x, w)  # pylint: disable=protected-access
  half = 0.5 * C._sq_norm(x)  # pylint: disable=protected-access
  l_pos = p[..., :m1] - half - 0.5 * math.log(m1)
  l_trig = half - 0.5 * math.log(m2)
  trig = jnp.concatenate([jnp.cos(p[..., m1:m1 + m2]), jnp.sin(p[..., m1:m1 + m2])], -1)
  return l_pos, l_trig, trig, jnp.sign(p[..., m1 + m2:])


def _kron(a, f):
  """Row-wise Kronecker product ``[..., n, A] x [..., n, B] -> [..., n, A B]``."""
  return (a[..., :, None] * f[..., None, :]).reshape(f.shape[:-1] + (a.shape[-1] * f.shape[-1],))


def _mixer(signs, sign_of_rest):
  """``[1, sign_of_rest * signs / sqrt(r)] / sqrt(2)``."""
  r = signs.shape[-1]
  ones = jnp.ones(signs.shape[:-1] + (1,), jnp.float32)
  return jnp.concatenate([ones, sign_of_rest * signs / math.sqrt(r)], -1) / math.sqrt(2.0)


def hrf_features(x, y, w, *, x_mask=None, y_mask=None, params=None, stabilize=True):
  """Pair HRF features (registry contract), float32 ``[..., n, F]`` / ``[..., l, F]`` with
  ``F = feature_dim(m)``.  Stabilised with one constant per query row and one per head shared
  by both base estimators (so the mixture keeps its weights)."""
  del x_mask, params
  C._check(x, y, w)  # pylint: disable=protected-access
  lpx, ltx, tx, sx = _parts(x, w)
  lpy, lty, ty, sy = _parts(y, w)
  yb = C._key_mask(y, y_mask)  # pylint: disable=protected-access
  if stabilize:
    cx = C.row_max(jnp.concatenate([lpx, ltx], -1))
    lpx, ltx = lpx - cx, ltx - cx
    cy = C.head_max(jnp.concatenate([lpy, lty], -1), yb)
    lpy, lty = lpy - cy, lty - cy
  ax = _mixer(sx, 1.0)
  phi_x = jnp.concatenate([_kron(ax, jnp.exp(lpx)), _kron(ax, jnp.exp(ltx) * tx)], -1)
  pos_y = C._key_exp(lpy, yb, False)  # pylint: disable=protected-access
  trig_y = C._key_exp(lty, yb, False) * ty  # pylint: disable=protected-access
  phi_y = jnp.concatenate([_kron(_mixer(sy, 1.0), pos_y), _kron(_mixer(sy, -1.0), trig_y)], -1)
  if yb is not None:
    phi_y = jnp.where(yb, phi_y, 0.0)
  return phi_x, phi_y
