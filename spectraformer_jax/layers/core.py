"""The logic shared by the linen and nnx layers: argument checks, masks, the draws of W and
the attention itself on projected ``[batch..., len, heads, head_dim]`` arrays (all three
``attention`` modes), as pure functions."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from spectraformer_jax import attention as attn
from spectraformer_jax import pallas_attention
from spectraformer_jax import recurrent
from spectraformer_jax import registry

ATTENTION_CHOICES = ("spectraformer", "softmax", "flash")
REDRAW_CHOICES = ("never", "always")
RF_COLLECTION = "random_features"
FEATURES_STREAM = "features"

default_kernel_init = nn.initializers.lecun_normal()


def validate(attention: str, redraw: str, num_features: Any, num_heads: int,
             qkv_features: int, component: str, weight: str, chunk_size: int):
  """Checks a layer's settings once, at construction or first call; returns the registry's
  ``(ComponentSpec, WeightSpec)`` of the pair for ``attention="spectraformer"``, else
  ``(None, None)``.  ValueError names the bad value and the valid choices."""
  if attention not in ATTENTION_CHOICES:
    raise ValueError(f"attention={attention!r} is unknown; choose one of {ATTENTION_CHOICES}.")
  if redraw not in REDRAW_CHOICES:
    raise ValueError(f"redraw={redraw!r} is unknown; choose one of {REDRAW_CHOICES} (redraw "
                     "every N steps by calling redraw_random_features from the training loop).")
  if not isinstance(num_heads, (int, np.integer)) or num_heads < 1:
    raise ValueError(f"num_heads must be a positive int, got {num_heads!r}.")
  if qkv_features % num_heads != 0:
    raise ValueError(f"qkv_features ({qkv_features}) must be divisible by num_heads "
                     f"({num_heads}).")
  if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
  if attention != "spectraformer":
    return None, None
  if not isinstance(num_features, (int, np.integer)) or isinstance(num_features, bool) \
      or num_features < 1:
    raise ValueError(f"num_features must be a positive int (features per head), got "
                     f"{num_features!r}.")
  comp, spec = registry.check_pair(component, weight)
  if spec.learnable and redraw != "never":
    raise ValueError(f"redraw={redraw!r} needs a fixed weight matrix; weight={weight!r} is "
                     "learnable (use redraw='never').")
  return comp, spec


def check_dense_mask(mask, batch, q_len, kv_len):
  """Flax's dense ``mask`` as bool ``[batch..., heads|1, q_len|1, kv_len]`` (None stays None);
  ValueError for any other shape."""
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if (mask.ndim != len(batch) + 3 or mask.shape[-1] != kv_len
      or mask.shape[-2] not in (1, q_len)):
    raise ValueError(f"mask must be Flax's dense [batch..., heads|1, q_len={q_len}, "
                     f"kv_len={kv_len}] with batch={batch}, got {tuple(mask.shape)}; for a "
                     "padding mask in linear memory pass kv_mask=[batch..., kv_len].")
  return mask.astype(bool)


def attend(query, key, value, *, attention, comp, W, cparams, dense_mask, kv_mask, q_mask,
           is_causal, chunk_size, eps, precision, kv_mask_is_prefix, dropout_rng,
           dropout_rate, broadcast_dropout, deterministic, out_dtype, fused=True,
           implementation=pallas_attention.DEFAULT_IMPLEMENTATION):
  """Attention on projected ``[batch..., len, heads, head_dim]`` arrays (all three modes)."""
  n_batch = query.ndim - 3
  if not deterministic and dropout_rate > 0.0:
    value = attn.key_dropout(value, dropout_rng, dropout_rate, broadcast_dropout, n_batch)
  if attention == "spectraformer":
    hm = lambda m: None if m is None else m[..., None, :]
    kvm, qm = hm(kv_mask), hm(q_mask)
    if dense_mask is not None:
      dk, dq = attn.reduce_dense_mask(dense_mask, query.shape[-3], key.shape[-3])
      kvm = dk if kvm is None else (kvm & dk)
      qm = dq if qm is None else (qm & dq)
    out = attn.rf_attention_heads(
        attn.to_heads(query), attn.to_heads(key), attn.to_heads(value), W, component=comp,
        params=cparams, kv_mask=kvm, q_mask=qm, is_causal=is_causal, chunk_size=chunk_size,
        eps=eps, precision=precision, fused=fused, implementation=implementation)
    out = attn.to_heads(out)
  elif dense_mask is None:
    if attention == "softmax":
      out = attn.softmax_attention(query, key, value, kv_mask, q_mask, is_causal,
                                   precision=precision)
    else:
      out = attn.flash_attention(query, key, value, kv_mask, q_mask, is_causal,
                                 kv_mask_is_prefix=kv_mask_is_prefix)
  else:
    out = dense_softmax(query, key, value, dense_mask, kv_mask, q_mask, is_causal,
                        attention, precision)
  return out.astype(out_dtype)


def dense_softmax(q, k, v, dense_mask, kv_mask, q_mask, is_causal, attention, precision):
  """Exact softmax with Flax's dense mask (and optional kv/q masks)."""
  allowed = dense_mask
  if kv_mask is not None:
    allowed = allowed & kv_mask[..., None, None, :]
  if is_causal:
    allowed = allowed & jnp.tril(jnp.ones((q.shape[-3], k.shape[-3]), bool))
  if attention == "flash":
    batch = q.shape[:-3]
    b = int(np.prod(batch)) if batch else 1
    allowed4 = jnp.broadcast_to(allowed, batch + allowed.shape[-3:]).reshape(
        (b,) + allowed.shape[-3:])
    r = lambda t: t.reshape((b,) + t.shape[-3:])
    out = jax.nn.dot_product_attention(r(q), r(k), r(v), mask=allowed4).reshape(q.shape[:-1] + (
        v.shape[-1],))
    out = jnp.where(jnp.any(allowed, -1)[..., None].swapaxes(-2, -3), out, 0)
  else:
    out = attn.masked_softmax_attention(q, k, v, allowed, precision=precision)
  if q_mask is not None:
    out = jnp.where(q_mask[..., :, None, None], out, 0)
  return out


