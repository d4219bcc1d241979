"""Fused bidirectional random-feature attention for positive log-linear features.

For the positive dense-exponential components (PosRF, OPRF, GERF, SDERF, ADERF, SADERF) the
log-features are log-linear (``components.LogLinear``):
``log phi_q[i, r] = xq_i . w_r + col_r + row_q_i`` and ``log phi_k[j, r] = xk_j . w_r + col_r +
row_k_j``.  ``positive_rf_attention`` computes, per leading index (batch, head),

    [S, z] = sum_j phi_k[j]^T [v_j, 1]            ([m, dv + 1]: values and normaliser at once)
    out_i  = (phi_q[i] S) / (phi_q[i] z)

exactly like ``attention.linear_attention`` on ``components``' features, but with a custom VJP
that saves only the O((n + l) d) inputs, ``[S, z]``, the output and the normaliser, and
*recomputes* the ``[n, m]`` feature maps in the backward pass (as flash attention recomputes its
scores).  Nothing ``[n, m]`` is kept between forward and backward; the backward pass of one
layer still materialises that layer's maps and their cotangents while it runs, so the peak is
one layer's backward instead of the saved maps of every layer (about equal for the study's
2-layer models, lower for deeper ones; ``block_elements`` bounds it further).

Stabilisation (exact; all shifts are constants under ``stop_gradient``), per leading index:
with ``lq[i, r] = xq_i . w_r + col_r`` (``row_q`` dropped: a per-row constant cancels) and
``lk[j, r] = xk_j . w_r + col_r + row_k_j``,

    c_r    = max over unmasked keys j of lk[j, r]            (per feature column; 0 if none)
    phi_k  = exp(lk[j, r] - c_r)          at unmasked keys, exactly 0 at masked ones
    M_i    = max_r (lq[i, r] + c_r)
    phi_q  = exp(lq[i, r] + c_r - M_i)

so ``phi_q[i] . phi_k[j] = exp(-M_i) sum_r exp(lq[i, r] + lk[j, r])``: ``c_r`` cancels
exactly and ``exp(-M_i)`` cancels in the ratio.  Every exponent is ``<= 0`` and
``den_i = phi_q[i] . z >= 1`` whenever the query has an unmasked key: the column ``r*``
achieving ``M_i`` has ``phi_q[i, r*] = 1`` and ``z_{r*} >= exp(0) = 1`` (its maximising key), so
no row can underflow, whatever the norms; ``1/den`` is only taken where ``den > 0``.  The
residuals hold ``c [m]`` per leading index.  (Causal attention is not fused: it stabilises
prefix by prefix, ``attention.causal_log_attention``.)

Numerics: logits and ``exp`` in float32; the feature maps, and in the backward pass the logits'
cotangents, are then stored in ``feature_dtype`` (bfloat16 halves their traffic) and contracted with float32
accumulation.  With bfloat16 storage the projections use three bfloat16 passes instead of full
float32 (H200, Text b32 n4096 core fwd+bwd: 1.63 -> 1.04 ms, same error against a float32
reference: 3e-3 on the output, 6e-3 on the gradients).

Gradients (``g = dL/dout``, ``e`` indexes ``[v, 1]``): ``dnd_i = [g_i, -g_i . out_i] / den_i``;
``d phi_q = dnd [S, z]^T``, ``d[S, z] = phi_q^T dnd``, ``d phi_k = [v, 1] d[S, z]^T``,
``d[v, 1] = phi_k d[S, z]``; through ``exp``: ``d logits = d phi * phi``; then
``d xq = d logits_q W``, ``dW = d logits_q^T xq + d logits_k^T xk``, ``d col`` and ``d row_k``
are the sums of ``d logits`` over rows and columns, taken in float32 before the cotangents are
rounded to ``feature_dtype`` (they cancel almost exactly, which bfloat16 rounding would
spoil).  The stabilisers are constants of the function (it does not depend on them), so
treating them as such is exact.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from spectraformer_jax.components import LogLinear, col_max, row_max

_HIGHEST = jax.lax.Precision.HIGHEST


def _logits(x, w, col, dtype):
  """``x[..., n, d] @ W[m, d]^T + col[..., None, :]``: float32 ``[..., n, m]``.

  Full float32 precision for float32 features; three bfloat16 passes (``Precision.HIGH``,
  about 16 significant bits, far below the 2^-9 rounding of bfloat16 storage) otherwise.
  """
  precision = _HIGHEST if dtype == jnp.float32 else jax.lax.Precision.HIGH
  return jnp.einsum("...nd,md->...nm", x, w, precision=precision) + col[..., None, :]


def _query_features(xq, w, col, dtype):
  """``exp(logits - row max)`` in float32, stored as ``dtype``: ``[..., n, m]``."""
  lq = _logits(xq, w, col, dtype)
  return jnp.exp(lq - row_max(lq)).astype(dtype)


def _key_logits(xk, w, col, row_k, mask, dtype):
  """Key logits ``[..., l, m]`` with masked rows set to 0 (they never reach ``exp`` unmasked)."""
  lk = _logits(xk, w, col, dtype) + row_k[..., None]
  return jnp.where(mask[..., None], lk, 0.0)


def _key_features(lk, mask, c, dtype):
  """``exp(logits - c)`` at unmasked keys, exactly 0 at masked ones, stored as ``dtype``;
  ``c [..., 1, m]`` is ``components.col_max`` of the key logits (one shift per column)."""
  return jnp.where(mask[..., None], jnp.exp(lk - c), 0.0).astype(dtype)


def _contract(spec, a, b, dtype):
  """``einsum(spec, a, b)`` on ``dtype`` operands with float32 accumulation."""
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype),
                    preferred_element_type=jnp.float32)


def with_ones(v):
  """``[v, 1]``: values with a column of ones (numerator and normaliser in one pass)."""
  return jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)


def _forward(w, dtype, xq, xk, col, row_k, v, mask):
  """One leading index: ``out [n, dv]`` and the residuals ``(c [1, m], [S, z], out, 1/den)``."""
  lk = _key_logits(xk, w, col, row_k, mask, dtype)
  c = col_max(lk, mask[..., None])
  phi_k = _key_features(lk, mask, c, dtype)
  sz = _contract("...lm,...le->...me", phi_k, with_ones(v), dtype)          # [m, dv+1]
  nd = _contract("...nm,...me->...ne", _query_features(xq, w, col + c[..., 0, :], dtype), sz,
                 dtype)
  den = nd[..., -1]
  ok = den > 0   # den >= 1 (module doc) unless the query has no unmasked key: output 0
  inv = jnp.where(ok, 1.0 / jnp.where(ok, den, 1.0), 0.0)
  out = nd[..., :-1] * inv[..., None]
  return out, c, sz, inv


def _backward(w, dtype, xq, xk, col, row_k, v, mask, c, sz, out, inv, g):
  """One leading index: cotangents of ``(xq, xk, W, col, row_k, v)`` (module doc).  The logit
  cotangents are stored as ``dtype`` like the features; their contractions and sums accumulate
  in float32."""
  f32 = jnp.float32
  g = g.astype(f32)
  dnd = jnp.concatenate([g, -jnp.sum(g * out, -1, keepdims=True)], -1) * inv[..., None]
  phi_q = _query_features(xq, w, col + c[..., 0, :], dtype)
  dlq32 = _contract("...ne,...me->...nm", dnd, sz, dtype) * phi_q.astype(f32)
  dsz = _contract("...nm,...ne->...me", phi_q, dnd, dtype)
  phi_k = _key_features(_key_logits(xk, w, col, row_k, mask, dtype), mask, c, dtype)
  dlk32 = _contract("...le,...me->...lm", with_ones(v), dsz, dtype) * phi_k.astype(f32)
  # The sums over rows/columns cancel almost exactly (the ratio is invariant to per-row and
  # per-head shifts), so they are taken before rounding the cotangents to ``dtype``.
  dcol = jnp.sum(dlq32, axis=-2) + jnp.sum(dlk32, axis=-2)
  drow = jnp.sum(dlk32, axis=-1)
  dlq, dlk = dlq32.astype(dtype), dlk32.astype(dtype)
  dv = _contract("...lm,...me->...le", phi_k, dsz, dtype)[..., :-1]
  dxq = _contract("...nm,md->...nd", dlq, w, dtype)
  dxk = _contract("...lm,md->...ld", dlk, w, dtype)
  dw = _contract("...nm,...nd->md", dlq, xq, dtype) + _contract("...lm,...ld->md", dlk, xk, dtype)
  return dxq, dxk, dw, dcol, drow, dv.astype(v.dtype)


def _blockwise(fn, w, dtype, block, *arrays):
  """``fn(w, dtype, *one_index)`` mapped over the leading axis, ``block`` indices at a time
  (a scan over blocks, vectorised within one), so only one block's ``[n, m]`` maps are live;
  a single vectorised call when one block holds every index."""
  one = lambda *xs: fn(w, dtype, *xs)
  if block >= arrays[0].shape[0]:
    return jax.vmap(one)(*arrays)
  return jax.lax.map(lambda xs: one(*xs), arrays, batch_size=block)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _fused(xq, xk, w, col, row_k, v, mask, dtype, block):
  return _blockwise(_forward, w, dtype, block, xq, xk, col, row_k, v, mask)[0]


def _fused_fwd(xq, xk, w, col, row_k, v, mask, dtype, block):
  out, c, sz, inv = _blockwise(_forward, w, dtype, block, xq, xk, col, row_k, v, mask)
  return out, (xq, xk, w, col, row_k, v, mask, c, sz, out, inv)


def _fused_bwd(dtype, block, res, g):
  xq, xk, w, col, row_k, v, mask, c, sz, out, inv = res
  dxq, dxk, dw, dcol, drow, dv = _blockwise(_backward, w, dtype, block, xq, xk, col, row_k, v,
                                            mask, c, sz, out, inv, g)
  return dxq, dxk, jnp.sum(dw, axis=0), dcol, drow, dv, None


_fused.defvjp(_fused_fwd, _fused_bwd)

def positive_rf_attention(form: LogLinear, w, v, kv_mask=None, q_mask=None, *,
                          feature_dtype=jnp.float32,
                          block_elements: Optional[int] = None):
  """Bidirectional RF attention from log-linear features, feature maps never stored.

  Args:
    form: ``components.LogLinear`` of both sides (leading dims broadcast against ``v``'s);
      ``form.row_q`` is not used (a per-query constant cancels in the ratio).
    w: ``float32[m, d]``.
    v: values ``[..., l, dv]``.
    kv_mask: ``bool[..., l]`` (True = real key), or None; masked keys contribute nothing.
    q_mask: ``bool[..., n]``, or None; masked queries give zeros.
    feature_dtype: storage dtype of the ``[n, m]`` feature maps and of the contraction
      operands (accumulation is float32); ``jnp.bfloat16`` halves the memory traffic.
    block_elements: None (default): all leading (batch x head) indices at once, the fastest
      (one layer's feature maps are live during its backward pass).  An int: blocks of
      ``max(1, block_elements // (max(n, l) * m))`` indices, forward and backward (a scan),
      which bounds the live maps to about ``block_elements`` elements each, at a cost in time
      (H100, Text b32 n4096 core fwd+bwd: 1.52 ms unblocked, 2.34 ms at 2**22, temporaries
      499 -> 252 MiB).  The result does not depend on it.

  Returns:
    float32 ``[..., n, dv]``: ``sum_j phi_q_i . phi_k_j v_j / sum_j phi_q_i . phi_k_j`` (zeros for
    a query with no unmasked key).
  """
  xq, xk, col, row_k = (jnp.asarray(t, jnp.float32) for t in
                        (form.xq, form.xk, form.col, form.row_k))
  v = jnp.asarray(v)
  n, l, d = xq.shape[-2], xk.shape[-2], xq.shape[-1]
  w = jnp.asarray(w, jnp.float32)
  if w.ndim != 2 or w.shape[-1] != d or xk.shape[-1] != d:
    raise ValueError(f"W must be float32[m, d] with d matching xq {xq.shape} and xk "
                     f"{xk.shape}, got {tuple(w.shape)}.")
  if v.shape[-2] != l:
    raise ValueError(f"v needs the keys' length {l}, got shape {tuple(v.shape)}.")
  lead = jnp.broadcast_shapes(xq.shape[:-2], xk.shape[:-2], v.shape[:-2], col.shape[:-1],
                              row_k.shape[:-1])
  if block_elements is not None and (not isinstance(block_elements, int)
                                     or block_elements < 1):
    raise ValueError(f"block_elements must be None or a positive int, got {block_elements!r}.")
  mask = jnp.ones((l,), bool) if kv_mask is None else jnp.asarray(kv_mask, bool)
  size = math.prod(lead)
  flat = lambda t, tail: jnp.broadcast_to(t, lead + tail).reshape((size,) + tail)
  m = w.shape[0]
  block = size
  if block_elements is not None:
    block = max(1, min(size, block_elements // (max(n, l) * m)))
  out = _fused(flat(xq, (n, d)), flat(xk, (l, d)), w, flat(col, (m,)), flat(row_k, (l,)),
               flat(v, v.shape[-2:]), flat(mask, (l,)), jnp.dtype(feature_dtype), block)
  out = out.reshape(lead + out.shape[1:])
  if q_mask is not None:
    out = jnp.where(jnp.asarray(q_mask, bool)[..., None], out, 0.0)
  return out
