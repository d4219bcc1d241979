"""The linen layer ``RFMultiHeadDotProductAttention`` (drop-in for
``flax.linen.MultiHeadDotProductAttention``) and ``redraw_random_features``; the package
docstring (``spectraformer_jax.layers``) describes the extras, the state and dropout."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from spectraformer_jax import attention as attn
from spectraformer_jax import pallas_attention
from spectraformer_jax.layers import core


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
  kernel_init: Callable = core.default_kernel_init
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
    if self.has_rng(core.FEATURES_STREAM):
      return self.make_rng(core.FEATURES_STREAM)
    return self.make_rng("params")

  def _weight_matrix(self, spec, head_dim):
    """Returns W [m, head_dim] (float32), creating its state on first use."""
    m, kw = int(self.num_features), self.weight_kwargs
    if spec.learnable:
      # One key for both parts of the draw (Flax also traces the param initialiser, with
      # its own rng, to check shapes in apply).
      key = self._init_key() if self.is_initializing() else None
      wparams = self.param("weight", lambda rng: core.draw(spec, rng if key is None else key, m,
                                                           head_dim, kw)[0])
      buffers = self.variable(core.RF_COLLECTION, "buffers",
                              lambda: core.draw(spec, key, m, head_dim, kw)[1])
      return jnp.asarray(spec.matrix(wparams, buffers.value), jnp.float32)
    stored = self.variable(core.RF_COLLECTION, "W",
                           lambda: core.fixed_matrix(spec, self._init_key(), m, head_dim, kw))
    if (self.redraw == "always" and not self.is_initializing()
        and self.has_rng(core.FEATURES_STREAM)):
      return core.fixed_matrix(spec, self.make_rng(core.FEATURES_STREAM), m, head_dim, kw)
    return jax.lax.stop_gradient(stored.value)

  def _decode(self, query, key, value, comp, W, cparams, masks):
    """Flax's autoregressive cache: the first call creates the empty cache and returns None
    (the caller attends in parallel); later calls take one token, update the cache and
    return ``[batch..., 1, heads, dv]``."""
    initialized = self.has_variable("cache", "state")
    cache = self.variable("cache", "state", core.empty_cache, comp, self.num_features,
                          query.shape[:-3] + (self.num_heads,), key.shape, value.shape,
                          key.dtype)
    if not self.is_causal or initialized:
      core.check_decode_step(query, masks, self.is_causal)
    if not initialized:
      return None
    cache.value, out = core.decode_step(cache.value, query, key, value, comp, W, cparams, self.eps,
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
      inputs_k, inputs_v = core.default_kv(inputs_q, inputs_k, inputs_v)
    features = self.out_features or inputs_q.shape[-1]
    qkv_features = self.qkv_features or inputs_q.shape[-1]
    comp, spec = core.validate(self.attention, self.redraw, self.num_features, self.num_heads,
                               qkv_features, self.component, self.weight, self.chunk_size)
    head_dim = qkv_features // self.num_heads
    batch = tuple(inputs_q.shape[:-2])
    kv_mask = attn.broadcast_mask(kv_mask, inputs_k.shape[:-2], inputs_k.shape[-2], "kv_mask")
    q_mask = core.self_attention_q_mask(
        attn.broadcast_mask(q_mask, batch, inputs_q.shape[-2], "q_mask"), kv_mask, self_attention)
    mask = core.check_dense_mask(mask, batch, inputs_q.shape[-2], inputs_k.shape[-2])
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

    x = core.attend(query, key, value, attention=self.attention, comp=comp, W=W, cparams=cparams,
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
  if core.RF_COLLECTION not in variables:
    return variables
  if not example_args and not example_kwargs:
    raise TypeError("redraw_random_features(module, variables, key, *example_args) needs "
                    "example inputs of the module (e.g. the batch used for init) to rebuild "
                    "the random_features collection.")
  params_key, features_key, dropout_key = jax.random.split(core.as_key(key), 3)
  fresh = module.init({"params": params_key, core.FEATURES_STREAM: features_key,
                       "dropout": dropout_key}, *example_args, **example_kwargs)[core.RF_COLLECTION]
  keep = lambda path: any(getattr(p, "key", None) == "buffers" for p in path)
  rf = jax.tree_util.tree_map_with_path(lambda path, old, new: old if keep(path) else new,
                                        variables[core.RF_COLLECTION], fresh)
  if hasattr(variables, "copy") and type(variables).__name__ == "FrozenDict":
    return variables.copy({core.RF_COLLECTION: rf})
  out = dict(variables)
  out[core.RF_COLLECTION] = rf
  return out