def check_decode_step(query, masks, causal: bool):
  """Raises ValueError unless a decoding step is causal, one token long and unmasked."""
  if not causal:
    raise ValueError("decode=True decodes causally: set is_causal=True.")
  if query.shape[-3] != 1 or any(m is not None for m in masks):
    raise ValueError(f"decode=True takes one token per call and no masks after the "
                     f"initialisation call, got length {query.shape[-3]}.")


def decode_step(state, query, key, value, comp, W, cparams, eps, precision):
  """One decoding step on projected ``[batch..., 1, heads, d]`` arrays: the key-value cache
  (``comp`` None: softmax, flash) or the recurrent state.  Returns (state, float32
  ``[batch..., 1, heads, dv]``)."""
  if comp is None:
    return recurrent.kv_cache_step(state, query, key, value, precision=precision)
  scaled = lambda t: t[..., 0, :, :].astype(jnp.float32) * t.shape[-1] ** -0.25
  feats = recurrent.token_features(comp, scaled(query), scaled(key), W, cparams)
  state, out = recurrent.step(state, feats, value[..., 0, :, :], eps=eps, precision=precision)
  return state, out[..., None, :, :]


def empty_cache(comp, num_features: int, lead: tuple[int, ...], key_shape, value_shape, dtype):
  """The empty decoding state: ``recurrent.init_state`` over ``lead`` = (batch..., heads), or
  ``recurrent.kv_cache_init`` for keys/values of the given shapes when ``comp`` is None."""
  if comp is None:
    return recurrent.kv_cache_init(key_shape, value_shape, dtype)
  return recurrent.init_state(lead, comp.feature_dim(num_features), value_shape[-1],
                              not comp.positive)


def default_kv(inputs_q, inputs_k, inputs_v):
  """Flax's defaults: keys from the queries, values from the keys (self-attention)."""
  if inputs_k is None:
    if inputs_v is not None:
      raise ValueError("inputs_k cannot be None if inputs_v is not None.")
    inputs_k = inputs_q
  return inputs_k, inputs_k if inputs_v is None else inputs_v


def self_attention_q_mask(q_mask, kv_mask, self_attention: bool):
  """``q_mask``, defaulting to ``kv_mask`` in self-attention (a padded key is a padded query).

  Data-dependent statistics (OPRF's A, the DERF matrices) are computed over the unmasked
  queries; without this a caller passing only ``kv_mask`` would let padded queries into them.
  Outputs at padded queries become zeros; outputs at real ones are unchanged.
  """
  return kv_mask if q_mask is None and self_attention else q_mask


def draw(spec, key, num_features, dim, weight_kwargs):
  """``spec.init``: the weight's ``(params, buffers)`` for ``W [num_features, dim]`` from
  ``key``."""
  return spec.init(key, num_features, dim, **dict(weight_kwargs or {}))


def fixed_matrix(spec, key, num_features, dim, weight_kwargs):
  """A fixed weight's matrix ``float32[num_features, dim]`` drawn from ``key``."""
  return jnp.asarray(spec.matrix(*draw(spec, key, num_features, dim, weight_kwargs)),
                     jnp.float32)


def as_key(key):
  """``key`` as a typed PRNG key (raw ``uint32[2]`` key data is wrapped)."""
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  return jax.random.wrap_key_data(key)
