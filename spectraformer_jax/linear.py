"""Bidirectional linear attention on feature arrays, and the normaliser guard shared with the
causal core.

Layout: ``linear_attention`` works on *feature* arrays ``[..., len, F]`` (any leading batch/head
dims), values ``[..., len, dv]`` and masks ``[..., len]`` broadcastable against the leading dims.

Normaliser guard (TrigRF)
-------------------------
Attention divides ``num_i = phi_q_i^T sum_j phi_k_j v_j^T`` by ``den_i = phi_q_i^T sum_j phi_k_j``.
Positive features (PosRF, OPRF, ...) give ``den_i > 0``; signed features (TrigRF) can make
``den_i`` zero or negative.  We keep the estimator's sign and bound its magnitude from below
*relative to the scale of the terms it sums*:

    mag_i = |phi_q_i|^T sum_j |phi_k_j|          (= den_i for non-negative features)
    den_i <- sign(den_i) * max(|den_i|, eps * mag_i)      (sign(0) = +1)

The floor is invariant to the positive per-row / per-head stabiliser constants of the features,
never touches positive features (``|den_i| = mag_i > eps * mag_i``), keeps outputs finite for
signed features (``|out_i| <= max|v| / eps``), and costs one extra ``[n, F]`` reduction (skipped
with ``guard=False``, which ``rf_attention`` does for components registered as positive).
A query whose every key is masked (``mag_i = 0``) gets a zero output, and so does a row whose
normaliser underflows (``|den_i| < UNDERFLOW``), with a zero gradient; elsewhere the division's
derivative is ``(d num - out d den) / den``, finite wherever the output is.  The stabilisers of
``components`` (bidirectional) and ``causal.causal_log_attention`` keep ``den_i >= 1`` for positive
features, so no real row underflows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_EPS = 1e-6
# A normaliser below this magnitude counts as underflowed: its row is zero with zero gradient.
UNDERFLOW = 1e-30

def check_mask(mask, expected_len: int, name: str, leading: tuple[int, ...]):
  """Validates a boolean mask ``[..., len]``; returns it as bool."""
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.ndim < 1 or mask.shape[-1] != expected_len:
    raise ValueError(f"{name} must have shape [..., {expected_len}] (True = real token), "
                     f"got shape {tuple(mask.shape)}.")
  try:
    jnp.broadcast_shapes(mask.shape[:-1], leading)
  except ValueError:
    raise ValueError(f"{name} of shape {tuple(mask.shape)} does not broadcast against the "
                     f"leading dims {leading} (expected [..., {expected_len}]).") from None
  return mask.astype(bool)


@jax.custom_jvp
def safe_ratio(num, den):
  """``num / den[..., None]``, zero (with zero gradient) where ``|den| < UNDERFLOW``.

  The derivative is taken in the scale-invariant form ``d out = (d num - out d den) / den``
  (one division by ``den``, never ``den^2``), so it is finite wherever the output is; the
  ``where`` on both sides of the division (double-where) keeps the masked rows' gradients 0.
  """
  ok = jnp.abs(den) >= UNDERFLOW
  safe = jnp.where(ok, den, jnp.ones_like(den))
  return jnp.where(ok[..., None], num / safe[..., None], jnp.zeros_like(num))


@safe_ratio.defjvp
def _ratio_jvp(primals, tangents):
  num, den = primals
  dnum, dden = tangents
  out = safe_ratio(num, den)
  ok = jnp.abs(den) >= UNDERFLOW
  safe = jnp.where(ok, den, jnp.ones_like(den))
  dout = (dnum - out * dden[..., None]) / safe[..., None]
  return out, jnp.where(ok[..., None], dout, jnp.zeros_like(dout))


def guarded_divide(num, den, mag, eps):
  """``num / den[..., None]`` with the sign-preserving relative floor of the module doc."""
  if mag is not None:
    floor = eps * mag
    sign = jnp.where(den >= 0, 1.0, -1.0).astype(den.dtype)
    den = jnp.where(jnp.abs(den) >= floor, den, sign * floor)
  return safe_ratio(num, den)


def prepare_linear(phi_q, phi_k, v, mask, q_mask):
  """Shared prologue of the linear attentions: checks shapes and masks, zeroes masked keys.

  Returns ``(phi_q, phi_k, v, q_mask)`` with the feature rows and values of masked keys set to
  zero and ``q_mask`` validated (bool or None).
  """
  phi_q, phi_k, v = jnp.asarray(phi_q), jnp.asarray(phi_k), jnp.asarray(v)
  if phi_q.shape[-1] != phi_k.shape[-1]:
    raise ValueError(f"phi_q and phi_k need the same feature dim, got {phi_q.shape[-1]} and "
                     f"{phi_k.shape[-1]}.")
  if phi_k.shape[-2] != v.shape[-2]:
    raise ValueError(f"phi_k and v need the same length, got {phi_k.shape[-2]} and "
                     f"{v.shape[-2]}.")
  lead = jnp.broadcast_shapes(phi_q.shape[:-2], phi_k.shape[:-2], v.shape[:-2])
  mask = check_mask(mask, phi_k.shape[-2], "mask (key mask)", lead)
  q_mask = check_mask(q_mask, phi_q.shape[-2], "q_mask", lead)
  if mask is not None:
    phi_k = jnp.where(mask[..., None], phi_k, 0)
    v = jnp.where(mask[..., None], v, 0)
  return phi_q, phi_k, v, q_mask


def linear_attention(phi_q, phi_k, v, mask=None, q_mask=None, *, eps: float = DEFAULT_EPS,
                     guard: bool = True, precision=None):
  """Bidirectional linear attention ``phi_q (phi_k^T v) / phi_q (phi_k^T 1)``.

  Args:
    phi_q: query features ``[..., n, F]``.
    phi_k: key features ``[..., l, F]``.
    v: values ``[..., l, dv]``.
    mask: key mask ``bool[..., l]`` (True = real key); masked keys contribute nothing (their
      feature rows and values are zeroed here, whatever the feature map did).
    q_mask: query mask ``bool[..., n]``; masked queries give zeros.
    eps: relative floor of the normaliser (see the module doc); only used when ``guard``.
    guard: apply the sign-preserving relative floor (needed for signed features such as
      TrigRF; a no-op for positive features, which may pass ``False`` to save a reduction).
    precision: ``jax.lax.Precision`` for the contractions.

  Returns:
    ``[..., n, dv]`` in the promoted dtype of the inputs.
  """
  phi_q, phi_k, v, q_mask = prepare_linear(phi_q, phi_k, v, mask, q_mask)
  kv = jnp.einsum("...lf,...ld->...fd", phi_k, v, precision=precision)
  num = jnp.einsum("...nf,...fd->...nd", phi_q, kv, precision=precision)
  den = jnp.einsum("...nf,...f->...n", phi_q, jnp.sum(phi_k, axis=-2), precision=precision)
  mag = None
  if guard:
    mag = jnp.einsum("...nf,...f->...n", jnp.abs(phi_q), jnp.sum(jnp.abs(phi_k), axis=-2),
                     precision=precision)
  out = guarded_divide(num, den, mag, eps)
  if q_mask is not None:
    out = jnp.where(q_mask[..., None], out, 0)
  return out
