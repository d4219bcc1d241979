"""Shared pieces of the Pallas attention kernels (``pallas_attention``, ``pallas_causal``).

Tiling (``Blocking``), in-tile products (``project``, ``fdot``: float32 accumulation, bfloat16
tensor-core passes), the ``BlockSpec`` helpers of the ``[bh, len, width]`` layout the kernels
read (``rows``, ``per_head``, ``per_chunk``, ``shared``), ``call`` (``pallas_call`` with Triton
parameters on GPU, interpret mode elsewhere) and ``prepare``, which checks a ``LogLinear``
form and pads it into kernel-ready ``Padded`` inputs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from spectraformer_jax.components import LogLinear

_F32_DOT = jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X6
_PROJ_DOT = jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3
FEATURE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


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


def pow2(x: int, lo: int = 16) -> int:
  """Smallest power of two ``>= max(x, lo)``."""
  return max(lo, 1 << (int(x) - 1).bit_length())


def round_up(x: int, k: int) -> int:
  """Smallest multiple of ``k`` that is ``>= x``."""
  return -(-x // k) * k


def dot(a, b, precision, trans_a=False, trans_b=False):
  """``a @ b`` of 2-D tiles, optionally transposed (no transpose is materialised), float32."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, precision=precision,
                             preferred_element_type=jnp.float32)


def project(x, w, dtype):
  """Tile logits ``x [t, d] @ w [m, d]^T`` in float32: ``[t, m]``.  Six bfloat16 passes (about
  float32 accuracy) for float32 features, three (about 16 bits, as the XLA path's
  ``Precision.HIGH``) for 16-bit ones: tensor-core products either way."""
  return dot(x.astype(jnp.float32), w, _F32_DOT if dtype == jnp.float32 else _PROJ_DOT,
              trans_b=True)


def fdot(a, b, dtype, trans_a=False, trans_b=False):
  """``a @ b`` (optionally transposed) of feature-sized tiles, float32 result: bfloat16
  operands for 16-bit features, six bfloat16 passes for float32 ones."""
  if dtype == jnp.float32:
    return dot(a.astype(jnp.float32), b.astype(jnp.float32), _F32_DOT, trans_a, trans_b)
  return dot(a.astype(dtype), b.astype(dtype), None, trans_a, trans_b)


def key_logits(xk_ref, rk_ref, col, w, sl, dtype):
  """Key logits of one tile, ``-inf`` at masked keys (``rk`` carries the mask): ``[t, m]``."""
  return project(xk_ref[sl, :], w, dtype) + col[None, :] + rk_ref[sl][:, None]


def safe(c):
  """The column shift with ``-inf`` (no valid key) replaced by 0."""
  return jnp.where(c == -jnp.inf, 0.0, c)


def inverse(den, qm):
  """``qm / den`` where ``den > 0``, else 0 (a sequence without a valid key)."""
  return jnp.where(den > 0, qm / jnp.where(den > 0, den, 1.0), 0.0)



def rows(blk, width=None):
  """BlockSpec of one chunk of rows of a ``[bh, len(, width)]`` array."""
  if width is None:
    return pl.BlockSpec((None, blk.chunk), lambda b, t: (b, t))
  return pl.BlockSpec((None, blk.chunk, width), lambda b, t: (b, t, 0))


def per_head(*shape):
  """BlockSpec of a ``[bh, *shape]`` array: the whole slab of head ``b``."""
  return pl.BlockSpec((None,) + shape, lambda b, t: (b,) + (0,) * len(shape))


def per_chunk(*shape):
  """BlockSpec of a ``[bh, chunks, *shape]`` array: one chunk's slab."""
  return pl.BlockSpec((None, None) + shape, lambda b, t: (b, t) + (0,) * len(shape))


def shared(*shape):
  """BlockSpec of an array every program reads whole (``W``)."""
  return pl.BlockSpec(shape, lambda b, t: (0,) * len(shape))


