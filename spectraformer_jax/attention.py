"""Linear (random-feature) attention, the exact softmax references, and the Flax ``attention_fn``.

Layouts
-------
* ``linear_attention`` / ``causal_linear_attention`` work on *feature* arrays laid out
  ``[..., len, F]`` (any leading batch/head dims), values ``[..., len, dv]`` and masks
  ``[..., len]`` broadcastable against the leading dims; ``causal_log_attention`` takes
  log-features in the same layout and stabilises them prefix by prefix (the RF core's causal
  path: a stabiliser over all keys would let a future key underflow earlier rows).
* ``softmax_attention``, ``flash_attention``, ``rf_attention`` and the function returned by
  ``make_attention_fn`` use Flax's layout: ``[batch..., len, heads, head_dim]`` with masks
  ``[batch..., len]`` (True = real token).

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
``components`` (bidirectional) and ``causal_log_attention`` keep ``den_i >= 1`` for positive
features, so no real row underflows.

Dropout
-------
There is no attention matrix to drop entries from.  ``dropout_rate`` drops whole *keys*: key
``j`` of a head is kept with probability ``1 - p`` and its value scaled by ``1 / (1 - p)`` in the
numerator only (the normaliser keeps every key).  This equals Flax's attention-weight dropout
with the dropout mask shared along the query axis: ``out_i = sum_j a_ij (m_j / (1 - p)) v_j``,
unbiased like the stock one.  ``broadcast_dropout=True`` shares the mask over the batch dims, as
in Flax.  The layers apply the same rule for ``attention='softmax'`` and ``'flash'`` so all
three modes regularise alike.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from spectraformer_jax import components
from spectraformer_jax import fused as fused_lib
from spectraformer_jax import pallas_attention
from spectraformer_jax._dtypes import f32 as _f32

Array = jax.Array

DEFAULT_CHUNK_SIZE = 128
DEFAULT_EPS = 1e-6
# A normaliser below this magnitude counts as underflowed: its row is zero with zero gradient.
UNDERFLOW = 1e-30
# Finite stand-in for -inf in the causal log-space stabilisers (exp gives exactly 0, no NaN).
_NEG = -1e30


# ----------------------------------------------------------------------------- helpers


def _check_mask(mask, expected_len: int, name: str, leading: tuple[int, ...]):
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
def _ratio(num, den):
  """``num / den[..., None]``, zero (with zero gradient) where ``|den| < UNDERFLOW``.

  The derivative is taken in the scale-invariant form ``d out = (d num - out d den) / den``
  (one division by ``den``, never ``den^2``), so it is finite wherever the output is; the
  ``where`` on both sides of the division (double-where) keeps the masked rows' gradients 0.
  """
  ok = jnp.abs(den) >= UNDERFLOW
  safe = jnp.where(ok, den, jnp.ones_like(den))
  return jnp.where(ok[..., None], num / safe[..., None], jnp.zeros_like(num))


@_ratio.defjvp
def _ratio_jvp(primals, tangents):
  num, den = primals
  dnum, dden = tangents
  out = _ratio(num, den)
  ok = jnp.abs(den) >= UNDERFLOW
  safe = jnp.where(ok, den, jnp.ones_like(den))
  dout = (dnum - out * dden[..., None]) / safe[..., None]
  return out, jnp.where(ok[..., None], dout, jnp.zeros_like(dout))


def _guarded_divide(num, den, mag, eps):
  """``num / den[..., None]`` with the sign-preserving relative floor of the module doc."""
  if mag is not None:
    floor = eps * mag
    sign = jnp.where(den >= 0, 1.0, -1.0).astype(den.dtype)
    den = jnp.where(jnp.abs(den) >= floor, den, sign * floor)
  return _ratio(num, den)


def _prepare_linear(phi_q, phi_k, v, mask, q_mask):
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
  mask = _check_mask(mask, phi_k.shape[-2], "mask (key mask)", lead)
  q_mask = _check_mask(q_mask, phi_q.shape[-2], "q_mask", lead)
  if mask is not None:
    phi_k = jnp.where(mask[..., None], phi_k, 0)
    v = jnp.where(mask[..., None], v, 0)
  return phi_q, phi_k, v, q_mask


# ----------------------------------------------------------------------------- bidirectional


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
  phi_q, phi_k, v, q_mask = _prepare_linear(phi_q, phi_k, v, mask, q_mask)
  kv = jnp.einsum("...lf,...ld->...fd", phi_k, v, precision=precision)
  num = jnp.einsum("...nf,...fd->...nd", phi_q, kv, precision=precision)
  den = jnp.einsum("...nf,...f->...n", phi_q, jnp.sum(phi_k, axis=-2), precision=precision)
  mag = None
  if guard:
    mag = jnp.einsum("...nf,...f->...n", jnp.abs(phi_q), jnp.sum(jnp.abs(phi_k), axis=-2),
                     precision=precision)
  out = _guarded_divide(num, den, mag, eps)
  if q_mask is not None:
    out = jnp.where(q_mask[..., None], out, 0)
  return out


# ----------------------------------------------------------------------------- causal


def _causal_chunks(q, k, v, precision):
  """``out_i = sum_{j <= i} (q_i . k_j) v_j`` on chunked inputs by a scan over chunks.

  q, k: ``[B, nc, C, F]``; v: ``[B, nc, C, D]``.  Extra memory: the running state ``[B, F, D]``
  plus one chunk's ``[B, C, C]`` scores.  Returns ``[B, nc, C, D]``.
  """
  c = q.shape[-2]
  tri = jnp.tril(jnp.ones((c, c), q.dtype))

  def body(state, xs):
    qc, kc, vc = xs
    scores = jnp.einsum("bif,bjf->bij", qc, kc, precision=precision) * tri
    out = (jnp.einsum("bij,bjd->bid", scores, vc, precision=precision)
           + jnp.einsum("bif,bfd->bid", qc, state, precision=precision))
    state = state + jnp.einsum("bjf,bjd->bfd", kc, vc, precision=precision)
    return state, out

  state0 = jnp.zeros((q.shape[0], q.shape[-1], v.shape[-1]), jnp.result_type(q, k, v))
  xs = tuple(jnp.moveaxis(t, 1, 0) for t in (q, k, v))
  _, out = jax.lax.scan(body, state0, xs)
  return jnp.moveaxis(out, 0, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _causal_product(q, k, v, precision):
  return _causal_chunks(q, k, v, precision)


def _causal_product_fwd(q, k, v, precision):
  return _causal_chunks(q, k, v, precision), (q, k, v)


def _flip(t):
  """Reverses the sequence (chunk and within-chunk axes)."""
  return jnp.flip(t, axis=(1, 2))


def _causal_product_bwd(precision, res, g):
  # out_i = sum_{j<=i} (q_i.k_j) v_j. The three cotangents are themselves (anti-)causal products,
  # so the backward pass is three more chunked scans and never stores per-position states:
  #   dq_i = sum_{j<=i} (g_i.v_j) k_j;  dk_j = sum_{i>=j} (v_j.g_i) q_i;  dv_j = sum_{i>=j} (k_j.q_i) g_i.
  q, k, v = res
  g = g.astype(v.dtype)
  dq = _causal_product(g, v, k, precision)
  dk = _flip(_causal_product(_flip(v), _flip(g), _flip(q), precision))
  dv = _flip(_causal_product(_flip(k), _flip(q), _flip(g), precision))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_causal_product.defvjp(_causal_product_fwd, _causal_product_bwd)


def causal_prefix_product(q, k, v, chunk_size: int = DEFAULT_CHUNK_SIZE, precision=None):
  """``out_i = sum_{j <= i} (q_i . k_j) v_j`` for ``q, k [..., n, F]``, ``v [..., n, D]``.

  Chunked prefix sums: O(n F D) time, O(chunk F D + chunk^2) extra memory (forward and
  backward; the backward is a ``custom_vjp`` of three more chunked scans).  The running state
  and the products are float32 whatever the input dtype; the result has the inputs' dtype.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
  lead = jnp.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
  n = q.shape[-2]
  if k.shape[-2] != n or v.shape[-2] != n:
    raise ValueError(f"causal attention needs equal query and key lengths, got {n}, "
                     f"{k.shape[-2]}, {v.shape[-2]}.")
  dtype = jnp.result_type(q, k, v)
  q, k, v = (jnp.broadcast_to(t, lead + t.shape[-2:]).astype(jnp.float32) for t in (q, k, v))
  c = min(chunk_size, max(n, 1))
  nc = -(-n // c)
  pad = nc * c - n
  bsz = int(np.prod(lead)) if lead else 1

  def prep(t):
    t = t.reshape((bsz, n, t.shape[-1]))
    if pad:
      t = jnp.pad(t, ((0, 0), (0, pad), (0, 0)))
    return t.reshape((bsz, nc, c, t.shape[-1]))

  out = _causal_product(prep(q), prep(k), prep(v), precision)
  out = out.reshape((bsz, nc * c, v.shape[-1]))[:, :n]
  return out.reshape(lead + (n, v.shape[-1])).astype(dtype)


def causal_linear_attention(phi_q, phi_k, v, chunk_size: int = DEFAULT_CHUNK_SIZE, mask=None,
                            q_mask=None, *, eps: float = DEFAULT_EPS, guard: bool = True,
                            precision=None):
  """Causal linear attention: query i attends keys j <= i (``n == l``).

  Equals the masked quadratic reference
  ``A = tril(phi_q phi_k^T) * mask; out = A v / A 1`` (with the normaliser guard of
  ``linear_attention``) but never builds ``[n, n]`` or per-position ``[n, F, dv]`` states:
  prefix sums run over chunks of ``chunk_size`` positions (O(n F dv) time, O(chunk F dv)
  extra memory); the result does not depend on ``chunk_size`` (up to float rounding).
  State, normaliser and division are float32 whatever the input dtype; the result has the
  inputs' promoted dtype.  Arguments as in ``linear_attention``.
  """
  phi_q, phi_k, v, q_mask = _prepare_linear(phi_q, phi_k, v, mask, q_mask)
  dtype = jnp.result_type(phi_q, phi_k, v)
  phi_q, phi_k, v = _f32(phi_q), _f32(phi_k), _f32(v)
  ones = jnp.ones(v.shape[:-1] + (1,), v.dtype)
  # One pass gives numerator and normaliser: append a column of ones to v.
  both = causal_prefix_product(phi_q, phi_k, jnp.concatenate([v, ones], -1), chunk_size,
                               precision)
  num, den = both[..., :-1], both[..., -1]
  mag = None
  if guard:
    k_ones = jnp.ones(phi_k.shape[:-1] + (1,), phi_k.dtype)
    mag = causal_prefix_product(jnp.abs(phi_q), jnp.abs(phi_k), k_ones, chunk_size,
                                precision)[..., 0]
  out = _guarded_divide(num, den, mag, eps)
  if q_mask is not None:
    out = jnp.where(q_mask[..., None], out, 0)
  return out.astype(dtype)


def causal_linear_attention_reference(phi_q, phi_k, v, mask=None, q_mask=None, *,
                                      eps: float = DEFAULT_EPS, guard: bool = True,
                                      precision=None):
  """O(n^2) masked quadratic reference of ``causal_linear_attention`` (for tests)."""
  n, l = phi_q.shape[-2], phi_k.shape[-2]
  scores = jnp.einsum("...nf,...lf->...nl", phi_q, phi_k, precision=precision)
  allowed = jnp.tril(jnp.ones((n, l), bool))
  if mask is not None:
    allowed = allowed & jnp.asarray(mask, bool)[..., None, :]
  scores = jnp.where(allowed, scores, 0)
  num = jnp.einsum("...nl,...ld->...nd", scores, v, precision=precision)
  den = scores.sum(-1)
  mag = None
  if guard:
    mag = jnp.where(allowed, jnp.einsum("...nf,...lf->...nl", jnp.abs(phi_q), jnp.abs(phi_k),
                                        precision=precision), 0).sum(-1)
  out = _guarded_divide(num, den, mag, eps)
  if q_mask is not None:
    out = jnp.where(jnp.asarray(q_mask, bool)[..., None], out, 0)
  return out


def _chunk_shifts(lq, lk, km, m, sq, sk, precision):
  """Stabilisers of one chunk (module doc of ``causal_log_attention``), all stop_gradient.

  lq, lk ``[B, C, F]`` (``lk`` already ``_NEG`` at masked keys), km ``bool[B, C]``, m ``[B, F]``
  (running column max of earlier chunks).  Returns ``(a [B, C, 1], b [B, C], g, ok, t)``:
  ``g = qn kn^T [B, C, C]`` with ``qn = sq exp(lq - a)``, ``kn = sk exp(lk - b)`` (0 at masked
  keys), ``ok [B, C, C]`` the intra-chunk terms to keep (causal, unmasked; for positive
  features also ``g > UNDERFLOW``, which keeps ``exp(a + b - t) <= 1 / UNDERFLOW``) and the
  per-query total shift ``t [B, C]``.
  """
  sg = jax.lax.stop_gradient
  a = sg(jnp.max(lq, -1, keepdims=True))
  b = sg(jnp.max(lk, -1))
  qn = jnp.exp(lq - a)
  kn = jnp.where(km[..., None], jnp.exp(lk - b[..., None]), 0.0)
  if sq is not None:
    qn, kn = qn * sq, kn * sk
  g = jnp.einsum("bif,bjf->bij", qn, kn, precision=precision)
  c = g.shape[-1]
  ok = jnp.tril(jnp.ones((c, c), bool)) & km[:, None, :]
  inter = jnp.max(lq + m[:, None, :], -1)
  if sq is None:  # positive: the largest intra-chunk term itself, a + b + log g
    ok = ok & (sg(g) > UNDERFLOW)
    lg = jnp.where(ok, a + b[:, None, :] + jnp.log(jnp.where(ok, sg(g), 1.0)), _NEG)
    intra = jnp.max(lg, -1)
  else:  # signed: the bound a_i + max_{j <= i} b_j of every intra-chunk term
    intra = a[..., 0] + jax.lax.cummax(b, axis=1)
  return a, b, g, ok, sg(jnp.maximum(inter, intra))


def _causal_log_chunks(lq, lk, km, v, sq, sk, precision):
  """``out_i exp(-t_i)`` with ``out_i = sum_{j <= i} phi_q_i . phi_k_j v_j`` on chunked inputs.

  lq, lk, sq, sk ``[B, nc, C, F]`` (sq, sk may be None: positive features), km ``bool[B, nc, C]``,
  v ``[B, nc, C, D]``; float32.  A scan over chunks carries ``S [B, F, D]`` and the running
  column max ``m [B, F]`` (``_NEG`` before the first unmasked key).  Returns ``[B, nc, C, D]``.
  """
  def body(carry, xs):
    s_state, m = carry
    lqc, lkc, kmc, vc, sqc, skc = xs
    lkc = jnp.where(kmc[..., None], lkc, _NEG)
    a, b, g, ok, t = _chunk_shifts(lqc, lkc, kmc, m, sqc, skc, precision)
    w = jnp.exp(jnp.where(ok, a + b[:, None, :] - t[..., None], _NEG))
    seen = (m > 0.5 * _NEG)[:, None, :]  # columns with an unmasked key in earlier chunks
    qi = jnp.exp(jnp.where(seen, lqc + m[:, None, :] - t[..., None], _NEG))
    if sqc is not None:
      qi = qi * sqc
    out = (jnp.einsum("bij,bjd->bid", w * g, vc, precision=precision)
           + jnp.einsum("bif,bfd->bid", qi, s_state, precision=precision))
    m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(lkc, -2)))
    kf = jnp.where(kmc[..., None], jnp.exp(lkc - m_new[:, None, :]), 0.0)
    if skc is not None:
      kf = kf * skc
    s_state = (jnp.exp(m - m_new)[..., None] * s_state
               + jnp.einsum("bjf,bjd->bfd", kf, vc, precision=precision))
    return (s_state, m_new), out

  bsz, f, d = lq.shape[0], lq.shape[-1], v.shape[-1]
  carry = (jnp.zeros((bsz, f, d), jnp.float32), jnp.full((bsz, f), _NEG, jnp.float32))
  xs = tuple(None if t is None else jnp.moveaxis(t, 1, 0) for t in (lq, lk, km, v, sq, sk))
  _, out = jax.lax.scan(body, carry, xs)
  return jnp.moveaxis(out, 0, 1)


