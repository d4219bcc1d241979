"""Flax layers: drop-in multi-head attention with random-feature (or exact) attention.

* linen ``RFMultiHeadDotProductAttention``: drop-in for ``flax.linen.MultiHeadDotProductAttention``
  (same fields that make sense, same ``query/key/value/out`` parameters and shapes, same call).
* nnx ``RFMultiHeadAttention``: drop-in for ``flax.nnx.MultiHeadAttention``.

Extras of both: ``attention`` ("spectraformer" | "softmax" | "flash": the exact baselines run
through the same layer, so a model switches by config), ``component``, ``weight``,
``num_features`` (m, the number of frequencies per head; one W of shape [m, head_dim] shared by the
heads of a layer), ``weight_kwargs``, ``redraw`` ("never" | "always"), ``is_causal``,
``chunk_size`` (causal prefix sums), ``eps`` (normaliser guard), ``kv_mask_is_prefix`` (flash),
``fused`` (default True: positive components recompute their feature maps in the backward pass
instead of storing them, see ``attention.rf_attention``), ``implementation`` ("auto" | "pallas" |
"xla": the fused path's backend, see ``attention.rf_attention``),
and call arguments ``kv_mask [batch..., kv_len]`` / ``q_mask [batch..., q_len]`` (linear memory).
In self-attention ``q_mask`` defaults to ``kv_mask``, so statistics see real tokens only and
outputs at padded positions are zeros.
linen ``decode=True`` (with ``is_causal=True``) follows Flax's autoregressive-cache convention:
the first call (any length) runs in parallel and creates the empty ``"cache"`` collection;
later calls (``mutable=["cache"]``) take one token each.  Random features carry only the
recurrent state of ``recurrent`` (``S``, ``z``, the running key maximum): O(1) memory in the
sequence length; softmax and flash carry Flax's key-value cache.  nnx: ``init_cache(shape)``,
then ``decode=True`` calls (constructor or call argument), as ``nnx.MultiHeadAttention``.
Decoding uses the stored W, no dropout and no masks.
Flax's dense ``mask`` is accepted too: used as is by the softmax modes, reduced to key/query
masks (``attention.reduce_dense_mask``, separable padding mask assumed) by the RF mode.

State
-----
* linen: the collection ``"random_features"`` holds, per layer, the fixed W (``W``,
  float32[m, head_dim]) drawn at init from the ``"features"`` rng stream (falling back to
  ``"params"``), so no call regenerates it (orthogonal and moment-matched draws need QR /
  eigendecompositions, which cost more than the attention on a GPU).
  ``redraw_random_features(module, variables, key, *example_inputs)`` redraws every layer's W
  of any model with a pure, jittable re-init of the collection.  Learnable weights
  (``WeightSpec.learnable``: fastfoodl, gmm) keep their trainable parameters in
  ``params/weight`` and their non-trainable buffers under ``buffers`` (never redrawn);
  learnable component parameters live in ``params/component``.
* nnx: the fixed W (the weight's buffers) is stored in ``RandomFeatures`` variables
  (``self.random_features``), learnable weights in ``nnx.Param`` (``self.weight``) with their
  buffers in ``WeightBuffers``; ``redraw_random_features_nnx(model, key)`` redraws in place.
* ``redraw="always"``: a fresh W at every call from the rng stream ``"features"`` (linen:
  ``rngs={"features": k}``; nnx: the ``rngs`` call argument or the layer's own forked stream);
  without that stream the stored W is used.  Only for fixed weights.

Dropout
-------
Key dropout on the values (see ``attention`` module doc): equal to attention-weight dropout
with a mask shared along the query axis; the same rule in all three ``attention`` modes.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from spectraformer_jax import attention as attn
from spectraformer_jax import pallas_attention
from spectraformer_jax import recurrent
from spectraformer_jax import registry

ATTENTION_CHOICES = ("spectraformer", "softmax", "flash")
REDRAW_CHOICES = ("never", "always")
RF_COLLECTION = "random_features"
FEATURES_STREAM = "features"

default_kernel_init = nn.initializers.lecun_normal()


# ----------------------------------------------------------------------------- shared logic


def _validate(attention: str, redraw: str, num_features: Any, num_heads: int,
              qkv_features: int, component: str, weight: str, chunk_size: int):
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


def _check_dense_mask(mask, batch, q_len, kv_len):
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if (mask.ndim != len(batch) + 3 or mask.shape[-1] != kv_len
      or mask.shape[-2] not in (1, q_len)):
    raise ValueError(f"mask must be Flax's dense [batch..., heads|1, q_len={q_len}, "
                     f"kv_len={kv_len}] with batch={batch}, got {tuple(mask.shape)}; for a "
                     "padding mask in linear memory pass kv_mask=[batch..., kv_len].")
  return mask.astype(bool)


def _attend(query, key, value, *, attention, comp, W, cparams, dense_mask, kv_mask, q_mask,
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
    out = _dense_softmax(query, key, value, dense_mask, kv_mask, q_mask, is_causal,
                         attention, precision)
  return out.astype(out_dtype)


def _dense_softmax(q, k, v, dense_mask, kv_mask, q_mask, is_causal, attention, precision):
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


def _check_decode_step(query, masks, causal: bool):
  """Raises ValueError unless a decoding step is causal, one token long and unmasked."""
  if not causal:
    raise ValueError("decode=True decodes causally: set is_causal=True.")
  if query.shape[-3] != 1 or any(m is not None for m in masks):
    raise ValueError(f"decode=True takes one token per call and no masks after the "
                     f"initialisation call, got length {query.shape[-3]}.")


def _decode_step(state, query, key, value, comp, W, cparams, eps, precision):
  """One decoding step on projected ``[batch..., 1, heads, d]`` arrays: the key-value cache
  (``comp`` None: softmax, flash) or the recurrent state.  Returns (state, float32
  ``[batch..., 1, heads, dv]``)."""
  if comp is None:
    return recurrent.kv_cache_step(state, query, key, value, precision=precision)
  scaled = lambda t: t[..., 0, :, :].astype(jnp.float32) * t.shape[-1] ** -0.25
  feats = recurrent.token_features(comp, scaled(query), scaled(key), W, cparams)
  state, out = recurrent.step(state, feats, value[..., 0, :, :], eps=eps, precision=precision)
  return state, out[..., None, :, :]


def _empty_cache(comp, num_features: int, lead: tuple[int, ...], key_shape, value_shape, dtype):
  """The empty decoding state: ``recurrent.init_state`` over ``lead`` = (batch..., heads), or
  ``recurrent.kv_cache_init`` for keys/values of the given shapes when ``comp`` is None."""
  if comp is None:
    return recurrent.kv_cache_init(key_shape, value_shape, dtype)
  return recurrent.init_state(lead, comp.feature_dim(num_features), value_shape[-1],
                              not comp.positive)


def _default_kv(inputs_q, inputs_k, inputs_v):
  """Flax's defaults: keys from the queries, values from the keys (self-attention)."""
  if inputs_k is None:
    if inputs_v is not None:
      raise ValueError("inputs_k cannot be None if inputs_v is not None.")
    inputs_k = inputs_q
  return inputs_k, inputs_k if inputs_v is None else inputs_v