def call(kernel, blk, grid, in_specs, out_specs, out_shape):
  """``pallas_call`` of ``kernel(..., blk=blk)`` over ``grid`` (Triton parameters on GPU,
  interpret mode when ``blk.interpret``)."""
  params = {}
  if not blk.interpret:
    from jax.experimental.pallas import triton as pl_triton  # GPU only
    params["compiler_params"] = pl_triton.CompilerParams(num_warps=blk.num_warps,
                                                           num_stages=blk.num_stages)
  return pl.pallas_call(functools.partial(kernel, blk=blk), grid=grid, in_specs=in_specs,
                        out_specs=out_specs, out_shape=out_shape, interpret=blk.interpret,
                        **params)


def f32_struct(*shape):
  """The ``jax.ShapeDtypeStruct`` of a float32 kernel output of ``shape``."""
  return jax.ShapeDtypeStruct(shape, jnp.float32)


class Padded(NamedTuple):
  """Kernel-ready inputs: ``[bh, ...]`` with padded lengths and powers-of-two widths."""
  xq: jax.Array   # [bh, n', d']
  xk: jax.Array   # [bh, l', d']
  w: jax.Array    # [m', d']
  col: jax.Array  # [bh, m']
  rk: jax.Array   # [bh, l']  row_k, -inf at masked keys
  v: jax.Array    # [bh, l', dv']
  qm: jax.Array   # [bh, n']  float 0/1
  colmask: jax.Array  # [m'] 0 for real feature columns, -inf for padding


def pad_to(x, shape, value=0.0):
  """``x`` padded at the end of every axis with ``value`` to ``shape``."""
  return jnp.pad(x, [(0, t - s) for s, t in zip(x.shape, shape)], constant_values=value)


def prepare(form: LogLinear, w, v, kv_mask, q_mask, feature_dtype, block_rows: Optional[int],
             chunk_rows: int):
  """Checks the arguments of the public functions and builds their kernel inputs.

  Returns ``(padded, lead, tile, chunk)``: the ``Padded`` inputs (leading dims flattened to
  ``bh``, lengths padded to a multiple of ``chunk`` as masked rows, ``d, m, dv`` to powers of
  two), the broadcast leading shape, the tile (``block_rows`` or its default for ``m`` and the
  dtype) and the rows per program (``chunk_rows`` rounded to a multiple of the tile, capped at
  the padded length).
  """
  feature_dtype = jnp.dtype(feature_dtype)
  if feature_dtype not in FEATURE_DTYPES:
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
  tile = block_rows if block_rows is not None else min(128, max(16, rows // pow2(m)))
  if tile < 1 or tile & (tile - 1):
    raise ValueError(f"block_rows must be a power of two, got {block_rows!r}.")
  if chunk_rows < 1:
    raise ValueError(f"chunk_rows must be positive, got {chunk_rows!r}.")
  lead = jnp.broadcast_shapes(xq.shape[:-2], xk.shape[:-2], v.shape[:-2], col.shape[:-1],
                              row_k.shape[:-1])
  chunk = min(round_up(chunk_rows, tile), round_up(max(n, l), tile))
  n2, l2 = round_up(n, chunk), round_up(l, chunk)
  d2, m2, dv2 = pow2(d), pow2(m), pow2(dv)
  bh = 1
  for s in lead:
    bh *= s
  flat = lambda t, tail: jnp.broadcast_to(t, lead + tail).reshape((bh,) + tail)
  kmask = jnp.ones((l,), bool) if kv_mask is None else jnp.asarray(kv_mask, bool)
  qmask = jnp.ones((n,), bool) if q_mask is None else jnp.asarray(q_mask, bool)
  rk = jnp.where(flat(kmask, (l,)), flat(row_k, (l,)), -jnp.inf)
  padded = Padded(
      xq=pad_to(flat(xq, (n, d)), (bh, n2, d2)),
      xk=pad_to(flat(xk, (l, d)), (bh, l2, d2)),
      w=pad_to(w, (m2, d2)),
      col=pad_to(flat(col, (m,)), (bh, m2)),
      rk=pad_to(rk, (bh, l2), -jnp.inf),
      v=pad_to(flat(v, (l, dv)), (bh, l2, dv2)),
      qm=pad_to(flat(qmask, (n,)).astype(jnp.float32), (bh, n2)),
      colmask=jnp.where(jnp.arange(m2) < m, 0.0, -jnp.inf))
  return padded, lead, tile, chunk
