"""Causal linear attention: chunked prefix sums on features, and the prefix-stabilised form on
log-features that the RF core uses.

Layout as in ``linear``: features ``[..., len, F]``, values ``[..., len, dv]``, masks
``[..., len]``.  ``causal_log_attention`` takes log-features and stabilises them prefix by prefix
(a stabiliser over all keys would let a future key underflow earlier rows, and would leak the
future into the past).

Schedules
---------
Both cores split the sequence into ``nc = n / C`` chunks of ``C`` positions and write the output
of chunk ``c`` as an intra-chunk causal part plus the queries against the *exclusive* state
``S_c`` (the keys of chunks ``< c``).  The chunk's own state ``U_c`` (``[F, dv]``) depends on
that chunk only, so

* ``"parallel"`` (default): every ``U_c`` at once (one einsum over the chunked layout), the
  exclusive prefix ``S_c = U_0 + ... + U_{c-1}`` by a parallel scan over chunks (depth
  ``log nc``), every chunk's output at once.  Time at a fixed number of tokens does not grow
  with ``n``; memory holds the ``nc`` states, ``O(n / C * F * dv)``, plus ``O(n C)`` scores.
* ``"recurrent"``: a sequential ``lax.scan`` over chunks carrying one state: the recurrent
  (decoding) form, ``O(F dv)`` state memory but ``nc`` steps one after another.

Both compute the same function; they differ in float rounding only.

Chunk size: per position the intra-chunk part costs ``C (F + dv)`` multiply-adds and ``C``
exponentials, the state part ``2 F dv``; the states take ``F dv / C`` floats per position.
Small chunks make many small states and a deeper prefix scan, large ones make the ``[C, C]``
blocks dominate.  Measured on an H200 (``lra_benchmarks.benchmarks.kernel_speed --mode=causal``:
PosRF log-features, 2 heads of 32, m = 128, bfloat16 inputs, 65536 tokens, n = 65536, forward +
backward of the parallel schedule): C = 32 / 64 / 128 / 256 take 2.06 / 1.79 / 1.71 / 1.92 ms
and 688 / 642 / 572 / 613 MiB of temporaries, hence ``C = 128``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from spectraformer_jax import fused as fused_lib
from spectraformer_jax._dtypes import f32 as _f32
from spectraformer_jax.linear import (DEFAULT_EPS, UNDERFLOW, check_mask, guarded_divide,
                                      prepare_linear)

DEFAULT_CHUNK_SIZE = 128
SCHEDULES = ("parallel", "recurrent")
DEFAULT_SCHEDULE = "parallel"
# Finite stand-in for -inf in the causal log-space stabilisers (exp gives exactly 0, no NaN).
LOG_FLOOR = -1e30


def _check_schedule(schedule: str) -> None:
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}.")


def _chunk_layout(t, lead, n: int, c: int, tail: tuple[int, ...], fill=0.0):
  """``t [lead..., n, *tail]`` (broadcast to ``lead``) -> ``[B, nc, c, *tail]``, ``B = prod(lead)``,
  the sequence padded with ``fill`` to ``nc * c`` positions."""
  nc = -(-n // c)
  bsz = math.prod(lead)
  t = jnp.broadcast_to(t, lead + (n,) + tail).reshape((bsz, n) + tail)
  if nc * c > n:
    t = jnp.pad(t, ((0, 0), (0, nc * c - n)) + ((0, 0),) * len(tail), constant_values=fill)
  return t.reshape((bsz, nc, c) + tail)


def exclusive_prefix(inclusive, identity):
  """Shifts a prefix ``[B, nc, ...]`` by one chunk: chunk 0 gets ``identity`` (``[B, ...]``)."""
  return jnp.concatenate([identity[:, None], inclusive[:, :-1]], axis=1)


# ----------------------------------------------------------------------------- features


def _product_states(k, v, precision):
  """Chunk states ``U = k^T v``: ``k [..., C, F]``, ``v [..., C, D]`` -> ``[..., F, D]``."""
  return jnp.einsum("...jf,...jd->...fd", k, v, precision=precision)


def _product_outputs(q, k, v, s, precision):
  """``out_i = sum_{j <= i, same chunk} (q_i . k_j) v_j + q_i^T S``: ``q, k [..., C, F]``,
  ``v [..., C, D]``, exclusive state ``s [..., F, D]`` -> ``[..., C, D]``."""
  c = q.shape[-2]
  scores = jnp.einsum("...if,...jf->...ij", q, k, precision=precision)
  scores = scores * jnp.tril(jnp.ones((c, c), scores.dtype))
  return (jnp.einsum("...ij,...jd->...id", scores, v, precision=precision)
          + jnp.einsum("...if,...fd->...id", q, s, precision=precision))


def _causal_chunks(q, k, v, precision, schedule):
  """``out_i = sum_{j <= i} (q_i . k_j) v_j`` on chunked inputs (module doc, Schedules).

  q, k: ``[B, nc, C, F]``; v: ``[B, nc, C, D]``.  Returns ``[B, nc, C, D]``.
  """
  s0 = jnp.zeros((q.shape[0], q.shape[-1], v.shape[-1]), jnp.result_type(q, k, v))
  if schedule == "parallel":
    states = jnp.cumsum(_product_states(k, v, precision), axis=1)
    return _product_outputs(q, k, v, exclusive_prefix(states, s0), precision)

  def body(state, xs):
    qc, kc, vc = xs
    return state + _product_states(kc, vc, precision), _product_outputs(qc, kc, vc, state,
                                                                         precision)

  _, out = jax.lax.scan(body, s0, tuple(jnp.moveaxis(t, 1, 0) for t in (q, k, v)))
  return jnp.moveaxis(out, 0, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _causal_product(q, k, v, precision, schedule):
  return _causal_chunks(q, k, v, precision, schedule)


def _causal_product_fwd(q, k, v, precision, schedule):
  return _causal_chunks(q, k, v, precision, schedule), (q, k, v)


def _flip(t):
  """Reverses the sequence (chunk and within-chunk axes)."""
  return jnp.flip(t, axis=(1, 2))


def _causal_product_bwd(precision, schedule, res, g):
  # out_i = sum_{j<=i} (q_i.k_j) v_j. The three cotangents are themselves (anti-)causal products,
  # so the backward pass is three more chunked products and never stores per-position states:
  #   dq_i = sum_{j<=i} (g_i.v_j) k_j;  dk_j = sum_{i>=j} (v_j.g_i) q_i;  dv_j = sum_{i>=j} (k_j.q_i) g_i.
  q, k, v = res
  g = g.astype(v.dtype)
  dq = _causal_product(g, v, k, precision, schedule)
  dk = _flip(_causal_product(_flip(v), _flip(g), _flip(q), precision, schedule))
  dv = _flip(_causal_product(_flip(k), _flip(q), _flip(g), precision, schedule))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_causal_product.defvjp(_causal_product_fwd, _causal_product_bwd)


def causal_prefix_product(q, k, v, chunk_size: int = DEFAULT_CHUNK_SIZE, precision=None, *,
                          schedule: str = DEFAULT_SCHEDULE):
  """``out_i = sum_{j <= i} (q_i . k_j) v_j`` for ``q, k [..., n, F]``, ``v [..., n, D]``.

  Chunked prefix sums (module doc, Schedules): O(n F D) time; extra memory O(n / C F D + n C)
  for ``"parallel"``, O(C F D + C^2) for ``"recurrent"``.  The backward pass is a
  ``custom_vjp`` of three more chunked products (the inputs are its only residuals).  States
  and products are float32 whatever the input dtype; the result has the inputs' dtype.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
  _check_schedule(schedule)
  lead = jnp.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
  n = q.shape[-2]
  if k.shape[-2] != n or v.shape[-2] != n:
    raise ValueError(f"causal attention needs equal query and key lengths, got {n}, "
                     f"{k.shape[-2]}, {v.shape[-2]}.")
  dtype = jnp.result_type(q, k, v)
  c = min(chunk_size, max(n, 1))
  q, k, v = (_chunk_layout(_f32(t), lead, n, c, t.shape[-1:]) for t in (q, k, v))
  out = _causal_product(q, k, v, precision, schedule)
  out = out.reshape((out.shape[0], -1, out.shape[-1]))[:, :n]
  return out.reshape(lead + (n, out.shape[-1])).astype(dtype)


