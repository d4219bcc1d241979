"""Exact kernels used as references by tests and benchmarks (O(n l d), float32).

``x[..., n, d]`` and ``y[..., l, d]`` (already scaled by ``d**-0.25`` when used for attention);
outputs are ``[..., n, l]``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from spectraformer_jax._dtypes import f32 as _f32

_HI = jax.lax.Precision.HIGHEST


def log_softmax_kernel(x, y):
  """``log K(x, y) = x . y``: the log of the softmax kernel, [..., n, l]."""
  return jnp.einsum("...nd,...ld->...nl", _f32(x), _f32(y), precision=_HI)


def softmax_kernel(x, y):
  """Softmax kernel ``exp(x . y)``, [..., n, l] (overflows only where the value does)."""
  return jnp.exp(log_softmax_kernel(x, y))


def log_gaussian_kernel(x, y):
  """``log K(x, y) = -|x - y|^2 / 2``, computed as ``x.y - |x|^2/2 - |y|^2/2`` clamped <= 0."""
  x, y = _f32(x), _f32(y)
  nx = 0.5 * jnp.sum(x * x, -1)[..., :, None]
  ny = 0.5 * jnp.sum(y * y, -1)[..., None, :]
  return jnp.minimum(log_softmax_kernel(x, y) - nx - ny, 0.0)


def gaussian_kernel(x, y):
  """Gaussian kernel ``exp(-|x - y|^2 / 2)``, [..., n, l], in (0, 1]."""
  return jnp.exp(log_gaussian_kernel(x, y))


def softmax_attention_weights(x, y, y_mask: Optional[jax.Array] = None):
  """Row-normalised softmax kernel ``exp(x.y) / sum_j exp(x.y_j)`` over unmasked keys, stably
  (``jax.nn.softmax`` subtracts the row max).  Rows with no unmasked key are zero."""
  logits = log_softmax_kernel(x, y)
  if y_mask is None:
    return jax.nn.softmax(logits, axis=-1)
  mask = jnp.broadcast_to(y_mask, y.shape[:-1])[..., None, :]
  w = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
  return jnp.where(mask, jnp.nan_to_num(w), 0.0)
