"""Pallas kernels for causal random-feature attention on positive log-linear features.

Same function as ``causal.causal_log_attention`` on the log-features of a
``components.LogLinear`` form (``lq_ir = xq_i . w_r + col_r + row_q_i``, ``lk_jr = xk_j . w_r +
col_r + row_k_j``)::

    out_i = sum_{j <= i, unmasked} phi_q_i . phi_k_j v_j / sum_{j <= i, unmasked} phi_q_i . phi_k_j

computed chunk-parallel by four ``pallas_call`` kernels over (leading index, chunk of ``C``
positions); the ``[n, m]`` feature maps exist only as ``[C, m]`` tiles inside a kernel, and
memory holds the per-chunk states (``O(n / C * m * dv)``) and per-row residuals.

Forward (``causal_log_attention``'s stabilisation, exact):

* kernel A, per chunk: column max ``m_r = max_j lk_jr`` and ``U_r = sum_j exp(lk_jr - m_r)
  [v_j, 1]``.  XLA merges them into the exclusive prefix ``(M, S, Z)`` of the keys of earlier
  chunks (``causal.exclusive_log_prefix``, a parallel scan).
* kernel B, per chunk: ``a_i = max_r lq_ir``, ``b_j = max_r lk_jr``, ``G = exp(lq - a)
  exp(lk - b)^T`` (``[C, C]``), the kept intra-chunk terms ``ok_ij`` (causal, unmasked key,
  ``G_ij > UNDERFLOW``), the shift ``T_i = max(max_r (lq_ir + M_r), max_{ok} (a_i + b_j +
  log G_ij))`` and ``out_i = num_i / den_i`` with
  ``[num_i, den_i] = sum_{ok} exp(a_i + b_j - T_i) G_ij [v_j, 1] + sum_r exp(lq_ir + M_r - T_i)
  [S_r, Z_r]`` (``den_i >= 1`` where a key is visible).  Residuals: the inputs, ``(M, S, Z)``,
  ``out``, ``T_i`` and ``q_i / den_i`` (``q`` the query mask).

Every term's weight is ``e_ijr = exp(lq_ir + lk_jr - T_i) <= 1``; the shifts are constants.
Backward (``g_i = dL/dout_i``, ``G'_i = g_i q_i / den_i``, ``h_i = -G'_i . out_i``,
``D_ij = G'_i . v_j + h_i``): ``dlq_ir = sum_j e_ijr D_ij``, ``dlk_jr = sum_{i >= j} e_ijr D_ij``,
``dv_j = sum_{i >= j, r} e_ijr G'_i``.  Earlier chunks reach a query through ``(M, S, Z)``;
later chunks reach a key through the query-side state of chunk ``c``, ``Q_r = max_i (lq_ir -
T_i)``, ``[A_r, B_r] = sum_i exp(lq_ir - T_i - Q_r) [G'_i, h_i]``, merged over the chunks after
the key's (a reverse exclusive scan with the same merge; ``exp(lk_jr + Q_r) <= 1`` there):

* kernel C, per chunk: ``(Q, A, B)``;
* kernel D, per chunk: the intra-chunk ``[C, C]`` terms, queries against ``(M, S, Z)``, keys
  against the suffix state; ``dxq = dlq W``, ``dxk = dlk W``, ``drow_k = sum_r dlk``,
  ``dv``, and the chunk's sums of ``dW = dlq^T xq + dlk^T xk`` and ``dcol``.

``row_q`` cancels in the ratio (zero gradient).  Padding as in ``pallas_attention``: ``d, m,
dv`` to powers of two (padded feature columns get ``-inf`` on both sides), the sequence to a
multiple of the chunk (as masked rows).  Backends as in ``pallas_attention`` (Triton on GPU,
interpret mode elsewhere).  Tuning: ``chunk_rows`` (``C``: ``[C, C]`` intra-chunk work against
``m dv / C`` state floats per position) and ``num_warps``.  On an H200
(``lra_benchmarks.benchmarks.kernel_speed --mode=causal``: PosRF h2 d32 m128, bfloat16, 65536
tokens, forward + backward, calls dispatched back to back) C:warps = 64:4 / 128:4 / 64:8 / 128:8
/ 256:8 take 2.0 / 3.3 / 2.9 / 1.8 / 3.7 ms at n = 1024, flat in n (128:8: 1.81 ms at 4096,
1.85 ms at 65536), with 213 / 164 / 213 / 164 / 123 MiB of temporaries, hence 128:8.  The XLA
chunk-parallel core (``causal_log_attention``) takes 1.3-1.4 ms with 572 MiB on the same
inputs, which is why ``implementation="auto"`` keeps causal calls there.  Relative error of
the bfloat16 kernels against the float32 reference: 1.5e-3 (output), at most 4.3e-3
(gradients).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from spectraformer_jax.causal import LOG_FLOOR, exclusive_log_prefix
from spectraformer_jax.components import LogLinear
from spectraformer_jax.linear import UNDERFLOW
from spectraformer_jax.pallas_attention import pallas_available
from spectraformer_jax.pallas_tiles import (Blocking, Padded, call, f32_struct, fdot, inverse,
                                            key_logits, per_chunk, per_head, pow2, prepare,
                                            project, rows, safe, shared)

# ----------------------------------------------------------------------------- in-kernel math


def _chunk_terms(xq_ref, xk_ref, rk_ref, cb, w, mp, blk, t=None):
  """The intra-chunk quantities of one chunk (module doc), all float32.

  ``cb [m]`` column bias (``col``, ``-inf`` at padded columns), ``mp [m]`` the prefix column max
  ``M`` (``LOG_FLOOR`` where no earlier key), ``t [C]`` the shift if known (backward).  Returns
  ``(lk, qn, kn, wgt, g, qi, t)``: key logits ``[C, m]``, ``qn = exp(lq - a)``,
  ``kn = exp(lk - b)`` (0 at masked keys), ``wgt_ij = ok_ij exp(a_i + b_j - T_i)`` and ``G``
  (``[C, C]``), ``qi = exp(lq + M - T)`` (0 at unseen columns, ``[C, m]``) and ``T [C]``.
  """
  dt, c = blk.feature_dtype, blk.chunk
  sl = pl.ds(0, c)
  lq = project(xq_ref[sl, :], w, dt) + cb[None, :]
  lk = key_logits(xk_ref, rk_ref, cb, w, sl, dt)
  a = jnp.max(lq, axis=1)
  b = jnp.max(lk, axis=1)
  qn = jnp.exp(lq - a[:, None])
  kn = jnp.exp(lk - safe(b)[:, None])
  g = fdot(qn, kn, _wide(dt), trans_b=True)
  causal = (jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
            <= jax.lax.broadcasted_iota(jnp.int32, (c, c), 0))
  ok = causal & (b[None, :] > -jnp.inf) & (g > UNDERFLOW)
  ab = a[:, None] + b[None, :]
  if t is None:
    intra = jnp.max(jnp.where(ok, ab + jnp.log(jnp.where(ok, g, 1.0)), LOG_FLOOR), axis=1)
    t = jnp.maximum(jnp.max(lq + mp[None, :], axis=1), intra)
  wgt = jnp.exp(jnp.where(ok, ab - t[:, None], LOG_FLOOR))
  seen = mp > 0.5 * LOG_FLOOR
  qi = jnp.exp(jnp.where(seen[None, :], lq + mp[None, :] - t[:, None], LOG_FLOOR))
  return lk, qn, kn, wgt, g, qi, t


def _cotangents(g_ref, o_ref, inv_ref):
  """``G'_i = g_i q_i / den_i`` ``[C, dv]`` and ``h_i = -G'_i . out_i`` ``[C]``."""
  gg = g_ref[...].astype(jnp.float32) * inv_ref[...][:, None]
  return gg, -jnp.sum(gg * o_ref[...], axis=1)


def _wide(dtype):
  """Operand dtype of ``G = qn kn^T`` (whose small entries, below float16's normal range, can
  carry a row's largest term) and of products with the intra-chunk weights ``wgt`` (up to
  ``1 / UNDERFLOW``, beyond float16's range): float32 for float16 features, else ``dtype``
  (bfloat16 has float32's exponent range)."""
  return jnp.float32 if dtype == jnp.float16 else dtype


# ----------------------------------------------------------------------------- kernels


def _key_state_kernel(xk_ref, rk_ref, v_ref, cb_ref, w_ref, m_ref, u_ref, z_ref, *, blk):
  """Kernel A, one chunk of keys: ``m [m]`` (floored at ``LOG_FLOOR``), ``U [m, dv]``, ``z [m]``."""
  lk = key_logits(xk_ref, rk_ref, cb_ref[...], w_ref[...], pl.ds(0, blk.chunk),
                   blk.feature_dtype)
  mc = jnp.maximum(jnp.max(lk, axis=0), LOG_FLOOR)
  p = jnp.exp(lk - mc[None, :])
  m_ref[...] = mc
  u_ref[...] = fdot(p, v_ref[...], blk.feature_dtype, trans_a=True)
  z_ref[...] = jnp.sum(p, axis=0)


def _causal_fwd_kernel(xq_ref, xk_ref, rk_ref, v_ref, qm_ref, cb_ref, w_ref, mp_ref, sp_ref,
                       zp_ref, o_ref, t_ref, inv_ref, *, blk):
  """Kernel B, one chunk: ``out [C, dv]``, the shift ``T [C]`` and ``q / den [C]``."""
  dt = blk.feature_dtype
  _, _, _, wgt, g, qi, t = _chunk_terms(xq_ref, xk_ref, rk_ref, cb_ref[...], w_ref[...],
                                        mp_ref[...], blk)
  p = wgt * g
  sp, zp = sp_ref[...], zp_ref[...]
  num = fdot(p, v_ref[...], dt) + fdot(qi, sp, dt)
  den = jnp.sum(p, axis=1) + jnp.sum(qi * zp[None, :], axis=1)
  inv = inverse(den, qm_ref[...])
  o_ref[...] = num * inv[:, None]
  t_ref[...] = t
  inv_ref[...] = inv


def _query_state_kernel(xq_ref, t_ref, inv_ref, g_ref, o_ref, cb_ref, w_ref, q_ref, a_ref,
                        b_ref, *, blk):
  """Kernel C, one chunk of queries: ``Q [m]`` (floored at ``LOG_FLOOR``), ``A [m, dv]``,
  ``B [m]`` (module doc); queries with ``q / den = 0`` take no part."""
  dt = blk.feature_dtype
  lq = project(xq_ref[...], w_ref[...], dt) + cb_ref[...][None, :]
  inv = inv_ref[...]
  lt = jnp.where(inv[:, None] > 0, lq - t_ref[...][:, None], -jnp.inf)
  qmax = jnp.maximum(jnp.max(lt, axis=0), LOG_FLOOR)
  e = jnp.exp(lt - qmax[None, :])
  gg, h = _cotangents(g_ref, o_ref, inv_ref)
  q_ref[...] = qmax
  a_ref[...] = fdot(e, gg, dt, trans_a=True)
  b_ref[...] = jnp.sum(e * h[:, None], axis=0)


def _causal_bwd_kernel(xq_ref, xk_ref, rk_ref, v_ref, g_ref, o_ref, t_ref, inv_ref, cb_ref,
                       w_ref, mp_ref, sp_ref, zp_ref, qs_ref, as_ref, bs_ref,
                       dxq_ref, dxk_ref, drk_ref, dv_ref, dw_ref, dcol_ref, *, blk):
  """Kernel D, one chunk: ``dxq, dxk, drow_k, dv`` and the chunk's sums of ``dW, dcol``."""
  dt = blk.feature_dtype
  w = w_ref[...]
  lk, qn, kn, wgt, g, qi, _ = _chunk_terms(xq_ref, xk_ref, rk_ref, cb_ref[...], w,
                                           mp_ref[...], blk, t_ref[...])
  v = v_ref[...]
  gg, h = _cotangents(g_ref, o_ref, inv_ref)
  wd = wgt * (fdot(gg, v, dt, trans_b=True) + h[:, None])          # wgt_ij D_ij
  kf = jnp.exp(lk + qs_ref[...][None, :])                           # exp(lk + Q) <= 1
  a_s, sp = as_ref[...], sp_ref[...]
  dlq = (qn * fdot(wd, kn, _wide(dt))
         + qi * (fdot(gg, sp, dt, trans_b=True) + h[:, None] * zp_ref[...][None, :]))
  dlk = (kn * fdot(wd, qn, _wide(dt), trans_a=True)
         + kf * (fdot(v, a_s, dt, trans_b=True) + bs_ref[...][None, :]))
  dxq_ref[...] = fdot(dlq, w, dt)
  dxk_ref[...] = fdot(dlk, w, dt)
  drk_ref[...] = jnp.sum(dlk, axis=1)
  dv_ref[...] = fdot(wgt * g, gg, dt, trans_a=True) + fdot(kf, a_s, dt)
  xq, xk = xq_ref[...].astype(jnp.float32), xk_ref[...].astype(jnp.float32)
  dw_ref[...] = fdot(dlq, xq, dt, trans_a=True) + fdot(dlk, xk, dt, trans_a=True)
  dcol_ref[...] = jnp.sum(dlq, axis=0) + jnp.sum(dlk, axis=0)


# ----------------------------------------------------------------------------- XLA glue


def _with_column(s, z):
  """``[s, z]``: ``s [..., m, dv]``, ``z [..., m]`` -> ``[..., m, dv + 1]``."""
  return jnp.concatenate([s, z[..., None]], axis=-1)


def _prefix_states(p: Padded, cb, blk: Blocking):
  """Kernel A and the exclusive prefix over chunks: ``M [bh, nc, m]``, ``S [bh, nc, m, dv]``,
  ``Z [bh, nc, m]``."""
  bh, n, d = p.xk.shape
  m, dv = p.w.shape[0], p.v.shape[-1]
  nc = n // blk.chunk
  mc, u, z = call(
      _key_state_kernel, blk, (bh, nc),
      [rows(blk, d), rows(blk), rows(blk, dv), per_head(m), shared(m, d)],
      [per_chunk(m), per_chunk(m, dv), per_chunk(m)],
      [f32_struct(bh, nc, m), f32_struct(bh, nc, m, dv), f32_struct(bh, nc, m)])(p.xk, p.rk, p.v, cb, p.w)
  mp, sz = exclusive_log_prefix(mc, _with_column(u, z))
  return mp, sz[..., :-1], sz[..., -1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _causal_attend(p: Padded, blk: Blocking):
  return _causal_attend_fwd(p, blk)[0]


def _causal_attend_fwd(p, blk):
  bh, n, d = p.xq.shape
  m, dv = p.w.shape[0], p.v.shape[-1]
  cb = p.col + p.colmask
  mp, sp, zp = _prefix_states(p, cb, blk)
  out, t, inv = call(
      _causal_fwd_kernel, blk, (bh, n // blk.chunk),
      [rows(blk, d), rows(blk, d), rows(blk), rows(blk, dv), rows(blk), per_head(m),
       shared(m, d), per_chunk(m), per_chunk(m, dv), per_chunk(m)],
      [rows(blk, dv), rows(blk), rows(blk)],
      [f32_struct(bh, n, dv), f32_struct(bh, n), f32_struct(bh, n)])(
          p.xq, p.xk, p.rk, p.v, p.qm, cb, p.w, mp, sp, zp)
  return out, (p, mp, sp, zp, out, t, inv)


def _causal_attend_bwd(blk, res, g):
  p, mp, sp, zp, out, t, inv = res
  bh, n, d = p.xq.shape
  m, dv = p.w.shape[0], p.v.shape[-1]
  nc = n // blk.chunk
  cb = p.col + p.colmask
  qc, ac, bc = call(
      _query_state_kernel, blk, (bh, nc),
      [rows(blk, d), rows(blk), rows(blk), rows(blk, dv), rows(blk, dv), per_head(m),
       shared(m, d)],
      [per_chunk(m), per_chunk(m, dv), per_chunk(m)],
      [f32_struct(bh, nc, m), f32_struct(bh, nc, m, dv), f32_struct(bh, nc, m)])(
          p.xq, t, inv, g, out, cb, p.w)
  qs, ab = exclusive_log_prefix(qc, _with_column(ac, bc), reverse=True)
  dxq, dxk, drk, dv_, dw, dcol = call(
      _causal_bwd_kernel, blk, (bh, nc),
      [rows(blk, d), rows(blk, d), rows(blk), rows(blk, dv), rows(blk, dv), rows(blk, dv),
       rows(blk), rows(blk), per_head(m), shared(m, d), per_chunk(m), per_chunk(m, dv),
       per_chunk(m), per_chunk(m), per_chunk(m, dv), per_chunk(m)],
      [rows(blk, d), rows(blk, d), rows(blk), rows(blk, dv), per_chunk(m, d),
       per_chunk(m)],
      [f32_struct(bh, n, d), f32_struct(bh, n, d), f32_struct(bh, n), f32_struct(bh, n, dv), f32_struct(bh, nc, m, d),
       f32_struct(bh, nc, m)])(
          p.xq, p.xk, p.rk, p.v, g, out, t, inv, cb, p.w, mp, sp, zp, qs, ab[..., :-1],
          ab[..., -1])
  zeros = jax.tree.map(jnp.zeros_like, p)
  return (zeros._replace(xq=dxq.astype(p.xq.dtype), xk=dxk.astype(p.xk.dtype),
                         w=jnp.sum(dw, axis=(0, 1)), col=jnp.sum(dcol, axis=1), rk=drk,
                         v=dv_.astype(p.v.dtype)),)


_causal_attend.defvjp(_causal_attend_fwd, _causal_attend_bwd)


# ----------------------------------------------------------------------------- public


def causal_rf_attention_pallas(form: LogLinear, w, v, kv_mask=None, q_mask=None, *,
                               feature_dtype=jnp.float32, chunk_rows: int = 128,
                               num_warps: int = 8, interpret: Optional[bool] = None):
  """Causal RF attention from log-linear features by Pallas kernels (module doc).

  Args:
    form: ``components.LogLinear`` of both sides, ``n == l`` (leading dims broadcast against
      ``v``'s); ``form.row_q`` cancels in the ratio and gets a zero gradient.
    w: ``float32[m, d]`` (differentiable).
    v: values ``[..., n, dv]``.
    kv_mask: ``bool[..., n]`` (True = real key) or None; masked keys contribute nothing.
    q_mask: ``bool[..., n]`` or None; masked queries give zeros.
    feature_dtype: operand dtype of the feature contractions, float32, bfloat16 or float16
      (exponentials, projections and accumulators are float32 either way).
    chunk_rows: positions per chunk ``C``, a power of two >= 16 (capped at the padded
      length): one program per (leading index, chunk) works on ``[C, m]`` and ``[C, C]``
      tiles.
    num_warps: warps per program on GPU (ignored in interpret mode).
    interpret: run the kernels as XLA ops; None: when no GPU is the default backend.

  Returns:
    float32 ``[..., n, dv]``: ``sum_{j <= i} phi_q_i . phi_k_j v_j / sum_{j <= i} phi_q_i .
    phi_k_j`` over unmasked keys (zeros for a masked query or one with no unmasked key
    ``j <= i``).
  """
  n, l = jnp.shape(form.xq)[-2], jnp.shape(form.xk)[-2]
  if n != l:
    raise ValueError(f"causal attention needs equal query and key lengths, got {n} and {l}.")
  if chunk_rows < 16 or chunk_rows & (chunk_rows - 1):
    raise ValueError(f"chunk_rows must be a power of two >= 16, got {chunk_rows!r}.")
  c = min(chunk_rows, pow2(n))
  padded, lead, _, chunk = prepare(form, w, v, kv_mask, q_mask, feature_dtype, c, c)
  blk = Blocking(tile=chunk, chunk=chunk,
                 interpret=(not pallas_available()) if interpret is None else bool(interpret),
                 feature_dtype=jnp.dtype(feature_dtype), num_warps=int(num_warps))
  dv = jnp.shape(v)[-1]
  out = _causal_attend(padded, blk)[:, :n, :dv]
  return out.reshape(lead + (n, dv))