def causal_linear_attention(phi_q, phi_k, v, chunk_size: int = DEFAULT_CHUNK_SIZE, mask=None,
                            q_mask=None, *, eps: float = DEFAULT_EPS, guard: bool = True,
                            precision=None, schedule: str = DEFAULT_SCHEDULE):
  """Causal linear attention: query i attends keys j <= i (``n == l``).

  Equals the masked quadratic reference
  ``A = tril(phi_q phi_k^T) * mask; out = A v / A 1`` (with the normaliser guard of
  ``linear_attention``) but never builds ``[n, n]`` or per-position ``[n, F, dv]`` states:
  prefix sums run over chunks of ``chunk_size`` positions (``causal_prefix_product``); the
  result does not depend on ``chunk_size`` nor ``schedule`` (up to float rounding).
  State, normaliser and division are float32 whatever the input dtype; the result has the
  inputs' promoted dtype.  Arguments as in ``linear_attention``.
  """
  phi_q, phi_k, v, q_mask = prepare_linear(phi_q, phi_k, v, mask, q_mask)
  dtype = jnp.result_type(phi_q, phi_k, v)
  phi_q, phi_k, v = _f32(phi_q), _f32(phi_k), _f32(v)
  product = functools.partial(causal_prefix_product, chunk_size=chunk_size,
                              precision=precision, schedule=schedule)
  # One pass gives numerator and normaliser: append a column of ones to v.
  both = product(phi_q, phi_k, fused_lib.with_ones(v))
  num, den = both[..., :-1], both[..., -1]
  mag = None
  if guard:
    k_ones = jnp.ones(phi_k.shape[:-1] + (1,), phi_k.dtype)
    mag = product(jnp.abs(phi_q), jnp.abs(phi_k), k_ones)[..., 0]
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


