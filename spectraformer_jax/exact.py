"""Exact softmax attention (plain and cuDNN flash) in Flax's layout, the references and
baselines of the random-feature layers.

Layout: ``[batch..., len, heads, head_dim]`` with padding masks ``[batch..., len]`` (True = real
token); ``broadcast_mask`` accepts ``[len]`` and ``[1, len]`` for a whole batch.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from spectraformer_jax._dtypes import f32 as _f32

def check_qkv(q, k, v):
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


def flax_masks(q, k, kv_mask, q_mask):
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
  check_qkv(q, k, v)
  kv_mask, q_mask = flax_masks(q, k, kv_mask, q_mask)
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
  check_qkv(q, k, v)
  kv_mask, q_mask = flax_masks(q, k, kv_mask, q_mask)
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