def _self_attention_q_mask(q_mask, kv_mask, self_attention: bool):
  """``q_mask``, defaulting to ``kv_mask`` in self-attention (a padded key is a padded query).

  Data-dependent statistics (OPRF's A, the DERF matrices) are computed over the unmasked
  queries; without this a caller passing only ``kv_mask`` would let padded queries into them.
  Outputs at padded queries become zeros; outputs at real ones are unchanged.
  """
  return kv_mask if q_mask is None and self_attention else q_mask


def _draw(spec, key, num_features, dim, weight_kwargs):
  return spec.init(key, num_features, dim, **dict(weight_kwargs or {}))


def _fixed_matrix(spec, key, num_features, dim, weight_kwargs):
  """A fixed weight's matrix ``float32[num_features, dim]`` drawn from ``key``."""
  return jnp.asarray(spec.matrix(*_draw(spec, key, num_features, dim, weight_kwargs)),
                     jnp.float32)


def _as_key(key):
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  return jax.random.wrap_key_data(key)


# ----------------------------------------------------------------------------- linen


class RFMultiHeadDotProductAttention(nn.Module):
  """Drop-in for ``flax.linen.MultiHeadDotProductAttention`` with random-feature attention.

  Fields as in Flax (``num_heads, dtype, param_dtype, qkv_features, out_features,
  broadcast_dropout, dropout_rate, deterministic, precision, kernel_init, out_kernel_init,
  bias_init, out_bias_init, use_bias, decode, normalize_qk``; ``attention_fn`` and the
  deprecated dot-general/einsum fields are replaced by ``attention``) plus the extras of the
  module doc (``decode``: module doc).

  Example::

    layer = RFMultiHeadDotProductAttention(num_heads=2, qkv_features=64, component="posrf",
                                           weight="orf", num_features=128)
    variables = layer.init(jax.random.key(0), x, kv_mask=pad)      # params + random_features
    y = layer.apply(variables, x, kv_mask=pad)
  """
  num_heads: int
  dtype: Any = None
  param_dtype: Any = jnp.float32
  qkv_features: Optional[int] = None
  out_features: Optional[int] = None
  broadcast_dropout: bool = True
  dropout_rate: float = 0.0
  deterministic: Optional[bool] = None
  precision: Any = None
  kernel_init: Callable = default_kernel_init
  out_kernel_init: Optional[Callable] = None
  bias_init: Callable = nn.initializers.zeros_init()
  out_bias_init: Optional[Callable] = None
  use_bias: bool = True
  decode: bool = False
  normalize_qk: bool = False
  attention: str = "spectraformer"
  component: str = "posrf"
  weight: str = "iid"
  num_features: int = 128
  weight_kwargs: Optional[dict] = None
  redraw: str = "never"
  is_causal: bool = False
  chunk_size: int = attn.DEFAULT_CHUNK_SIZE
  eps: float = attn.DEFAULT_EPS
  kv_mask_is_prefix: Optional[bool] = None
  fused: bool = True
  implementation: str = pallas_attention.DEFAULT_IMPLEMENTATION

  def _init_key(self):
    if self.has_rng(FEATURES_STREAM):
      return self.make_rng(FEATURES_STREAM)
    return self.make_rng("params")

  def _weight_matrix(self, spec, head_dim):
    """Returns W [m, head_dim] (float32), creating its state on first use."""
    m, kw = int(self.num_features), self.weight_kwargs
    if spec.learnable:
      # One key for both parts of the draw (Flax also traces the param initialiser, with
      # its own rng, to check shapes in apply).
      key = self._init_key() if self.is_initializing() else None
      wparams = self.param("weight", lambda rng: _draw(spec, rng if key is None else key, m,
                                                       head_dim, kw)[0])
      buffers = self.variable(RF_COLLECTION, "buffers",
                              lambda: _draw(spec, key, m, head_dim, kw)[1])
      return jnp.asarray(spec.matrix(wparams, buffers.value), jnp.float32)
    stored = self.variable(RF_COLLECTION, "W",
                           lambda: _fixed_matrix(spec, self._init_key(), m, head_dim, kw))
    if (self.redraw == "always" and not self.is_initializing()
        and self.has_rng(FEATURES_STREAM)):
      return _fixed_matrix(spec, self.make_rng(FEATURES_STREAM), m, head_dim, kw)
    return jax.lax.stop_gradient(stored.value)

  def _decode(self, query, key, value, comp, W, cparams, masks):
    """Flax's autoregressive cache: the first call creates the empty cache and returns None
    (the caller attends in parallel); later calls take one token, update the cache and
    return ``[batch..., 1, heads, dv]``."""
    initialized = self.has_variable("cache", "state")
    cache = self.variable("cache", "state", _empty_cache, comp, self.num_features,
                          query.shape[:-3] + (self.num_heads,), key.shape, value.shape,
                          key.dtype)
    if not self.is_causal or initialized:
      _check_decode_step(query, masks, self.is_causal)
    if not initialized:
      return None
    cache.value, out = _decode_step(cache.value, query, key, value, comp, W, cparams, self.eps,
                                    self.precision)
    return out.astype(self.dtype or query.dtype)

  @nn.compact
  def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, inputs_kv=None, mask=None,
               kv_mask=None, q_mask=None, deterministic=None, dropout_rng=None,
               sow_weights: bool = False):
    """Same call as Flax's layer plus ``kv_mask [batch..., kv_len]`` and
    ``q_mask [batch..., q_len]`` (bool, True = real token; any shape that broadcasts, e.g. one
    ``[kv_len]`` mask for every row).  ``sow_weights`` is accepted and ignored (there is no
    attention matrix)."""
    del sow_weights
    self_attention = inputs_kv is None and (inputs_k is None or inputs_k is inputs_q)
    if inputs_kv is not None:
      if inputs_k is not None or inputs_v is not None:
        raise ValueError("If inputs_kv is given, inputs_k and inputs_v must be None.")
      inputs_k = inputs_v = inputs_kv
    else:
      inputs_k, inputs_v = _default_kv(inputs_q, inputs_k, inputs_v)
    features = self.out_features or inputs_q.shape[-1]
    qkv_features = self.qkv_features or inputs_q.shape[-1]
    comp, spec = _validate(self.attention, self.redraw, self.num_features, self.num_heads,
                           qkv_features, self.component, self.weight, self.chunk_size)
    head_dim = qkv_features // self.num_heads
    batch = tuple(inputs_q.shape[:-2])
    kv_mask = attn.broadcast_mask(kv_mask, inputs_k.shape[:-2], inputs_k.shape[-2], "kv_mask")
    q_mask = _self_attention_q_mask(
        attn.broadcast_mask(q_mask, batch, inputs_q.shape[-2], "q_mask"), kv_mask, self_attention)
    mask = _check_dense_mask(mask, batch, inputs_q.shape[-2], inputs_k.shape[-2])
    if self.is_causal and inputs_q.shape[-2] != inputs_k.shape[-2]:
      raise ValueError(f"is_causal needs q_len == kv_len, got {inputs_q.shape[-2]} and "
                       f"{inputs_k.shape[-2]}.")

    dense = lambda name: nn.DenseGeneral(
        features=(self.num_heads, head_dim), axis=-1, dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=self.kernel_init, bias_init=self.bias_init,
        use_bias=self.use_bias, precision=self.precision, name=name)
    query, key, value = dense("query")(inputs_q), dense("key")(inputs_k), dense("value")(inputs_v)
    if self.normalize_qk:
      query = nn.LayerNorm(name="query_ln", use_bias=False, dtype=self.dtype,
                           param_dtype=self.param_dtype)(query)
      key = nn.LayerNorm(name="key_ln", use_bias=False, dtype=self.dtype,
                         param_dtype=self.param_dtype)(key)

    W = cparams = None
    if comp is not None:
      W = self._weight_matrix(spec, head_dim)
      if comp.init_params is not None:
        cparams = self.param("component", lambda rng: comp.init_params(rng, head_dim))

    out = nn.DenseGeneral(
        features=features, axis=(-2, -1), kernel_init=self.out_kernel_init or self.kernel_init,
        bias_init=self.out_bias_init or self.bias_init, use_bias=self.use_bias,
        dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision, name="out")
    if self.decode:
      decoded = self._decode(query, key, value, comp, W, cparams, (mask, kv_mask, q_mask))
      if decoded is not None:
        return out(decoded)

    if self.dropout_rate > 0.0:
      m_det = nn.merge_param("deterministic", self.deterministic, deterministic)
      if not m_det and dropout_rng is None:
        dropout_rng = self.make_rng("dropout")
    else:
      m_det = True

    x = _attend(query, key, value, attention=self.attention, comp=comp, W=W, cparams=cparams,
                dense_mask=mask, kv_mask=kv_mask, q_mask=q_mask, is_causal=self.is_causal,
                chunk_size=self.chunk_size, eps=self.eps, precision=self.precision,
                kv_mask_is_prefix=self.kv_mask_is_prefix, dropout_rng=dropout_rng,
                dropout_rate=self.dropout_rate, broadcast_dropout=self.broadcast_dropout,
                deterministic=m_det, out_dtype=self.dtype or query.dtype, fused=self.fused,
                implementation=self.implementation)
    return out(x)