def causal_log_attention(lq, lk, v, sq=None, sk=None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                         mask=None, q_mask=None, *, eps: float = DEFAULT_EPS,
                         guard: bool = False, precision=None):
  """Causal linear attention from log-features, stabilised prefix by prefix (``n == l``).

  Features ``phi_q = sq * exp(lq)``, ``phi_k = sk * exp(lk)`` (``sq = sk = None``: positive
  features ``exp(lq)``, ``exp(lk)``); ``lq [..., n, 1|F]``, ``lk [..., n, 1|F]`` float32
  log-magnitudes, ``sq, sk [..., n, F]`` bounded signed factors; ``v [..., n, dv]``; masks as
  in ``causal_linear_attention``.  Returns float32 ``[..., n, dv]``:
  ``sum_{j <= i} (phi_q_i . phi_k_j) v_j / sum_{j <= i} phi_q_i . phi_k_j`` over unmasked keys.

  Stabilisation (exact; every shift under ``stop_gradient`` and causal: it uses keys
  ``j <= i`` only).  A scan over chunks of ``C`` positions carries, per feature column ``r``,
  ``S_r = sum_j exp(lk_jr - m_r) sk_jr [v_j, 1]`` over earlier chunks with the running column
  max ``m_r = max_j lk_jr`` (rescaled by ``exp(m_old - m_new)`` when it grows, as flash
  attention does).  Within a chunk, per query ``a_i = max_r lq_ir`` and per key
  ``b_j = max_r lk_jr``, ``Qn = sq exp(lq - a)``, ``Kn = sk exp(lk - b)``, ``G = Qn Kn^T``
  (``[C, C]``).  One total shift ``T_i`` per query scales both parts:

      out_i exp(-T_i) = sum_r exp(lq_ir + m_r - T_i) sq_ir S_r
                        + sum_{j <= i, same chunk} exp(a_i + b_j - T_i) G_ij [v_j, 1],

  ``T_i = max(max_r (lq_ir + m_r), L_i)`` with, for positive features, ``L_i`` the largest
  intra-chunk log-term ``max_{j <= i} (a_i + b_j + log G_ij)``, so the largest term of the row
  is exactly 1 and ``den_i >= 1``; for signed features ``L_i = a_i + max_{j <= i} b_j``, a bound
  of every intra-chunk term.  All of it is ``[C, F]`` or ``[C, C]`` per chunk, float32.
  Gradients by automatic differentiation of the scan (per-chunk states are saved).
  """
  lq, lk, v = _f32(lq), _f32(lk), _f32(v)
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
  if (sq is None) != (sk is None):
    raise ValueError("sq and sk must both be given (signed features) or both be None.")
  n = lq.shape[-2]
  if lk.shape[-2] != n or v.shape[-2] != n:
    raise ValueError(f"causal attention needs equal query and key lengths, got {n}, "
                     f"{lk.shape[-2]}, {v.shape[-2]}.")
  f = max(lq.shape[-1], lk.shape[-1], 1 if sq is None else sq.shape[-1])
  lead = jnp.broadcast_shapes(lq.shape[:-2], lk.shape[:-2], v.shape[:-2],
                              *(() if sq is None else (sq.shape[:-2], sk.shape[:-2])))
  mask = _check_mask(mask, n, "mask (key mask)", lead)
  q_mask = _check_mask(q_mask, n, "q_mask", lead)
  km = jnp.ones((n,), bool) if mask is None else mask
  c = min(chunk_size, max(n, 1))
  nc = -(-n // c)
  pad = nc * c - n
  bsz = math.prod(lead)

  def prep(t, tail, fill=0.0):
    t = jnp.broadcast_to(t, lead + (n,) + tail).reshape((bsz, n) + tail)
    if pad:
      t = jnp.pad(t, ((0, 0), (0, pad)) + ((0, 0),) * len(tail), constant_values=fill)
    return t.reshape((bsz, nc, c) + tail)

  lqc, lkc, kmc = prep(lq, (f,)), prep(lk, (f,)), prep(km, (), False)
  sqc = skc = None
  if sq is not None:
    sqc, skc = prep(_f32(sq), (f,)), prep(_f32(sk), (f,))
  vz = jnp.where(km[..., None], v, 0.0)
  vc = prep(fused_lib.with_ones(vz), (v.shape[-1] + 1,))
  both = _causal_log_chunks(lqc, lkc, kmc, vc, sqc, skc, precision)
  both = both.reshape((bsz, nc * c, -1))[:, :n].reshape(lead + (n, -1))
  num, den = both[..., :-1], both[..., -1]
  mag = None
  if guard:
    if sq is None:
      raise ValueError("guard=True needs signed features (sq, sk); positive ones need none.")
    ones = prep(jnp.ones(v.shape[:-1] + (1,), jnp.float32), (1,))
    mag = _causal_log_chunks(lqc, lkc, kmc, ones, jnp.abs(sqc), jnp.abs(skc), precision)
    mag = mag.reshape((bsz, nc * c))[:, :n].reshape(lead + (n,))
  out = _guarded_divide(num, den, mag, eps)
  if q_mask is not None:
    out = jnp.where(q_mask[..., None], out, 0.0)
  return out


# ----------------------------------------------------------------------------- exact softmax


def _check_qkv(q, k, v):
  if q.ndim < 3 or k.ndim != q.ndim or v.ndim != q.ndim:
    raise ValueError("q, k, v must be [batch..., len, heads, head_dim] with equal ranks, got "
                     f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}.")
  if q.shape[-1] != k.shape[-1]:
    raise ValueError(f"q and k need the same head_dim, got {q.shape[-1]} and {k.shape[-1]}.")
  if k.shape[-3] != v.shape[-3] or k.shape[-2] != v.shape[-2]:
    raise ValueError(f"k and v need the same length and heads, got {tuple(k.shape)} and "
                     f"{tuple(v.shape)}.")
  if q.shape[-2] != k.shape[-2]:
    raise ValueError(f"q and k need the same number of heads, got {q.shape[-2]} and "
                     f"{k.shape[-2]}.")


def broadcast_mask(mask, batch: tuple[int, ...], length: int, name: str):
  """A padding mask ``bool[batch..., length]`` (True = real token) from one given as any shape
  that broadcasts to it (``[length]``, ``[1, length]``, ``[batch..., length]``); None stays None.

  Raises a ValueError naming the expected shape when ``mask`` does not broadcast to it.
  """
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  full = tuple(batch) + (length,)
  fits = 1 <= mask.ndim <= len(full) and mask.shape[-1] == length
  if fits:
    try:
      fits = jnp.broadcast_shapes(mask.shape, full) == full
    except ValueError:
      fits = False
  if not fits:
    raise ValueError(f"{name} must have shape {full} (True = real token) or broadcast to it, "
                     f"e.g. ({length},) or (1, {length}); got {tuple(mask.shape)}.")
  return jnp.broadcast_to(mask.astype(bool), full)


def _flax_masks(q, k, kv_mask, q_mask):
  """Validates the padding masks of Flax-layout q/k and broadcasts them to ``kv_mask
  bool[batch..., kv_len]`` and ``q_mask bool[batch..., q_len]`` (``broadcast_mask``)."""
  batch = tuple(q.shape[:-3])
  return (broadcast_mask(kv_mask, batch, k.shape[-3], "kv_mask"),
          broadcast_mask(q_mask, batch, q.shape[-3], "q_mask"))


def masked_softmax_attention(q, k, v, allowed, *, precision=None):
  """Softmax attention restricted to ``allowed`` (bool, broadcastable to
  ``[batch..., heads, q_len, kv_len]``), Flax layout q/k/v; float32 ``[batch..., q_len, heads,
  v_dim]``.  ``softmax(q.k / sqrt(head_dim))`` over the allowed keys, max-stabilised; a query with
  no allowed key gives zeros."""
  logits = jnp.einsum("...qhd,...khd->...hqk", _f32(q), _f32(k), precision=precision)
  logits = jnp.where(allowed, logits / math.sqrt(q.shape[-1]), -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  w = jnp.where(allowed, jnp.exp(logits - jax.lax.stop_gradient(row_max)), 0.0)
  s = w.sum(-1, keepdims=True)
  w = w / jnp.where(s > 0, s, 1.0)
  return jnp.einsum("...hqk,...khd->...qhd", w, _f32(v), precision=precision)


def softmax_attention(q, k, v, kv_mask=None, q_mask=None, is_causal: bool = False, *,
                      precision=None):
  """Exact softmax attention (reference), Flax layout ``[batch..., len, heads, head_dim]``.

  Logits ``q.k / sqrt(head_dim)`` and softmax in float32; masked keys get zero weight,
  masked queries (and queries with no allowed key) give zeros.  Output in ``q``'s dtype.
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  _check_qkv(q, k, v)
  kv_mask, q_mask = _flax_masks(q, k, kv_mask, q_mask)
  n, l = q.shape[-3], k.shape[-3]
  allowed = jnp.ones((n, l), bool)
  if is_causal:
    if n != l:
      raise ValueError(f"is_causal needs q_len == kv_len, got {n} and {l}.")
    allowed = jnp.tril(allowed)
  if kv_mask is not None:
    allowed = allowed & kv_mask[..., None, None, :]
  out = masked_softmax_attention(q, k, v, allowed, precision=precision)
  if q_mask is not None:
    out = jnp.where(q_mask[..., :, None, None], out, 0)
  return out.astype(q.dtype)


def _cudnn_allowed(q, implementation):
  if implementation is not None and implementation != "auto":
    return implementation == "cudnn"
  if jax.default_backend() != "gpu" or q.dtype not in (jnp.bfloat16, jnp.float16):
    return False
  try:  # head_dim <= 256 on Hopper (compute capability 9.0) and newer, <= 128 before
    hopper = float(getattr(jax.devices()[0], "compute_capability", "0")) >= 9.0
  except (TypeError, ValueError):
    hopper = False
  d = q.shape[-1]
  return d % 8 == 0 and d <= (256 if hopper else 128)


def _prefix_lengths(mask, kv_mask_is_prefix):
  """Lengths ``int32[batch]`` if ``mask`` is known to be a prefix mask, else None."""
  if mask is None or mask.ndim != 2:
    return None
  if kv_mask_is_prefix is None:
    try:
      m = np.asarray(mask)  # concrete only
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
      return None
    lengths = m.sum(-1)
    if not (m == (np.arange(m.shape[-1]) < lengths[:, None])).all():
      return None
    return jnp.asarray(lengths, jnp.int32)
  if kv_mask_is_prefix:
    return jnp.sum(mask, axis=-1).astype(jnp.int32)
  return None


def flash_attention(q, k, v, kv_mask=None, q_mask=None, is_causal: bool = False, *,
                    implementation: Optional[str] = "auto",
                    kv_mask_is_prefix: Optional[bool] = None, precision=None):
  """Exact softmax attention through ``jax.nn.dot_product_attention`` (same contract as
  ``softmax_attention``).

  * ``implementation='auto'``: cuDNN flash attention on GPU for bf16/fp16 inputs with
    ``head_dim % 8 == 0`` (<= 256 on Hopper, <= 128 before); XLA otherwise, and also when cuDNN
    refuses the shapes.  ``None``/``'xla'``/``'cudnn'`` force a backend.
  * Padding: a key mask known to be a *prefix* mask (True then False per row, as LRA's
    end-padding) goes in as ``key_value_seq_lengths`` (no dense mask).  ``kv_mask_is_prefix``:
    True = trust it (e.g. under ``jit``), False = always pass a dense ``[B, 1, 1, L]`` mask,
    None = check when the mask is concrete, else dense mask.  Masked queries give zeros.
  * Leading batch dims are flattened to one (the function wants ``[B, T, N, H]``).
  """
  del precision  # jax.nn.dot_product_attention has no precision argument.
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  _check_qkv(q, k, v)
  kv_mask, q_mask = _flax_masks(q, k, kv_mask, q_mask)
  batch = tuple(q.shape[:-3])
  if len(batch) != 1:
    b = int(np.prod(batch)) if batch else 1
    flat = lambda t: None if t is None else jnp.broadcast_to(t, batch + t.shape[len(t.shape) - 1:]
                                                            ).reshape((b,) + t.shape[-1:])
    out = flash_attention(q.reshape((b,) + q.shape[-3:]), k.reshape((b,) + k.shape[-3:]),
                          v.reshape((b,) + v.shape[-3:]), flat(kv_mask), flat(q_mask),
                          is_causal, implementation=implementation,
                          kv_mask_is_prefix=kv_mask_is_prefix)
    return out.reshape(batch + out.shape[1:])
  if kv_mask is not None:
    kv_mask = jnp.broadcast_to(kv_mask, batch + kv_mask.shape[-1:])
  if q_mask is not None:
    q_mask = jnp.broadcast_to(q_mask, batch + q_mask.shape[-1:])
  lengths = _prefix_lengths(kv_mask, kv_mask_is_prefix)
  kwargs = dict(is_causal=is_causal)
  if lengths is not None:
    kwargs["key_value_seq_lengths"] = lengths
  elif kv_mask is not None:
    kwargs["mask"] = kv_mask[:, None, None, :]
  use_cudnn = _cudnn_allowed(q, implementation)
  out = None
  if use_cudnn:
    try:
      out = jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **kwargs)
    except (NotImplementedError, ValueError, RuntimeError):
      if implementation == "cudnn":
        raise
      out = None
  if out is None:
    impl = None if implementation in (None, "auto", "cudnn") else implementation
    out = jax.nn.dot_product_attention(q, k, v, implementation=impl, **kwargs)
  if q_mask is not None:
    out = jnp.where(q_mask[..., :, None, None], out, 0)
  if kv_mask is not None:  # a query with no real key gets zeros, as in softmax_attention
    out = jnp.where(jnp.any(kv_mask, -1)[:, None, None, None], out, 0)
  return out.astype(q.dtype)


# ----------------------------------------------------------------------------- RF core


def _component_spec(component):
  from spectraformer_jax import registry  # local import: registry imports components lazily
  if isinstance(component, str):
    return registry.get_component(component)
  return component


def _to_heads(t):
  """[batch..., len, heads, d] -> [batch..., heads, len, d]."""
  return jnp.swapaxes(t, -3, -2)


def _feature_dtype(dtype):
  """Storage dtype of the fused path's feature maps: the inputs' if 16-bit float, else f32."""
  return dtype if dtype in (jnp.bfloat16, jnp.float16) else jnp.float32


def _log_features(spec, x, y, W, x_mask, y_mask, params):
  """Causal-mode log-features ``(lq, lk, sq, sk)`` of a component (``sq = sk = None`` for
  positive ones, from ``spec.log_linear``; signed ones from ``spec.log_features``)."""
  kw = dict(x_mask=x_mask, y_mask=y_mask, params=params, causal=True)
  if spec.log_linear is not None:
    form = spec.log_linear(x, y, W, **kw)
    return (components.log_linear_logits(form.xq, W, form.col, form.row_q),
            components.log_linear_logits(form.xk, W, form.col, form.row_k), None, None)
  return tuple(spec.log_features(x, y, W, **kw))


def rf_attention_heads(q, k, v, W, *, component, params=None, kv_mask=None, q_mask=None,
                       is_causal: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE,
                       eps: float = DEFAULT_EPS, precision=None, fused: bool = True,
                       implementation: str = pallas_attention.DEFAULT_IMPLEMENTATION):
  """The RF core on head-major arrays ``[..., len, d]`` (leading dims e.g. (batch, heads)) and
  masks ``[..., len]``; returns float32 ``[..., n, dv]``.  ``rf_attention`` wraps it."""
  spec = _component_spec(component)
  impl = pallas_attention.resolve_implementation(implementation)
  d = q.shape[-1]
  scale = d ** -0.25
  x, y = _f32(q) * scale, _f32(k) * scale
  W = _f32(W)
  if W.ndim != 2 or W.shape[-1] != d:
    raise ValueError(f"W must be float32[num_features, head_dim={d}], got shape "
                     f"{tuple(W.shape)}.")
  xm = None if q_mask is None else jnp.broadcast_to(q_mask, x.shape[:-1])
  ym = None if kv_mask is None else jnp.broadcast_to(kv_mask, y.shape[:-1])
  if fused and not is_causal and spec.log_linear is not None:
    form = spec.log_linear(x, y, W, x_mask=xm, y_mask=ym, params=params)
    fd = _feature_dtype(jnp.dtype(q.dtype))
    if impl == "pallas":
      return pallas_attention.positive_rf_attention_pallas(form, W, v, ym, xm, feature_dtype=fd)
    return fused_lib.positive_rf_attention(form, W, v, ym, xm, feature_dtype=fd)
  if impl == "pallas":
    pallas_attention.log_fallback(
        "causal" if is_causal else "fused=False" if not fused
        else f"component {spec.name!r} has no positive log-linear form")
  guard = not spec.positive
  if is_causal:
    if spec.log_linear is not None or spec.log_features is not None:
      lq, lk, sq, sk = _log_features(spec, x, y, W, xm, ym, params)
      return causal_log_attention(lq, lk, _f32(v), sq, sk, chunk_size, mask=ym, q_mask=xm,
                                  eps=eps, guard=guard, precision=precision)
    if not spec.causal_features:
      from spectraformer_jax import registry  # pylint: disable=g-import-not-at-top
      raise ValueError(
          f"Component {spec.name!r} has no causal form (its features use statistics of the "
          "whole sequence or a stabiliser shared across keys); causal attention takes one of "
          f"{[c for c in registry.component_names() if registry.supports_causal(c)]}.")
    phi_q, phi_k = spec.features(x, y, W, x_mask=xm, y_mask=ym, params=params)
    return causal_linear_attention(_f32(phi_q), _f32(phi_k), _f32(v), chunk_size, mask=ym,
                                   q_mask=xm, eps=eps, guard=guard, precision=precision)
  phi_q, phi_k = spec.features(x, y, W, x_mask=xm, y_mask=ym, params=params)
  phi_q, phi_k = _f32(phi_q), _f32(phi_k)
  return linear_attention(phi_q, phi_k, _f32(v), ym, xm, eps=eps, guard=guard,
                          precision=precision)


def rf_attention(q, k, v, W, *, component, params=None, kv_mask=None, q_mask=None,
                 is_causal: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 eps: float = DEFAULT_EPS, precision=None, fused: bool = True,
                 implementation: str = pallas_attention.DEFAULT_IMPLEMENTATION):
  """Random-feature attention, Flax layout: the pure core of the layers.

  Args:
    q: ``[batch..., q_len, heads, head_dim]``; k: ``[batch..., kv_len, heads, head_dim]``;
      v: ``[batch..., kv_len, heads, v_dim]``.
    W: ``float32[num_features, head_dim]`` (one matrix shared by all heads).
    component: a component name (``registry.get_component``) or a ``ComponentSpec``.
    params: learnable component parameters (``spec.init_params``), or None.
    kv_mask: ``bool[batch..., kv_len]``; q_mask: ``bool[batch..., q_len]`` (True = real; any
      shape that broadcasts, e.g. one ``[len]`` mask for the batch).
    is_causal: causal attention (``causal_log_attention``; needs q_len == kv_len);
      data-dependent statistics take their neutral values (``components`` module doc).
    chunk_size: chunk length of the causal prefix sums.
    eps: relative normaliser floor (see module doc; active only for non-positive components).
    precision: precision of the attention contractions of the materialised path (features use
      HIGHEST projections).
    fused: for bidirectional attention with a positive log-linear component (every positive
      one: ``spec.log_linear``), use ``fused.positive_rf_attention``: the ``[len, m]`` feature
      maps are recomputed in the backward pass instead of stored, and kept in ``q``'s dtype
      when that is bfloat16/float16 (exponentials and accumulation stay float32).  False, or
      TrigRF, materialises float32 features and calls ``linear_attention``; causal attention
      always runs ``causal_log_attention`` on float32 log-features.  Both compute the same
      function.
    implementation: the fused path's backend: ``"pallas"`` (``pallas_attention``: Pallas
      kernels, feature maps only as on-chip tiles; interpret mode off GPU), ``"xla"``
      (``fused.positive_rf_attention``) or ``"auto"`` (pallas on GPU, xla elsewhere).  Where
      the fused path does not apply, pallas falls back to xla and says so once in the log.

  q and k are scaled by ``head_dim**-0.25`` so ``phi(q).phi(k)`` estimates
  ``exp(q.k / sqrt(head_dim))``.  Features are max-stabilised (the constants cancel); the
  result is returned in ``q``'s dtype.
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  _check_qkv(q, k, v)
  kv_mask, q_mask = _flax_masks(q, k, kv_mask, q_mask)
  if is_causal and q.shape[-3] != k.shape[-3]:
    raise ValueError(f"is_causal needs q_len == kv_len, got {q.shape[-3]} and {k.shape[-3]}.")
  hm = lambda m: None if m is None else m[..., None, :]  # [batch..., 1, len] for the heads dim
  out = rf_attention_heads(_to_heads(q), _to_heads(k), _to_heads(v), W, component=component,
                           params=params, kv_mask=hm(kv_mask), q_mask=hm(q_mask),
                           is_causal=is_causal, chunk_size=chunk_size, eps=eps,
                           precision=precision, fused=fused, implementation=implementation)
  return _to_heads(out).astype(q.dtype)


# ----------------------------------------------------------------------------- dropout


def key_dropout(v, rng, rate: float, broadcast_dropout: bool = True, n_batch_dims: int = 1):
  """The layers' attention dropout (module doc): drops whole keys of ``v [batch..., kv_len,
  heads, dv]`` per (batch, key, head) with probability ``rate`` and rescales by ``1/(1-rate)``;
  applied to the values only, so normalisers keep every key.  ``broadcast_dropout`` shares the
  mask over the batch dims."""
  if rate <= 0.0:
    return v
  if rate >= 1.0:
    return jnp.zeros_like(v)
  shape = list(v.shape[:-1]) + [1]
  if broadcast_dropout:
    for i in range(n_batch_dims):
      shape[i] = 1
  keep = jax.random.bernoulli(rng, 1.0 - rate, tuple(shape))
  return jnp.where(keep, v / jnp.asarray(1.0 - rate, v.dtype), jnp.zeros((), v.dtype))


# ----------------------------------------------------------------------------- Flax hook


def reduce_dense_mask(mask, q_len: int, kv_len: int):
  """Reduces Flax's dense mask ``[batch..., heads|1, q_len, kv_len]`` to (key mask
  ``[batch..., heads|1, kv_len]``, query mask ``[batch..., heads|1, q_len]``).

  Assumes the mask is separable, ``mask[i, j] = q_ok(i) & kv_ok(j)`` (a padding mask), possibly
  intersected with a causal mask (give causality by ``is_causal``; the triangle itself is
  dropped).  A key is kept if any query may see it; a query if it may see any key.
  """
  mask = jnp.asarray(mask)
  if mask.ndim < 3 or mask.shape[-1] != kv_len or mask.shape[-2] not in (1, q_len):
    raise ValueError(f"mask must be Flax's dense [batch..., heads|1, q_len={q_len}, "
                     f"kv_len={kv_len}], got {tuple(mask.shape)}.")
  mask = mask.astype(bool)
  return jnp.any(mask, axis=-2), jnp.any(mask, axis=-1)


def make_attention_fn(component: str, weight: str, num_features: int, *,
                      key: Optional[Array] = None, seed: int = 0, W: Optional[Array] = None,
                      weight_kwargs: Optional[dict] = None, component_params: Any = None,
                      is_causal: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE,
                      eps: float = DEFAULT_EPS,
                      implementation: str = pallas_attention.DEFAULT_IMPLEMENTATION,
                      ) -> Callable[..., Array]:
  """Returns an ``attention_fn`` for Flax's stock attention layers.

  ``flax.linen.MultiHeadDotProductAttention(attention_fn=fn)`` and
  ``flax.nnx.MultiHeadAttention(attention_fn=fn)`` work as is.  The returned
  ``fn(query, key, value, mask=None, dropout_rng=None, dropout_rate=0., broadcast_dropout=True,
  deterministic=True, dtype=None, precision=None, is_causal=False, module=None, **unused)``
  takes ``[batch..., len, heads, head_dim]`` arrays.

  * W: drawn once per head_dim from ``key`` (default ``jax.random.key(seed)``) with
    ``registry.get_weight(weight).init`` (concretely, at the first trace), or given as ``W``.
    A learnable weight (fastfoodl, gmm) or component parameters are used *frozen at their
    initial values* here (the function has no parameters); train them with
    ``layers.RFMultiHeadDotProductAttention`` / ``layers.RFMultiHeadAttention`` instead.
  * mask: the stock layers pass a dense ``[batch..., heads|1, q_len, kv_len]`` boolean mask,
    which costs O(n^2) memory to build; it is reduced to key/query masks with
    ``reduce_dense_mask`` (assumes a separable padding mask; causality comes only from
    ``is_causal``, the factory's or nnx's call argument). Use the package's layers with
    ``kv_mask`` to keep memory linear.
  * dropout: key dropout on the values (module doc) when ``deterministic`` is False.
  * implementation: ``"auto" | "pallas" | "xla"``, as in ``rf_attention``.
  """
  from spectraformer_jax import registry
  pallas_attention.resolve_implementation(implementation)  # validates early
  comp, spec = registry.check_pair(component, weight)
  if not isinstance(num_features, (int, np.integer)) or num_features < 1:
    raise ValueError(f"num_features must be a positive int, got {num_features!r}.")
  num_features = int(num_features)
  wkw = dict(weight_kwargs or {})
  base_key = key if key is not None else jax.random.key(seed)
  cache: dict[int, tuple[Array, Any]] = {}

  def _materials(d):
    if d not in cache:
      with jax.ensure_compile_time_eval():
        if W is not None:
          w = jnp.asarray(W, jnp.float32)
          if w.shape != (num_features, d):
            raise ValueError(f"W must have shape (num_features={num_features}, head_dim={d}), "
                             f"got {tuple(w.shape)}.")
        else:
          wkey, _ = jax.random.split(base_key)
          p, b = spec.init(wkey, num_features, d, **wkw)
          w = jnp.asarray(spec.matrix(p, b), jnp.float32)
        cp = component_params
        if cp is None and comp.init_params is not None:
          cp = comp.init_params(jax.random.split(base_key)[1], d)
      cache[d] = (w, cp)
    return cache[d]

  def attention_fn(query, key, value, mask=None, dropout_rng=None, dropout_rate=0.0,
                   broadcast_dropout=True, deterministic=True, dtype=None, precision=None,
                   is_causal=False, module=None, **unused):
    del module, unused
    causal = bool(is_causal) or bool(_factory_causal)
    w, cp = _materials(query.shape[-1])
    q, k, v = _to_heads(query), _to_heads(key), _to_heads(value)
    kvm = qm = None
    if mask is not None:
      kvm, qm = reduce_dense_mask(mask, query.shape[-3], key.shape[-3])
    if not deterministic and dropout_rate > 0.0:
      if dropout_rng is None:
        raise ValueError("dropout_rate > 0 with deterministic=False needs a dropout_rng.")
      v = _to_heads(key_dropout(value, dropout_rng, dropout_rate, broadcast_dropout,
                                value.ndim - 3))
    out = rf_attention_heads(q, k, v, w, component=comp, params=cp, kv_mask=kvm, q_mask=qm,
                             is_causal=causal, chunk_size=chunk_size, eps=eps,
                             precision=precision, implementation=implementation)
    out_dtype = dtype if dtype is not None else query.dtype
    return _to_heads(out).astype(out_dtype)

  _factory_causal = is_causal
  attention_fn.component = comp.name
  attention_fn.weight = spec.name
  attention_fn.num_features = num_features
  return attention_fn
