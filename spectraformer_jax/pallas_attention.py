"""Pallas kernels for bidirectional random-feature attention on positive log-linear features.

Same function as ``fused.positive_rf_attention`` (``components.LogLinear`` log-features,
``log phi_q[i, r] = xq_i . w_r + col_r + row_q_i``, ``log phi_k[j, r] = xk_j . w_r + col_r +
row_k_j``), computed by four ``pallas_call`` kernels that never write an ``[n, m]`` map to memory:
the feature maps exist only as tiles of ``block_rows`` rows inside a kernel.

Stabilisation (exact): one shift per feature column, ``c_r = max_{valid j} lk_jr`` (a constant
of the function), folded into the query side::

    p_jr  = exp(lk_jr - c_r)              (0 at masked keys)          in [0, 1]
    S_r   = sum_j p_jr v_j,  z_r = sum_j p_jr                         [m, dv], [m]
    a_ir  = lq_ir + c_r,  e_ir = exp(a_ir - max_r a_ir)               in [0, 1]
    out_i = sum_r e_ir S_r / sum_r e_ir z_r                           (den_i >= 1)

``row_q`` cancels in the ratio (the function does not depend on it: its gradient is 0).  The key
pass runs over key tiles with a running maximum of ``c`` and rescales ``S, z`` as it grows (the
flash-attention trick); chunks of keys run in parallel and are merged the same way.

Gradients (``g_i = dL/dout_i``, ``q_i`` the query mask): ``G_i = q_i g_i / den_i``,
``h_i = -q_i (g_i . out_i) / den_i``;
``dS_r = sum_i e_ir G_i``, ``dz_r = sum_i e_ir h_i``, ``dlq_ir = e_ir (G_i . S_r + h_i z_r)``,
``dlk_jr = p_jr (v_j . dS_r + dz_r)``, ``dv_j = sum_r p_jr dS_r``;
``dxq = dlq W``, ``dxk = dlk W``, ``dW = dlq^T xq + dlk^T xk``, ``dcol = sum_i dlq + sum_j dlk``,
``drow_k = sum_r dlk``.  A query-side kernel computes ``dS, dz`` and the query gradients, a
key-side kernel the rest.  Residuals: the inputs, ``S, z`` and ``c`` (O((n + l) d + m dv)).

Backends: on GPU the Triton lowering of Pallas (deprecated since JAX 0.11, still present in
0.11.2; a Mosaic GPU port is the way forward); elsewhere ``interpret=True`` (the same kernels run
as XLA ops, for tests).  Programs run over (leading index, chunk of ``chunk_rows`` rows); chunk
partial sums are merged by XLA.  On an H200 (``lra_benchmarks.benchmarks.kernel_speed``, PosRF,
h2 d32 m128, bf16, 65536 tokens) forward + backward takes about 0.63-0.66 ms at any length, against
0.71-0.77 ms for the XLA path, with 65 instead of 233 MiB of temporaries.  Block shapes are powers of two, so ``d``, ``dv`` and ``m`` are
zero-padded to powers of two (padded feature columns get ``-inf`` on the query side, which
removes them exactly) and the sequence to a multiple of the chunk (as masked rows).
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from spectraformer_jax.components import LogLinear
from spectraformer_jax.pallas_tiles import (Blocking, Padded, call, f32_struct, fdot, inverse,
                                            key_logits, per_chunk, per_head, prepare, project,
                                            rows, safe, shared)

_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- kernels


def _key_fwd_kernel(xk_ref, rk_ref, v_ref, col_ref, w_ref, c_ref, s_ref, z_ref, *, blk):
  """One chunk of keys: running column max ``c [m]``, ``S [m, dv]``, ``z [m]`` relative to it."""
  col, w = col_ref[...], w_ref[...]
  m, dv = s_ref.shape

  def body(t, carry):
    c, s, z = carry
    sl = pl.ds(t * blk.tile, blk.tile)
    lk = key_logits(xk_ref, rk_ref, col, w, sl, blk.feature_dtype)
    c_new = jnp.maximum(c, jnp.max(lk, axis=0))
    shift = safe(c_new)
    alpha = jnp.exp(c - shift)
    p = jnp.exp(lk - shift[None, :])
    s = s * alpha[:, None] + fdot(p, v_ref[sl, :], blk.feature_dtype, trans_a=True)
    return c_new, s, z * alpha + jnp.sum(p, axis=0)

  init = (jnp.full((m,), -jnp.inf, jnp.float32), jnp.zeros((m, dv), jnp.float32),
          jnp.zeros((m,), jnp.float32))
  c, s, z = jax.lax.fori_loop(0, blk.chunk // blk.tile, body, init)
  c_ref[...], s_ref[...], z_ref[...] = c, s, z


def _query_tile(xq_ref, qb, w, s, z, sl, dtype):
  """Query features ``e [t, m]``, numerator ``[t, dv]`` and denominator ``[t]`` of one tile."""
  a = project(xq_ref[sl, :], w, dtype) + qb[None, :]
  e = jnp.exp(a - jnp.max(a, axis=1)[:, None])
  return e, fdot(e, s, dtype), jnp.sum(e * z[None, :], axis=1)


def _query_fwd_kernel(xq_ref, qm_ref, qb_ref, w_ref, s_ref, z_ref, o_ref, *, blk):
  """One chunk of queries: ``out = q_i (e S) / (e z)``."""
  qb, w, s, z = qb_ref[...], w_ref[...], s_ref[...], z_ref[...]

  def body(t, carry):
    sl = pl.ds(t * blk.tile, blk.tile)
    _, num, den = _query_tile(xq_ref, qb, w, s, z, sl, blk.feature_dtype)
    o_ref[sl, :] = (num * inverse(den, qm_ref[sl])[:, None]).astype(o_ref.dtype)
    return carry

  jax.lax.fori_loop(0, blk.chunk // blk.tile, body, 0)


def _query_bwd_kernel(xq_ref, qm_ref, g_ref, qb_ref, w_ref, s_ref, z_ref,
                      dxq_ref, ds_ref, dz_ref, dw_ref, dcol_ref, *, blk):
  """One chunk of queries: ``dxq`` and this chunk's sums of ``dS, dz, dW, dcol``."""
  qb, w, s, z = qb_ref[...], w_ref[...], s_ref[...], z_ref[...]
  dt = blk.feature_dtype

  def body(t, carry):
    ds, dz, dw, dcol = carry
    sl = pl.ds(t * blk.tile, blk.tile)
    xq = xq_ref[sl, :].astype(jnp.float32)
    e, num, den = _query_tile(xq_ref, qb, w, s, z, sl, dt)
    inv = inverse(den, qm_ref[sl])
    g = g_ref[sl, :].astype(jnp.float32)
    gg = g * inv[:, None]                                         # G_i
    h = -jnp.sum(gg * num, axis=1) * inv                          # -(g . out) q / den
    dlq = e * (fdot(gg, s, dt, trans_b=True) + h[:, None] * z[None, :])
    dxq_ref[sl, :] = fdot(dlq, w, dt).astype(dxq_ref.dtype)
    return (ds + fdot(e, gg, dt, trans_a=True), dz + jnp.sum(e * h[:, None], axis=0),
            dw + fdot(dlq, xq, dt, trans_a=True), dcol + jnp.sum(dlq, axis=0))

  m, dv = s_ref.shape
  d = w_ref.shape[1]
  init = (jnp.zeros((m, dv), jnp.float32), jnp.zeros((m,), jnp.float32),
          jnp.zeros((m, d), jnp.float32), jnp.zeros((m,), jnp.float32))
  ds, dz, dw, dcol = jax.lax.fori_loop(0, blk.chunk // blk.tile, body, init)
  ds_ref[...], dz_ref[...], dw_ref[...], dcol_ref[...] = ds, dz, dw, dcol


def _key_bwd_kernel(xk_ref, rk_ref, v_ref, col_ref, w_ref, c_ref, ds_ref, dz_ref,
                    dxk_ref, drk_ref, dv_ref, dw_ref, dcol_ref, *, blk):
  """One chunk of keys: ``dxk, drow_k, dv`` and this chunk's sums of ``dW, dcol``."""
  col, w, shift, ds, dz = col_ref[...], w_ref[...], c_ref[...], ds_ref[...], dz_ref[...]
  dt = blk.feature_dtype

  def body(t, carry):
    dw, dcol = carry
    sl = pl.ds(t * blk.tile, blk.tile)
    p = jnp.exp(key_logits(xk_ref, rk_ref, col, w, sl, blk.feature_dtype) - shift[None, :])
    dlk = p * (fdot(v_ref[sl, :], ds, dt, trans_b=True) + dz[None, :])
    dxk_ref[sl, :] = fdot(dlk, w, dt).astype(dxk_ref.dtype)
    drk_ref[sl] = jnp.sum(dlk, axis=1).astype(drk_ref.dtype)
    dv_ref[sl, :] = fdot(p, ds, dt).astype(dv_ref.dtype)
    xk = xk_ref[sl, :].astype(jnp.float32)
    return dw + fdot(dlk, xk, dt, trans_a=True), dcol + jnp.sum(dlk, axis=0)

  m, d = w_ref.shape
  dw, dcol = jax.lax.fori_loop(0, blk.chunk // blk.tile, body,
                               (jnp.zeros((m, d), jnp.float32), jnp.zeros((m,), jnp.float32)))
  dw_ref[...], dcol_ref[...] = dw, dcol


# ----------------------------------------------------------------------------- pallas_call


def _key_forward(xk, rk, v, col, w, blk):
  """``c, S, z`` of every head (chunks merged by rescaling to the overall column max)."""
  bh, l, d = xk.shape
  m, dv = w.shape[0], v.shape[-1]
  nc = l // blk.chunk
  c, s, z = call(
      _key_fwd_kernel, blk, (bh, nc),
      [rows(blk, d), rows(blk), rows(blk, dv), per_head(m), shared(m, d)],
      [per_chunk(m), per_chunk(m, dv), per_chunk(m)],
      [f32_struct(bh, nc, m), f32_struct(bh, nc, m, dv), f32_struct(bh, nc, m)])(xk, rk, v, col, w)
  c_all = jnp.max(c, axis=1)
  scale = jnp.exp(c - safe(c_all)[:, None, :])
  return safe(c_all), jnp.einsum("bcm,bcme->bme", scale, s, precision=_HIGHEST), \
      jnp.sum(scale * z, axis=1)


def _query_forward(xq, qm, qb, w, s, z, blk):
  """``out [bh, n, dv]`` float32."""
  bh, n, d = xq.shape
  m, dv = s.shape[-2:]
  return call(_query_fwd_kernel, blk, (bh, n // blk.chunk),
               [rows(blk, d), rows(blk), per_head(m), shared(m, d), per_head(m, dv),
                per_head(m)],
               rows(blk, dv), f32_struct(bh, n, dv))(xq, qm, qb, w, s, z)


def _qbias(p: Padded, c):
  """Query-side column bias ``col + c`` (``-inf`` at padded columns): ``[bh, m']``."""
  return p.col + c + p.colmask


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _attend(p: Padded, blk: Blocking):
  return _attend_fwd(p, blk)[0]


def _attend_fwd(p, blk):
  c, s, z = _key_forward(p.xk, p.rk, p.v, p.col, p.w, blk)
  out = _query_forward(p.xq, p.qm, _qbias(p, c), p.w, s, z, blk)
  return out, (p, c, s, z)


def _attend_bwd(blk, res, g):
  p, c, s, z = res
  bh, n, d = p.xq.shape
  l, dv, m = p.xk.shape[1], p.v.shape[-1], p.w.shape[0]
  nq, nk = n // blk.chunk, l // blk.chunk
  dxq, ds, dz, dwq, dcq = call(
      _query_bwd_kernel, blk, (bh, nq),
      [rows(blk, d), rows(blk), rows(blk, dv), per_head(m), shared(m, d),
       per_head(m, dv), per_head(m)],
      [rows(blk, d), per_chunk(m, dv), per_chunk(m), per_chunk(m, d), per_chunk(m)],
      [f32_struct(bh, n, d), f32_struct(bh, nq, m, dv), f32_struct(bh, nq, m), f32_struct(bh, nq, m, d),
       f32_struct(bh, nq, m)])(p.xq, p.qm, g, _qbias(p, c), p.w, s, z)
  ds, dz = jnp.sum(ds, axis=1), jnp.sum(dz, axis=1)
  dxk, drk, dv_, dwk, dck = call(
      _key_bwd_kernel, blk, (bh, nk),
      [rows(blk, d), rows(blk), rows(blk, dv), per_head(m), shared(m, d), per_head(m),
       per_head(m, dv), per_head(m)],
      [rows(blk, d), rows(blk), rows(blk, dv), per_chunk(m, d), per_chunk(m)],
      [f32_struct(bh, l, d), f32_struct(bh, l), f32_struct(bh, l, dv), f32_struct(bh, nk, m, d), f32_struct(bh, nk, m)])(
          p.xk, p.rk, p.v, p.col, p.w, c, ds, dz)
  dw = jnp.sum(dwq, axis=(0, 1)) + jnp.sum(dwk, axis=(0, 1))
  dcol = jnp.sum(dcq, axis=1) + jnp.sum(dck, axis=1)
  zeros = jax.tree.map(jnp.zeros_like, p)
  return (zeros._replace(xq=dxq.astype(p.xq.dtype), xk=dxk.astype(p.xk.dtype), w=dw, col=dcol,
                         rk=drk, v=dv_.astype(p.v.dtype)),)


_attend.defvjp(_attend_fwd, _attend_bwd)


# ----------------------------------------------------------------------------- public


IMPLEMENTATIONS = ("auto", "pallas", "xla")
# The default backend of the fused path: the kernels where they compile and cover the call, the
# XLA path elsewhere (``select_implementation``).
DEFAULT_IMPLEMENTATION = "auto"


@functools.lru_cache(maxsize=None)
def pallas_available() -> bool:
  """Whether the compiled (non-interpret) kernels can run: the default backend is a GPU and
  Pallas' Triton lowering is importable."""
  if jax.default_backend() != "gpu":
    return False
  try:
    from jax.experimental.pallas import triton as _  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  return True


def resolve_implementation(implementation: str) -> str:
  """``"auto"`` -> ``"pallas"`` where the kernels compile (``pallas_available``), else ``"xla"``
  (said once in the log); ``"pallas"`` and ``"xla"`` pass through (``"pallas"`` off GPU runs in
  interpret mode).  Calls the kernels do not cover fall back by ``log_fallback``."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}.")
  if implementation != "auto":
    return implementation
  if pallas_available():
    return "pallas"
  _log_once(logging.INFO, f"implementation='auto' on backend {jax.default_backend()!r}: the "
            "Pallas kernels need a GPU with Pallas' Triton lowering; using the XLA path.")
  return "xla"


@functools.lru_cache(maxsize=None)
def _log_once(level: int, message: str) -> None:
  logging.log(level, message)


def log_fallback(reason: str) -> None:
  """Logs once per distinct ``reason`` that the Pallas kernels were selected (``"pallas"``, or
  ``"auto"`` on a GPU) but do not cover the call, which then runs on the XLA path."""
  _log_once(logging.WARNING, f"Pallas attention not used ({reason}): falling back to the XLA "
            "path.")


def select_implementation(implementation: str, uncovered: Optional[str], feature_dtype, *,
                          causal: bool = False) -> str:
  """The backend of one call, ``"pallas"`` or ``"xla"``.

  ``uncovered``: why the kernels cannot compute the call (a component without a positive
  log-linear form, ``fused=False``, ...), None when they can.  ``"auto"`` also leaves to XLA
  what the kernels compute but XLA computes faster (measured with
  ``lra_benchmarks.benchmarks.kernel_speed``, PosRF h2 d32 m128, 65536 tokens, forward +
  backward):

  * float32 ``feature_dtype``: the float32 kernels (six-pass products, half the 16-bit tile)
    take 2.8 ms against XLA's 0.89 ms (H100, n = 4096);
  * ``causal`` calls: the causal kernels (``pallas_causal``) take 1.8 ms against the XLA
    chunk-parallel core's 1.4 ms at every n = 1k-64k, with 164 instead of 572 MiB of
    temporaries (H200, bfloat16): ``"pallas"`` is the choice when memory binds.

  ``"pallas"`` runs the kernels for every covered call.  Every fallback is logged once
  (``log_fallback``).
  """
  if resolve_implementation(implementation) != "pallas":
    return "xla"
  if uncovered is None and implementation == "auto":
    if jnp.dtype(feature_dtype) == jnp.float32:
      uncovered = "float32 features under implementation='auto'"
    elif causal:
      uncovered = "causal attention under implementation='auto'"
  if uncovered is not None:
    log_fallback(uncovered)
    return "xla"
  return "pallas"


def positive_rf_attention_pallas(form: LogLinear, w, v, kv_mask=None, q_mask=None, *,
                                 feature_dtype=jnp.float32, block_rows: Optional[int] = None,
                                 chunk_rows: int = 512, num_warps: int = 8, num_stages: int = 2,
                                 interpret: Optional[bool] = None):
  """Bidirectional RF attention from log-linear features by Pallas kernels (module doc).

  Args:
    form: ``components.LogLinear`` of both sides (leading dims broadcast against ``v``'s);
      ``form.row_q`` cancels in the ratio and gets a zero gradient.
    w: ``float32[m, d]`` (differentiable).
    v: values ``[..., l, dv]``.
    kv_mask: ``bool[..., l]`` (True = real key) or None; masked keys contribute nothing.
    q_mask: ``bool[..., n]`` or None; masked queries give zeros.
    feature_dtype: operand dtype of the feature contractions, float32, bfloat16 or float16
      (exponentials, projections and accumulators are float32 either way).
    block_rows: rows per in-kernel tile (a power of two); None: ``clip(16384 // m, 16, 128)``
      for 16-bit features, ``clip(8192 // m, 16, 128)`` for float32 ones (their six-pass
      products hold more shared memory).
    chunk_rows: rows per program (rounded to a multiple of the tile, capped at the length);
      programs run over (leading index, chunk).
    num_warps: warps per program on GPU (ignored in interpret mode).
    num_stages: stages of Triton's software pipeline on GPU (ignored in interpret mode).
    interpret: run the kernels as XLA ops; None: when no GPU is the default backend.

  Returns:
    float32 ``[..., n, dv]``: ``sum_j phi_q_i . phi_k_j v_j / sum_j phi_q_i . phi_k_j`` (zeros for a
    masked query or one with no unmasked key).
  """
  padded, lead, tile, chunk = prepare(form, w, v, kv_mask, q_mask, feature_dtype, block_rows,
                                       chunk_rows)
  n, dv = jnp.shape(form.xq)[-2], jnp.shape(v)[-1]
  blk = Blocking(tile=tile, chunk=chunk,
                 interpret=(not pallas_available()) if interpret is None else bool(interpret),
                 feature_dtype=jnp.dtype(feature_dtype), num_warps=int(num_warps),
                 num_stages=int(num_stages))
  out = _attend(padded, blk)[:, :n, :dv]
  return out.reshape(lead + (n, dv))
