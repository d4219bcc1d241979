"""The nnx layer ``RFMultiHeadAttention`` (drop-in for ``flax.nnx.MultiHeadAttention``), its
variable types and ``redraw_random_features_nnx``; the package docstring
(``spectraformer_jax.layers``) describes the extras, the state and dropout."""

from __future__ import annotations

import contextlib
from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from spectraformer_jax import attention as attn
from spectraformer_jax import pallas_attention
from spectraformer_jax import recurrent
from spectraformer_jax import registry
from spectraformer_jax.layers import core


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
               kernel_init=core.default_kernel_init, out_kernel_init=None,
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
    comp, spec = core.validate(attention, redraw, num_features, num_heads, self.qkv_features,
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
      wkey = _stream(rngs, core.FEATURES_STREAM, "params")()
      params, buffers = core.draw(spec, wkey, num_features, self.head_dim, self.weight_kwargs)
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
        self.feature_rngs = _stream(rngs, core.FEATURES_STREAM, "params").fork()

  def _specs(self):
    return registry.check_pair(self.component, self.weight)

  def init_cache(self, input_shape, dtype=jnp.float32) -> None:
    """Flax's nnx decoding convention: an empty cache for inputs ``[batch..., length,
    features]``, then ``decode=True`` calls take one token each.  Random features keep the
    recurrent state (independent of ``length``), softmax and flash a key-value cache."""
    comp = self._specs()[0] if self.attention == "spectraformer" else None
    kv_shape = tuple(input_shape[:-1]) + (self.num_heads, self.head_dim)
    state = core.empty_cache(comp, self.num_features, tuple(input_shape[:-2]) + (self.num_heads,),
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
      w = core.fixed_matrix(spec, key, self.num_features, self.head_dim, self.weight_kwargs)
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
    params, buffers = core.draw(spec, core.as_key(key), self.num_features, self.head_dim,
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
          features_stream = getattr(rngs, core.FEATURES_STREAM)
      drop_stream = rngs.dropout
    else:
      drop_stream = rngs if rngs is not None else self.rngs
    self_attention = inputs_k is None or inputs_k is inputs_q
    inputs_k, inputs_v = core.default_kv(inputs_q, inputs_k, inputs_v)
    if inputs_q.shape[-1] != self.in_features:
      raise ValueError(f"Incompatible input dimension, got {inputs_q.shape[-1]} but module "
                       f"expects {self.in_features}.")
    causal = self.is_causal if is_causal is None else bool(is_causal)
    batch = tuple(inputs_q.shape[:-2])
    kv_mask = attn.broadcast_mask(kv_mask, inputs_k.shape[:-2], inputs_k.shape[-2], "kv_mask")
    q_mask = core.self_attention_q_mask(
        attn.broadcast_mask(q_mask, batch, inputs_q.shape[-2], "q_mask"), kv_mask, self_attention)
    mask = core.check_dense_mask(mask, batch, inputs_q.shape[-2], inputs_k.shape[-2])
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
      core.check_decode_step(query, (mask, kv_mask, q_mask), causal)
      if self.cache is None:
        raise ValueError("decode=True needs an empty cache first: call init_cache(input_shape).")
      stored = _from_vars(self.cache)
      state = (recurrent.KVCache(**stored) if comp is None
               else recurrent.RecurrentState(**{"z_abs": None, **stored}))
      state, x = core.decode_step(state, query, key, value, comp, W, cparams, self.eps,
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

    x = core.attend(query, key, value, attention=self.attention, comp=comp, W=W, cparams=cparams,
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
  key = core.as_key(key)
  i = 0
  for _, node in nnx.iter_graph(model):
    if isinstance(node, RFMultiHeadAttention):
      node.redraw_features(jax.random.fold_in(key, i))
      i += 1