def redraw_random_features(module, variables, key, *example_args, **example_kwargs):
  """Returns ``variables`` with every fixed W of the ``"random_features"`` collection redrawn.

  ``module`` is the (top-level) linen model and ``example_args`` / ``example_kwargs`` inputs
  it accepts (only their shapes matter): the collection is rebuilt by ``module.init`` with
  ``key`` as the ``"features"`` stream, and learnable weights' ``buffers`` are kept.  Pure and
  jittable; under ``jit`` only the draws of W run (the rest of ``init`` is dead code).
  Variables without the collection (e.g. softmax layers only) are returned unchanged.
  """
  if RF_COLLECTION not in variables:
    return variables
  if not example_args and not example_kwargs:
    raise TypeError("redraw_random_features(module, variables, key, *example_args) needs "
                    "example inputs of the module (e.g. the batch used for init) to rebuild "
                    "the random_features collection.")
  params_key, features_key, dropout_key = jax.random.split(_as_key(key), 3)
  fresh = module.init({"params": params_key, FEATURES_STREAM: features_key,
                       "dropout": dropout_key}, *example_args, **example_kwargs)[RF_COLLECTION]
  keep = lambda path: any(getattr(p, "key", None) == "buffers" for p in path)
  rf = jax.tree_util.tree_map_with_path(lambda path, old, new: old if keep(path) else new,
                                        variables[RF_COLLECTION], fresh)
  if hasattr(variables, "copy") and type(variables).__name__ == "FrozenDict":
    return variables.copy({RF_COLLECTION: rf})
  out = dict(variables)
  out[RF_COLLECTION] = rf
  return out


