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
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from spectraformer_jax.components import LogLinear

_HIGHEST = jax.lax.Precision.HIGHEST
_F32_DOT = jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X6
_PROJ_DOT = jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class Blocking(NamedTuple):
  """Static tiling: ``tile`` rows per in-kernel step, ``chunk`` rows per program (a multiple of
  ``tile``), ``interpret`` runs the kernels as XLA ops (CPU), ``feature_dtype`` is the operand
  dtype of the feature contractions (accumulation is float32), ``num_warps`` per program and
  ``num_stages`` of Triton's software pipeline (GPU)."""
  tile: int
  chunk: int
  interpret: bool
  feature_dtype: jnp.dtype
  num_warps: int
  num_stages: int = 2


def _pow2(x: int, lo: int = 16) -> int:
  """Smallest power of two ``>= max(x, lo)``."""
  return max(lo, 1 << (int(x) - 1).bit_length())


def _round_up(x: int, k: int) -> int:
  return -(-x // k) * k


def _dot(a, b, precision, trans_a=False, trans_b=False):
  """``a @ b`` of 2-D tiles, optionally transposed (no transpose is materialised), float32."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, precision=precision,
                             preferred_element_type=jnp.float32)


def _project(x, w, dtype):
  """Tile logits ``x [t, d] @ w [m, d]^T`` in float32: ``[t, m]``.  Six bfloat16 passes (about
  float32 accuracy) for float32 features, three (about 16 bits, as the XLA path's
  ``Precision.HIGH``) for 16-bit ones: tensor-core products either way."""
  return _dot(x.astype(jnp.float32), w, _F32_DOT if dtype == jnp.float32 else _PROJ_DOT,
              trans_b=True)


def _fdot(a, b, dtype, trans_a=False, trans_b=False):
  """``a @ b`` (optionally transposed) of feature-sized tiles, float32 result: bfloat16
  operands for 16-bit features, six bfloat16 passes for float32 ones."""
  if dtype == jnp.float32:
    return _dot(a.astype(jnp.float32), b.astype(jnp.float32), _F32_DOT, trans_a, trans_b)
  return _dot(a.astype(dtype), b.astype(dtype), None, trans_a, trans_b)


def _key_logits(xk_ref, rk_ref, col, w, sl, dtype):
  """Key logits of one tile, ``-inf`` at masked keys (``rk`` carries the mask): ``[t, m]``."""
  return _project(xk_ref[sl, :], w, dtype) + col[None, :] + rk_ref[sl][:, None]


def _safe(c):
  """The column shift with ``-inf`` (no valid key) replaced by 0."""
  return jnp.where(c == -jnp.inf, 0.0, c)


# ----------------------------------------------------------------------------- kernels


def _key_fwd_kernel(xk_ref, rk_ref, v_ref, col_ref, w_ref, c_ref, s_ref, z_ref, *, blk):
  """One chunk of keys: running column max ``c [m]``, ``S [m, dv]``, ``z [m]`` relative to it."""
  col, w = col_ref[...], w_ref[...]
  m, dv = s_ref.shape

  def body(t, carry):
    c, s, z = carry
    sl = pl.ds(t * blk.tile, blk.tile)
    lk = _key_logits(xk_ref, rk_ref, col, w, sl, blk.feature_dtype)
    c_new = jnp.maximum(c, jnp.max(lk, axis=0))
    shift = _safe(c_new)
    alpha = jnp.exp(c - shift)
    p = jnp.exp(lk - shift[None, :])
    s = s * alpha[:, None] + _fdot(p, v_ref[sl, :], blk.feature_dtype, trans_a=True)
    return c_new, s, z * alpha + jnp.sum(p, axis=0)

  init = (jnp.full((m,), -jnp.inf, jnp.float32), jnp.zeros((m, dv), jnp.float32),
          jnp.zeros((m,), jnp.float32))
  c, s, z = jax.lax.fori_loop(0, blk.chunk // blk.tile, body, init)
  c_ref[...], s_ref[...], z_ref[...] = c, s, z


def _query_tile(xq_ref, qb, w, s, z, sl, dtype):
  """Query features ``e [t, m]``, numerator ``[t, dv]`` and denominator ``[t]`` of one tile."""
  a = _project(xq_ref[sl, :], w, dtype) + qb[None, :]
  e = jnp.exp(a - jnp.max(a, axis=1)[:, None])
  return e, _fdot(e, s, dtype), jnp.sum(e * z[None, :], axis=1)


def _inverse(den, qm):
  """``qm / den`` where ``den > 0``, else 0 (a sequence without a valid key)."""
  return jnp.where(den > 0, qm / jnp.where(den > 0, den, 1.0), 0.0)


def _query_fwd_kernel(xq_ref, qm_ref, qb_ref, w_ref, s_ref, z_ref, o_ref, *, blk):
  """One chunk of queries: ``out = q_i (e S) / (e z)``."""
  qb, w, s, z = qb_ref[...], w_ref[...], s_ref[...], z_ref[...]

  def body(t, carry):
    sl = pl.ds(t * blk.tile, blk.tile)
    _, num, den = _query_tile(xq_ref, qb, w, s, z, sl, blk.feature_dtype)
    o_ref[sl, :] = (num * _inverse(den, qm_ref[sl])[:, None]).astype(o_ref.dtype)
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
    inv = _inverse(den, qm_ref[sl])
    g = g_ref[sl, :].astype(jnp.float32)
    gg = g * inv[:, None]                                         # G_i
    h = -jnp.sum(gg * num, axis=1) * inv                          # -(g . out) q / den
    dlq = e * (_fdot(gg, s, dt, trans_b=True) + h[:, None] * z[None, :])
    dxq_ref[sl, :] = _fdot(dlq, w, dt).astype(dxq_ref.dtype)
    return (ds + _fdot(e, gg, dt, trans_a=True), dz + jnp.sum(e * h[:, None], axis=0),
            dw + _fdot(dlq, xq, dt, trans_a=True), dcol + jnp.sum(dlq, axis=0))

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
    p = jnp.exp(_key_logits(xk_ref, rk_ref, col, w, sl, blk.feature_dtype) - shift[None, :])
    dlk = p * (_fdot(v_ref[sl, :], ds, dt, trans_b=True) + dz[None, :])
    dxk_ref[sl, :] = _fdot(dlk, w, dt).astype(dxk_ref.dtype)
    drk_ref[sl] = jnp.sum(dlk, axis=1).astype(drk_ref.dtype)
    dv_ref[sl, :] = _fdot(p, ds, dt).astype(dv_ref.dtype)
    xk = xk_ref[sl, :].astype(jnp.float32)
    return dw + _fdot(dlk, xk, dt, trans_a=True), dcol + jnp.sum(dlk, axis=0)

  m, d = w_ref.shape
  dw, dcol = jax.lax.fori_loop(0, blk.chunk // blk.tile, body,
                               (jnp.zeros((m, d), jnp.float32), jnp.zeros((m,), jnp.float32)))
  dw_ref[...], dcol_ref[...] = dw, dcol


# ----------------------------------------------------------------------------- pallas_call


def _rows(blk, width=None):
  """BlockSpec of one chunk of rows of a ``[bh, len(, width)]`` array."""
  if width is None:
    return pl.BlockSpec((None, blk.chunk), lambda b, t: (b, t))
  return pl.BlockSpec((None, blk.chunk, width), lambda b, t: (b, t, 0))


def _per_head(*shape):
  """BlockSpec of a ``[bh, *shape]`` array: the whole slab of head ``b``."""
  return pl.BlockSpec((None,) + shape, lambda b, t: (b,) + (0,) * len(shape))


def _per_chunk(*shape):
  """BlockSpec of a ``[bh, chunks, *shape]`` array: one chunk's slab."""
  return pl.BlockSpec((None, None) + shape, lambda b, t: (b, t) + (0,) * len(shape))


def _shared(*shape):
  """BlockSpec of an array every program reads whole (``W``)."""
  return pl.BlockSpec(shape, lambda b, t: (0,) * len(shape))


def _call(kernel, blk, grid, in_specs, out_specs, out_shape):
  """``pallas_call`` with this module's conventions (Triton parameters on GPU)."""
  params = {}
  if not blk.interpret:
    from jax.experimental.pallas import triton as pl_triton  # GPU only
    params["compiler_params"] = pl_triton.CompilerParams(num_warps=blk.num_warps,
                                                           num_stages=blk.num_stages)
  return pl.pallas_call(functools.partial(kernel, blk=blk), grid=grid, in_specs=in_specs,
                        out_specs=out_specs, out_shape=out_shape, interpret=blk.interpret,
                        **params)


def _f32(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def _key_forward(xk, rk, v, col, w, blk):
  """``c, S, z`` of every head (chunks merged by rescaling to the overall column max)."""
  bh, l, d = xk.shape
  m, dv = w.shape[0], v.shape[-1]
  nc = l // blk.chunk
  c, s, z = _call(
      _key_fwd_kernel, blk, (bh, nc),
      [_rows(blk, d), _rows(blk), _rows(blk, dv), _per_head(m), _shared(m, d)],
      [_per_chunk(m), _per_chunk(m, dv), _per_chunk(m)],
      [_f32(bh, nc, m), _f32(bh, nc, m, dv), _f32(bh, nc, m)])(xk, rk, v, col, w)
  c_all = jnp.max(c, axis=1)
  scale = jnp.exp(c - _safe(c_all)[:, None, :])
  return _safe(c_all), jnp.einsum("bcm,bcme->bme", scale, s, precision=_HIGHEST), \
      jnp.sum(scale * z, axis=1)


def _query_forward(xq, qm, qb, w, s, z, blk):
  """``out [bh, n, dv]`` float32."""
  bh, n, d = xq.shape
  m, dv = s.shape[-2:]
  return _call(_query_fwd_kernel, blk, (bh, n // blk.chunk),
               [_rows(blk, d), _rows(blk), _per_head(m), _shared(m, d), _per_head(m, dv),
                _per_head(m)],
               _rows(blk, dv), _f32(bh, n, dv))(xq, qm, qb, w, s, z)


class _Padded(NamedTuple):
  """Kernel-ready inputs: ``[bh, ...]`` with padded lengths and powers-of-two widths."""
  xq: jax.Array   # [bh, n', d']
  xk: jax.Array   # [bh, l', d']
  w: jax.Array    # [m', d']
  col: jax.Array  # [bh, m']
  rk: jax.Array   # [bh, l']  row_k, -inf at masked keys
  v: jax.Array    # [bh, l', dv']
  qm: jax.Array   # [bh, n']  float 0/1
  colmask: jax.Array  # [m'] 0 for real feature columns, -inf for padding


def _pad_to(x, shape, value=0.0):
  return jnp.pad(x, [(0, t - s) for s, t in zip(x.shape, shape)], constant_values=value)


def _qbias(p: _Padded, c):
  """Query-side column bias ``col + c`` (``-inf`` at padded columns): ``[bh, m']``."""
  return p.col + c + p.colmask


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _attend(p: _Padded, blk: Blocking):
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
  dxq, ds, dz, dwq, dcq = _call(
      _query_bwd_kernel, blk, (bh, nq),
      [_rows(blk, d), _rows(blk), _rows(blk, dv), _per_head(m), _shared(m, d),
       _per_head(m, dv), _per_head(m)],
      [_rows(blk, d), _per_chunk(m, dv), _per_chunk(m), _per_chunk(m, d), _per_chunk(m)],
      [_f32(bh, n, d), _f32(bh, nq, m, dv), _f32(bh, nq, m), _f32(bh, nq, m, d),
       _f32(bh, nq, m)])(p.xq, p.qm, g, _qbias(p, c), p.w, s, z)
  ds, dz = jnp.sum(ds, axis=1), jnp.sum(dz, axis=1)
  dxk, drk, dv_, dwk, dck = _call(
      _key_bwd_kernel, blk, (bh, nk),
      [_rows(blk, d), _rows(blk), _rows(blk, dv), _per_head(m), _shared(m, d), _per_head(m),
       _per_head(m, dv), _per_head(m)],
      [_rows(blk, d), _rows(blk), _rows(blk, dv), _per_chunk(m, d), _per_chunk(m)],
      [_f32(bh, l, d), _f32(bh, l), _f32(bh, l, dv), _f32(bh, nk, m, d), _f32(bh, nk, m)])(
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


def _prepare(form: LogLinear, w, v, kv_mask, q_mask, feature_dtype, block_rows: Optional[int],
             chunk_rows: int):
  """Checks the arguments of the public functions and builds their kernel inputs.

  Returns ``(padded, lead, tile, chunk)``: the ``_Padded`` inputs (leading dims flattened to
  ``bh``, lengths padded to a multiple of ``chunk`` as masked rows, ``d, m, dv`` to powers of
  two), the broadcast leading shape, the tile (``block_rows`` or its default for ``m`` and the
  dtype) and the rows per program (``chunk_rows`` rounded to a multiple of the tile, capped at
  the padded length).
  """
  feature_dtype = jnp.dtype(feature_dtype)
  if feature_dtype not in _DTYPES:
    raise ValueError(f"feature_dtype must be float32, bfloat16 or float16, got {feature_dtype}.")
  xq, xk = jnp.asarray(form.xq), jnp.asarray(form.xk)
  col, row_k = jnp.asarray(form.col, jnp.float32), jnp.asarray(form.row_k, jnp.float32)
  v, w = jnp.asarray(v), jnp.asarray(w, jnp.float32)
  n, l, d = xq.shape[-2], xk.shape[-2], xq.shape[-1]
  if w.ndim != 2 or w.shape[-1] != d or xk.shape[-1] != d:
    raise ValueError(f"W must be float32[m, d] with d matching xq {xq.shape} and xk "
                     f"{xk.shape}, got {tuple(w.shape)}.")
  if v.shape[-2] != l:
    raise ValueError(f"v needs the keys' length {l}, got shape {tuple(v.shape)}.")
  m, dv = w.shape[0], v.shape[-1]
  rows = 16384 if feature_dtype.itemsize == 2 else 8192
  tile = block_rows if block_rows is not None else min(128, max(16, rows // _pow2(m)))
  if tile < 1 or tile & (tile - 1):
    raise ValueError(f"block_rows must be a power of two, got {block_rows!r}.")
  if chunk_rows < 1:
    raise ValueError(f"chunk_rows must be positive, got {chunk_rows!r}.")
  lead = jnp.broadcast_shapes(xq.shape[:-2], xk.shape[:-2], v.shape[:-2], col.shape[:-1],
                              row_k.shape[:-1])
  chunk = min(_round_up(chunk_rows, tile), _round_up(max(n, l), tile))
  n2, l2 = _round_up(n, chunk), _round_up(l, chunk)
  d2, m2, dv2 = _pow2(d), _pow2(m), _pow2(dv)
  bh = 1
  for s in lead:
    bh *= s
  flat = lambda t, tail: jnp.broadcast_to(t, lead + tail).reshape((bh,) + tail)
  kmask = jnp.ones((l,), bool) if kv_mask is None else jnp.asarray(kv_mask, bool)
  qmask = jnp.ones((n,), bool) if q_mask is None else jnp.asarray(q_mask, bool)
  rk = jnp.where(flat(kmask, (l,)), flat(row_k, (l,)), -jnp.inf)
  padded = _Padded(
      xq=_pad_to(flat(xq, (n, d)), (bh, n2, d2)),
      xk=_pad_to(flat(xk, (l, d)), (bh, l2, d2)),
      w=_pad_to(w, (m2, d2)),
      col=_pad_to(flat(col, (m,)), (bh, m2)),
      rk=_pad_to(rk, (bh, l2), -jnp.inf),
      v=_pad_to(flat(v, (l, dv)), (bh, l2, dv2)),
      qm=_pad_to(flat(qmask, (n,)).astype(jnp.float32), (bh, n2)),
      colmask=jnp.where(jnp.arange(m2) < m, 0.0, -jnp.inf))
  return padded, lead, tile, chunk


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
  padded, lead, tile, chunk = _prepare(form, w, v, kv_mask, q_mask, feature_dtype, block_rows,
                                       chunk_rows)
  n, dv = jnp.shape(form.xq)[-2], jnp.shape(v)[-1]
  blk = Blocking(tile=tile, chunk=chunk,
                 interpret=(not pallas_available()) if interpret is None else bool(interpret),
                 feature_dtype=jnp.dtype(feature_dtype), num_warps=int(num_warps),
                 num_stages=int(num_stages))
  out = _attend(padded, blk)[:, :n, :dv]
  return out.reshape(lead + (n, dv))