# ----------------------------------------------------------------------------- log-features


def _chunk_shifts(lq, lk, km, m, sq, sk, precision):
  """Stabilisers of chunks (module doc of ``causal_log_attention``), all stop_gradient.

  lq, lk ``[..., C, F]`` (``lk`` already ``LOG_FLOOR`` at masked keys), km ``bool[..., C]``,
  m ``[..., F]`` (column max of the keys of earlier chunks).  Returns
  ``(a [..., C, 1], b [..., C], g, ok, t)``: ``g = qn kn^T [..., C, C]`` with
  ``qn = sq exp(lq - a)``, ``kn = sk exp(lk - b)`` (0 at masked keys), ``ok [..., C, C]`` the
  intra-chunk terms to keep (causal, unmasked; for positive features also ``g > UNDERFLOW``,
  which keeps ``exp(a + b - t) <= 1 / UNDERFLOW``) and the per-query total shift ``t [..., C]``.
  """
  sg = jax.lax.stop_gradient
  a = sg(jnp.max(lq, -1, keepdims=True))
  b = sg(jnp.max(lk, -1))
  qn = jnp.exp(lq - a)
  kn = jnp.where(km[..., None], jnp.exp(lk - b[..., None]), 0.0)
  if sq is not None:
    qn, kn = qn * sq, kn * sk
  g = jnp.einsum("...if,...jf->...ij", qn, kn, precision=precision)
  c = g.shape[-1]
  ok = jnp.tril(jnp.ones((c, c), bool)) & km[..., None, :]
  inter = jnp.max(lq + m[..., None, :], -1)
  if sq is None:  # positive: the largest intra-chunk term itself, a + b + log g
    ok = ok & (sg(g) > UNDERFLOW)
    lg = jnp.where(ok, a + b[..., None, :] + jnp.log(jnp.where(ok, sg(g), 1.0)), LOG_FLOOR)
    intra = jnp.max(lg, -1)
  else:  # signed: the bound a_i + max_{j <= i} b_j of every intra-chunk term
    intra = a[..., 0] + jax.lax.cummax(b, axis=b.ndim - 1)
  return a, b, g, ok, sg(jnp.maximum(inter, intra))


def _log_states(lk, km, v, sk, precision):
  """A chunk's column max and state relative to it: ``lk [..., C, F]`` (``LOG_FLOOR`` at masked
  keys), ``km bool[..., C]``, ``v [..., C, D]``, ``sk [..., C, F]`` or None ->
  ``(m [..., F], U [..., F, D])``, ``m_r = max_j lk_jr`` (stop_gradient),
  ``U_r = sum_j exp(lk_jr - m_r) sk_jr v_j`` over unmasked keys."""
  m = jax.lax.stop_gradient(jnp.max(lk, -2))
  kf = jnp.where(km[..., None], jnp.exp(lk - m[..., None, :]), 0.0)
  if sk is not None:
    kf = kf * sk
  return m, jnp.einsum("...jf,...jd->...fd", kf, v, precision=precision)


