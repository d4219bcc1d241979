"""Causal linear attention: chunked prefix sums on features, and the prefix-stabilised form on
log-features that the RF core uses.

Layout as in ``linear``: features ``[..., len, F]``, values ``[..., len, dv]``, masks
``[..., len]``.  ``causal_log_attention`` takes log-features and stabilises them prefix by prefix
(a stabiliser over all keys would let a future key underflow earlier rows, and would leak the
future into the past).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from spectraformer_jax import fused as fused_lib
from spectraformer_jax._dtypes import f32 as _f32
from spectraformer_jax.linear import (DEFAULT_EPS, UNDERFLOW, check_mask, guarded_divide,
                                      prepare_linear)

DEFAULT_CHUNK_SIZE = 128
# Finite stand-in for -inf in the causal log-space stabilisers (exp gives exactly 0, no NaN).
_NEG = -1e30

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
  phi_q, phi_k, v, q_mask = prepare_linear(phi_q, phi_k, v, mask, q_mask)
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
  out = guarded_divide(num, den, mag, eps)
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
  out = guarded_divide(num, den, mag, eps)
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
  mask = check_mask(mask, n, "mask (key mask)", lead)
  q_mask = check_mask(q_mask, n, "q_mask", lead)
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
  out = guarded_divide(num, den, mag, eps)
  if q_mask is not None:
    out = jnp.where(q_mask[..., None], out, 0.0)
  return out