# ----------------------------------------------------------------------------- nnx


class RandomFeatures(nnx.Variable):
  """Non-trainable, redrawable random-feature state (a fixed weight matrix's buffers)."""


class WeightBuffers(nnx.Variable):
  """Non-trainable buffers of a learnable weight matrix (never redrawn)."""


def _to_vars(tree, cls):
  if isinstance(tree, dict):
    return nnx.Dict({k: _to_vars(v, cls) for k, v in tree.items()})
  return cls(jnp.asarray(tree))


def _from_vars(tree):
  if isinstance(tree, nnx.Variable):
    return tree[...]
  return {k: _from_vars(v) for k, v in tree.items()}


def _stream(rngs, name, fallback):
  try:
    return getattr(rngs, name)
  except (AttributeError, KeyError, ValueError):
    return getattr(rngs, fallback)


class RFMultiHeadAttention(nnx.Module):
  """Drop-in for ``flax.nnx.MultiHeadAttention`` with random-feature attention.

  Constructor as Flax's (``num_heads, in_features, qkv_features, out_features, num_kv_heads,
  in_kv_features, *, dtype, param_dtype, broadcast_dropout, dropout_rate, deterministic,
  precision, kernel_init, out_kernel_init, bias_init, out_bias_init, use_bias, decode,
  normalize_qk, rngs, keep_rngs``) plus the extras of the module doc.  W is drawn from
  ``rngs.features`` (falling back to ``rngs.params``).  Grouped-query attention
  (``num_kv_heads < num_heads``) repeats the key/value heads.
  """

  def __init__(self, num_heads: int, in_features: int, qkv_features: Optional[int] = None,
               out_features: Optional[int] = None, num_kv_heads: Optional[int] = None,
               in_kv_features: Optional[int] = None, *, dtype=None, param_dtype=jnp.float32,
               broadcast_dropout: bool = True, dropout_rate: float = 0.0,
               deterministic: Optional[bool] = None, precision=None,
               kernel_init=default_kernel_init, out_kernel_init=None,
               bias_init=nn.initializers.zeros_init(), out_bias_init=None,
               use_bias: bool = True, decode: Optional[bool] = None, normalize_qk: bool = False,
               rngs: nnx.Rngs, keep_rngs: bool = True, attention: str = "spectraformer",
               component: str = "posrf", weight: str = "iid", num_features: int = 128,
               weight_kwargs: Optional[dict] = None, redraw: str = "never",
               is_causal: bool = False, chunk_size: int = attn.DEFAULT_CHUNK_SIZE,
               eps: float = attn.DEFAULT_EPS, kv_mask_is_prefix: Optional[bool] = None,
               fused: bool = True,
               implementation: str = pallas_attention.DEFAULT_IMPLEMENTATION):
    self.num_heads = num_heads
    self.in_features = in_features
    self.qkv_features = qkv_features if qkv_features is not None else in_features
    self.out_features = out_features if out_features is not None else in_features
    self.in_kv_features = in_kv_features if in_kv_features is not None else in_features
    self.num_kv_heads = num_kv_heads if num_kv_heads is not None else num_heads
    if self.num_heads % self.num_kv_heads != 0:
      raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads "
                       f"({self.num_kv_heads}).")
    comp, spec = _validate(attention, redraw, num_features, num_heads, self.qkv_features,
                           component, weight, chunk_size)
    self.dtype, self.param_dtype = dtype, param_dtype
    self.broadcast_dropout, self.dropout_rate = broadcast_dropout, dropout_rate
    self.deterministic, self.precision = deterministic, precision
    self.use_bias, self.decode, self.normalize_qk = use_bias, decode, normalize_qk
    self.attention, self.component, self.weight = attention, component, weight
    self.num_features = num_features
    self.weight_kwargs = tuple(sorted(dict(weight_kwargs or {}).items()))
    self.redraw, self.is_causal, self.chunk_size = redraw, is_causal, chunk_size
    self.eps, self.kv_mask_is_prefix, self.fused = eps, kv_mask_is_prefix, fused
    self.implementation = implementation
    self.head_dim = self.qkv_features // self.num_heads

    lin = lambda fin, nh: nnx.LinearGeneral(
        fin, out_features=(nh, self.head_dim), dtype=dtype, param_dtype=param_dtype,
        kernel_init=kernel_init, bias_init=bias_init, use_bias=use_bias, precision=precision,
        rngs=rngs)
    self.query = lin(self.in_features, self.num_heads)
    self.key = lin(self.in_kv_features, self.num_kv_heads)
    self.value = lin(self.in_kv_features, self.num_kv_heads)
    if normalize_qk:
      self.query_ln = nnx.LayerNorm(self.head_dim, use_bias=False, dtype=dtype,
                                    param_dtype=param_dtype, rngs=rngs)
      self.key_ln = nnx.LayerNorm(self.head_dim, use_bias=False, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
    else:
      self.query_ln = nnx.data(None)
      self.key_ln = nnx.data(None)
    self.out = nnx.LinearGeneral(
        in_features=(self.num_heads, self.head_dim), out_features=self.out_features,
        axis=(-2, -1), kernel_init=out_kernel_init or kernel_init,
        bias_init=out_bias_init or bias_init, use_bias=use_bias, dtype=dtype,
        param_dtype=param_dtype, precision=precision, rngs=rngs)
    self.rngs = rngs.dropout.fork() if keep_rngs and dropout_rate > 0 else nnx.data(None)

    self.cache = nnx.data(None)
    self.random_features = nnx.data(None)
    self.weight_params = nnx.data(None)
    self.weight_buffers = nnx.data(None)
    self.component_params = nnx.data(None)
    self.feature_rngs = nnx.data(None)
    if comp is not None:
      wkey = _stream(rngs, FEATURES_STREAM, "params")()
      params, buffers = _draw(spec, wkey, num_features, self.head_dim, self.weight_kwargs)
      if spec.learnable:
        self.weight_params = _to_vars(dict(params), nnx.Param)
        self.weight_buffers = _to_vars(dict(buffers), WeightBuffers)
      else:
        self.random_features = _to_vars(dict(buffers), RandomFeatures)
        if params:
          self.weight_buffers = _to_vars(dict(params), WeightBuffers)
      if comp.init_params is not None:
        self.component_params = _to_vars(comp.init_params(rngs.params(), self.head_dim),
                                         nnx.Param)
      if redraw == "always" and keep_rngs:
        self.feature_rngs = _stream(rngs, FEATURES_STREAM, "params").fork()

  def _specs(self):
    return registry.check_pair(self.component, self.weight)

  def init_cache(self, input_shape, dtype=jnp.float32) -> None:
    """Flax's nnx decoding convention: an empty cache for inputs ``[batch..., length,
    features]``, then ``decode=True`` calls take one token each.  Random features keep the
    recurrent state (independent of ``length``), softmax and flash a key-value cache."""
    comp = self._specs()[0] if self.attention == "spectraformer" else None
    kv_shape = tuple(input_shape[:-1]) + (self.num_heads, self.head_dim)
    state = _empty_cache(comp, self.num_features, tuple(input_shape[:-2]) + (self.num_heads,),
                         kv_shape, kv_shape, dtype)
    self.cache = _to_vars({k: v for k, v in state._asdict().items() if v is not None},
                          nnx.Cache)

  def weight_matrix(self, key=None):
    """W [m, head_dim] float32: stored, or freshly drawn from ``key`` (fixed weights)."""
    comp, spec = self._specs()
    if spec.learnable:
      return jnp.asarray(spec.matrix(_from_vars(self.weight_params),
                                     _from_vars(self.weight_buffers)), jnp.float32)
    if key is not None:
      w = _fixed_matrix(spec, key, self.num_features, self.head_dim, self.weight_kwargs)
    else:
      params = {} if self.weight_buffers is None else _from_vars(self.weight_buffers)
      w = jnp.asarray(spec.matrix(params, _from_vars(self.random_features)), jnp.float32)
    return jax.lax.stop_gradient(w)

  def redraw_features(self, key):
    """Redraws the fixed W in place from ``key`` (no-op for learnable weights/softmax)."""
    if self.attention != "spectraformer":
      return
    _, spec = self._specs()
    if spec.learnable:
      return
    params, buffers = _draw(spec, _as_key(key), self.num_features, self.head_dim,
                            self.weight_kwargs)
    for name, val in jax.tree_util.tree_flatten_with_path(dict(buffers))[0]:
      node = self.random_features
      for p in name[:-1]:
        node = node[p.key]
      node[name[-1].key][...] = val
    if params and self.weight_buffers is not None:
      for name, val in jax.tree_util.tree_flatten_with_path(dict(params))[0]:
        node = self.weight_buffers
        for p in name[:-1]:
          node = node[p.key]
        node[name[-1].key][...] = val

  def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, mask=None, kv_mask=None,
               q_mask=None, deterministic: Optional[bool] = None, rngs=None,
               sow_weights: bool = False, decode: Optional[bool] = None,
               is_causal: Optional[bool] = None, out_sharding=None, qkv_sharding=None):
    """Same call as ``flax.nnx.MultiHeadAttention`` plus ``kv_mask``/``q_mask`` (as in
    ``RFMultiHeadDotProductAttention``: ``[batch..., len]`` or broadcasting to it).  ``is_causal``
    defaults to the constructor's; ``rngs`` (an ``nnx.Rngs``) feeds dropout and, with
    ``redraw='always'``, its ``features`` stream."""
    del sow_weights
    decode = self.decode if decode is None else decode
    features_stream = self.feature_rngs
    if isinstance(rngs, nnx.Rngs):
      if self.redraw == "always":
        with contextlib.suppress(AttributeError, KeyError, ValueError):  # no such stream
          features_stream = getattr(rngs, FEATURES_STREAM)
      drop_stream = rngs.dropout
    else:
      drop_stream = rngs if rngs is not None else self.rngs
    self_attention = inputs_k is None or inputs_k is inputs_q
    inputs_k, inputs_v = _default_kv(inputs_q, inputs_k, inputs_v)
    if inputs_q.shape[-1] != self.in_features:
      raise ValueError(f"Incompatible input dimension, got {inputs_q.shape[-1]} but module "
                       f"expects {self.in_features}.")
    causal = self.is_causal if is_causal is None else bool(is_causal)
    batch = tuple(inputs_q.shape[:-2])
    kv_mask = attn.broadcast_mask(kv_mask, inputs_k.shape[:-2], inputs_k.shape[-2], "kv_mask")
    q_mask = _self_attention_q_mask(
        attn.broadcast_mask(q_mask, batch, inputs_q.shape[-2], "q_mask"), kv_mask, self_attention)
    mask = _check_dense_mask(mask, batch, inputs_q.shape[-2], inputs_k.shape[-2])
    if causal and inputs_q.shape[-2] != inputs_k.shape[-2]:
      raise ValueError(f"is_causal needs q_len == kv_len, got {inputs_q.shape[-2]} and "
                       f"{inputs_k.shape[-2]}.")
    kw = {} if qkv_sharding is None else {"out_sharding": qkv_sharding}
    query, key, value = (self.query(inputs_q, **kw), self.key(inputs_k, **kw),
                         self.value(inputs_v, **kw))
    if self.normalize_qk:
      query, key = self.query_ln(query), self.key_ln(key)
    if self.num_kv_heads != self.num_heads:
      rep = self.num_heads // self.num_kv_heads
      key, value = jnp.repeat(key, rep, axis=-2), jnp.repeat(value, rep, axis=-2)

    comp = W = cparams = None
    if self.attention == "spectraformer":
      comp, _ = self._specs()
      draw_key = features_stream() if (self.redraw == "always"
                                       and features_stream is not None) else None
      W = self.weight_matrix(draw_key)
      if self.component_params is not None:
        cparams = _from_vars(self.component_params)

    if decode:
      _check_decode_step(query, (mask, kv_mask, q_mask), causal)
      if self.cache is None:
        raise ValueError("decode=True needs an empty cache first: call init_cache(input_shape).")
      stored = _from_vars(self.cache)
      state = (recurrent.KVCache(**stored) if comp is None
               else recurrent.RecurrentState(**{"z_abs": None, **stored}))
      state, x = _decode_step(state, query, key, value, comp, W, cparams, self.eps,
                              self.precision)
      for name, val in state._asdict().items():
        if val is not None:
          self.cache[name][...] = val
      return self.out(x.astype(self.dtype or query.dtype))

    if self.dropout_rate > 0.0:
      det = deterministic if deterministic is not None else self.deterministic
      if det is None:
        raise ValueError("No `deterministic` argument was provided to RFMultiHeadAttention "
                         "as either a __call__ argument or class attribute.")
      if not det and drop_stream is None:
        raise ValueError("'rngs' must be provided to __call__ when keep_rngs=False.")
      dropout_rng = None if det else drop_stream()
    else:
      det, dropout_rng = True, None

    x = _attend(query, key, value, attention=self.attention, comp=comp, W=W, cparams=cparams,
                dense_mask=mask, kv_mask=kv_mask, q_mask=q_mask, is_causal=causal,
                chunk_size=self.chunk_size, eps=self.eps, precision=self.precision,
                kv_mask_is_prefix=self.kv_mask_is_prefix, dropout_rng=dropout_rng,
                dropout_rate=self.dropout_rate, broadcast_dropout=self.broadcast_dropout,
                deterministic=det, out_dtype=self.dtype or query.dtype, fused=self.fused,
                implementation=self.implementation)
    if out_sharding is not None:
      return self.out(x, out_sharding=out_sharding)
    return self.out(x)


def redraw_random_features_nnx(model, key) -> None:
  """Redraws, in place, the fixed W of every ``RFMultiHeadAttention`` inside ``model`` (layer
  ``i`` in graph order gets ``fold_in(key, i)``).  Works eagerly and inside ``nnx.jit``."""
  key = _as_key(key)
  i = 0
  for _, node in nnx.iter_graph(model):
    if isinstance(node, RFMultiHeadAttention):
      node.redraw_features(jax.random.fold_in(key, i))
      i += 1