def merge_log_states(left, right):
  """Sum of two log-stabilised states, per feature column (associative, exact):
  ``(m1, S1) + (m2, S2) = (M, S1 e^{m1 - M} + S2 e^{m2 - M})``, ``M = max(m1, m2)``;
  ``m [..., F]``, ``S [..., F, D]``.  ``(LOG_FLOOR, 0)`` is the identity."""
  (m1, s1), (m2, s2) = left, right
  mm = jnp.maximum(m1, m2)
  return mm, s1 * jnp.exp(m1 - mm)[..., None] + s2 * jnp.exp(m2 - mm)[..., None]


def exclusive_log_prefix(m, s, reverse: bool = False):
  """Exclusive prefix (``reverse``: suffix) over chunks of log-stabilised states, merged by
  ``merge_log_states`` in a parallel scan: ``m [B, nc, F]``, ``s [B, nc, F, D]`` -> the same
  shapes; chunk ``c`` gets the merge of chunks ``< c`` (``> c``), ``(LOG_FLOOR, 0)`` if none."""
  flip = (lambda t: jnp.flip(t, axis=1)) if reverse else (lambda t: t)
  merged = jax.lax.associative_scan(merge_log_states, (flip(m), flip(s)), axis=1)
  init = (jnp.full(m.shape[:1] + m.shape[2:], LOG_FLOOR, jnp.float32),
          jnp.zeros(s.shape[:1] + s.shape[2:], jnp.float32))
  return tuple(flip(exclusive_prefix(x, x0)) for x, x0 in zip(merged, init))


def _log_outputs(lq, lk, km, v, sq, sk, m, s, precision):
  """``out_i exp(-t_i)`` of chunks given their exclusive states (``causal_log_attention`` doc).

  lq, lk, sq, sk ``[..., C, F]`` (``lk`` already ``LOG_FLOOR`` at masked keys; sq, sk may be None),
  km ``bool[..., C]``, v ``[..., C, D]``, ``(m [..., F], s [..., F, D])`` the merged state of
  the keys before the chunk.  Returns ``[..., C, D]``.
  """
  a, b, g, ok, t = _chunk_shifts(lq, lk, km, m, sq, sk, precision)
  w = jnp.exp(jnp.where(ok, a + b[..., None, :] - t[..., None], LOG_FLOOR))
  seen = (m > 0.5 * LOG_FLOOR)[..., None, :]  # columns with an unmasked key in earlier chunks
  qi = jnp.exp(jnp.where(seen, lq + m[..., None, :] - t[..., None], LOG_FLOOR))
  if sq is not None:
    qi = qi * sq
  return (jnp.einsum("...ij,...jd->...id", w * g, v, precision=precision)
          + jnp.einsum("...if,...fd->...id", qi, s, precision=precision))


def _causal_log_chunks(lq, lk, km, v, sq, sk, precision, schedule):
  """``out_i exp(-t_i)`` with ``out_i = sum_{j <= i} phi_q_i . phi_k_j v_j`` on chunked inputs.

  lq, lk, sq, sk ``[B, nc, C, F]`` (sq, sk may be None: positive features), km ``bool[B, nc, C]``,
  v ``[B, nc, C, D]``; float32.  ``"parallel"``: every chunk's ``(m, U)`` at once, their
  exclusive merge by ``lax.associative_scan``; ``"recurrent"``: a scan over chunks carrying
  one merged state.  Returns ``[B, nc, C, D]``.
  """
  lk = jnp.where(km[..., None], lk, LOG_FLOOR)
  if schedule == "parallel":
    m, s = exclusive_log_prefix(*_log_states(lk, km, v, sk, precision))
    return _log_outputs(lq, lk, km, v, sq, sk, m, s, precision)
  bsz, f, d = lq.shape[0], lq.shape[-1], v.shape[-1]
  init = (jnp.full((bsz, f), LOG_FLOOR, jnp.float32), jnp.zeros((bsz, f, d), jnp.float32))

  def body(state, xs):
    lqc, lkc, kmc, vc, sqc, skc = xs
    out = _log_outputs(lqc, lkc, kmc, vc, sqc, skc, *state, precision)
    return merge_log_states(state, _log_states(lkc, kmc, vc, skc, precision)), out

  xs = tuple(None if t is None else jnp.moveaxis(t, 1, 0) for t in (lq, lk, km, v, sq, sk))
  _, out = jax.lax.scan(body, init, xs)
  return jnp.moveaxis(out, 0, 1)


def causal_log_attention(lq, lk, v, sq=None, sk=None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                         mask=None, q_mask=None, *, eps: float = DEFAULT_EPS,
                         guard: bool = False, precision=None,
                         schedule: str = DEFAULT_SCHEDULE):
  """Causal linear attention from log-features, stabilised prefix by prefix (``n == l``).

  Features ``phi_q = sq * exp(lq)``, ``phi_k = sk * exp(lk)`` (``sq = sk = None``: positive
  features ``exp(lq)``, ``exp(lk)``); ``lq [..., n, 1|F]``, ``lk [..., n, 1|F]`` float32
  log-magnitudes, ``sq, sk [..., n, F]`` bounded signed factors; ``v [..., n, dv]``; masks as
  in ``causal_linear_attention``; ``schedule`` as in the module doc.  Returns float32
  ``[..., n, dv]``:
  ``sum_{j <= i} (phi_q_i . phi_k_j) v_j / sum_{j <= i} phi_q_i . phi_k_j`` over unmasked keys.

  Stabilisation (exact; every shift under ``stop_gradient`` and causal: it uses keys
  ``j <= i`` only).  Chunk ``c`` of ``C`` positions has, per feature column ``r``, the state
  ``S_r = sum_j exp(lk_jr - m_r) sk_jr [v_j, 1]`` of the keys of earlier chunks with their
  column max ``m_r = max_j lk_jr``.  Each chunk's own ``(m, S)`` is relative to its own max;
  two states merge by rescaling both to the larger max (flash attention's rule,
  ``(m1, S1) + (m2, S2) = (M, S1 e^{m1 - M} + S2 e^{m2 - M})``), an associative operation, so
  the prefix over chunks runs as a parallel scan.  Within a chunk, per query
  ``a_i = max_r lq_ir`` and per key ``b_j = max_r lk_jr``, ``Qn = sq exp(lq - a)``,
  ``Kn = sk exp(lk - b)``, ``G = Qn Kn^T`` (``[C, C]``).  One total shift ``T_i`` per query
  scales both parts:

      out_i exp(-T_i) = sum_r exp(lq_ir + m_r - T_i) sq_ir S_r
                        + sum_{j <= i, same chunk} exp(a_i + b_j - T_i) G_ij [v_j, 1],

  ``T_i = max(max_r (lq_ir + m_r), L_i)`` with, for positive features, ``L_i`` the largest
  intra-chunk log-term ``max_{j <= i} (a_i + b_j + log G_ij)``, so the largest term of the row
  is exactly 1 and ``den_i >= 1``; for signed features ``L_i = a_i + max_{j <= i} b_j``, a bound
  of every intra-chunk term.  All of it is float32.  Gradients by automatic differentiation:
  it keeps the per-chunk states (``O(n / C F dv)``) and the ``[n, F]``, ``[n, C]`` maps of the
  chunks, as the recurrent scan does.
  """
  lq, lk, v = _f32(lq), _f32(lk), _f32(v)
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
  _check_schedule(schedule)
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
  prep = functools.partial(_chunk_layout, lead=lead, n=n, c=c)
  lqc, lkc, kmc = prep(lq, tail=(f,)), prep(lk, tail=(f,)), prep(km, tail=(), fill=False)
  sqc = skc = None
  if sq is not None:
    sqc, skc = prep(_f32(sq), tail=(f,)), prep(_f32(sk), tail=(f,))
  vz = jnp.where(km[..., None], v, 0.0)
  vc = prep(fused_lib.with_ones(vz), tail=(v.shape[-1] + 1,))
  unchunk = lambda t: t.reshape((t.shape[0], -1) + t.shape[3:])[:, :n].reshape(
      lead + (n,) + t.shape[3:])
  both = unchunk(_causal_log_chunks(lqc, lkc, kmc, vc, sqc, skc, precision, schedule))
  num, den = both[..., :-1], both[..., -1]
  mag = None
  if guard:
    if sq is None:
      raise ValueError("guard=True needs signed features (sq, sk); positive ones need none.")
    ones = prep(jnp.ones(v.shape[:-1] + (1,), jnp.float32), tail=(1,))
    mag = unchunk(_causal_log_chunks(lqc, lkc, kmc, ones, jnp.abs(sqc), jnp.abs(skc),
                                     precision, schedule))[..., 0]
  out = guarded_divide(num, den, mag, eps)
  if q_mask is not None:
    out = jnp.where(q_mask[..., None], out, 0.0)
  return out
