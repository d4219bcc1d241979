"""Random-feature attention in Flax's layout, and the Flax ``attention_fn`` hook.

``rf_attention`` and the function returned by ``make_attention_fn`` take Flax's layout:
``[batch..., len, heads, head_dim]`` with masks ``[batch..., len]`` (True = real token).  They
compute the features of a component (``registry``) and hand them to the cores: ``linear``
(bidirectional, with the normaliser guard), ``causal`` (prefix sums; log-features stabilised
prefix by prefix), ``fused`` / ``pallas_attention`` (positive log-linear components without
materialising the features).  The exact references live in ``exact``.  The cores' public
functions are importable from here too (``attention.linear_attention``, ...).

Dropout
-------
There is no attention matrix to drop entries from.  ``dropout_rate`` drops whole *keys*: key
``j`` of a head is kept with probability ``1 - p`` and its value scaled by ``1 / (1 - p)`` in the
numerator only (the normaliser keeps every key).  This equals Flax's attention-weight dropout
with the dropout mask shared along the query axis: ``out_i = sum_j a_ij (m_j / (1 - p)) v_j``,
unbiased like the stock one.  ``broadcast_dropout=True`` shares the mask over the batch dims, as
in Flax.  The layers apply the same rule for ``attention='softmax'`` and ``'flash'`` so all
three modes regularise alike.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from spectraformer_jax import components
from spectraformer_jax import exact
from spectraformer_jax import fused as fused_lib
from spectraformer_jax import pallas_attention
from spectraformer_jax import pallas_causal
from spectraformer_jax import registry
from spectraformer_jax._dtypes import f32 as _f32
from spectraformer_jax.causal import DEFAULT_CHUNK_SIZE
from spectraformer_jax.causal import causal_linear_attention
from spectraformer_jax.causal import causal_linear_attention_reference
from spectraformer_jax.causal import causal_log_attention
from spectraformer_jax.causal import causal_prefix_product
from spectraformer_jax.exact import broadcast_mask
from spectraformer_jax.exact import flash_attention
from spectraformer_jax.exact import masked_softmax_attention
from spectraformer_jax.exact import softmax_attention
from spectraformer_jax.linear import DEFAULT_EPS
from spectraformer_jax.linear import UNDERFLOW
from spectraformer_jax.linear import linear_attention

__all__ = [
    "DEFAULT_CHUNK_SIZE", "DEFAULT_EPS", "UNDERFLOW", "broadcast_mask", "causal_linear_attention",
    "causal_linear_attention_reference", "causal_log_attention", "causal_prefix_product",
    "flash_attention", "key_dropout", "linear_attention", "make_attention_fn",
    "masked_softmax_attention", "reduce_dense_mask", "rf_attention", "rf_attention_heads",
    "softmax_attention", "to_heads",
]

Array = jax.Array


# ----------------------------------------------------------------------------- RF core


def _component_spec(component):
  if isinstance(component, str):
    return registry.get_component(component)
  return component


def to_heads(t):
  """[batch..., len, heads, d] -> [batch..., heads, len, d]."""
  return jnp.swapaxes(t, -3, -2)


def _feature_dtype(dtype):
  """Storage dtype of the fused path's feature maps: the inputs' if 16-bit float, else f32."""
  return dtype if dtype in (jnp.bfloat16, jnp.float16) else jnp.float32


def _log_features(spec, x, y, W, x_mask, y_mask, params):
  """Causal-mode log-features ``(lq, lk, sq, sk)`` of a component (``sq = sk = None`` for
  positive ones, from ``spec.log_linear``; signed ones from ``spec.log_features``)."""
  kw = dict(x_mask=x_mask, y_mask=y_mask, params=params, causal=True)
  if spec.log_linear is not None:
    form = spec.log_linear(x, y, W, **kw)
    return (components.log_linear_logits(form.xq, W, form.col, form.row_q),
            components.log_linear_logits(form.xk, W, form.col, form.row_k), None, None)
  return tuple(spec.log_features(x, y, W, **kw))


def rf_attention_heads(q, k, v, W, *, component, params=None, kv_mask=None, q_mask=None,
                       is_causal: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE,
                       eps: float = DEFAULT_EPS, precision=None, fused: bool = True,
                       implementation: str = pallas_attention.DEFAULT_IMPLEMENTATION):
  """The RF core on head-major arrays ``[..., len, d]`` (leading dims e.g. (batch, heads)) and
  masks ``[..., len]``; returns float32 ``[..., n, dv]``.  ``rf_attention`` wraps it."""
  spec = _component_spec(component)
  fusable = fused and spec.log_linear is not None
  uncovered = None
  if not fusable:
    uncovered = ("fused=False" if not fused
                 else f"component {spec.name!r} has no positive log-linear form")
  fd = _feature_dtype(jnp.dtype(q.dtype))
  impl = pallas_attention.select_implementation(implementation, uncovered, fd,
                                                causal=is_causal)
  d = q.shape[-1]
  scale = d ** -0.25
  x, y = _f32(q) * scale, _f32(k) * scale
  W = _f32(W)
  if W.ndim != 2 or W.shape[-1] != d:
    raise ValueError(f"W must be float32[num_features, head_dim={d}], got shape "
                     f"{tuple(W.shape)}.")
  xm = None if q_mask is None else jnp.broadcast_to(q_mask, x.shape[:-1])
  ym = None if kv_mask is None else jnp.broadcast_to(kv_mask, y.shape[:-1])
  if fusable and is_causal and impl == "pallas":
    form = spec.log_linear(x, y, W, x_mask=xm, y_mask=ym, params=params, causal=True)
    return pallas_causal.causal_rf_attention_pallas(form, W, v, ym, xm, feature_dtype=fd)
  if fusable and not is_causal:
    form = spec.log_linear(x, y, W, x_mask=xm, y_mask=ym, params=params)
    if impl == "pallas":
      return pallas_attention.positive_rf_attention_pallas(form, W, v, ym, xm, feature_dtype=fd)
    return fused_lib.positive_rf_attention(form, W, v, ym, xm, feature_dtype=fd)
  guard = not spec.positive
  if is_causal:
    if spec.log_linear is not None or spec.log_features is not None:
      lq, lk, sq, sk = _log_features(spec, x, y, W, xm, ym, params)
      return causal_log_attention(lq, lk, _f32(v), sq, sk, chunk_size, mask=ym, q_mask=xm,
                                  eps=eps, guard=guard, precision=precision)
    if not spec.causal_features:
      raise ValueError(
          f"Component {spec.name!r} has no causal form (its features use statistics of the "
          "whole sequence or a stabiliser shared across keys); causal attention takes one of "
          f"{[c for c in registry.component_names() if registry.supports_causal(c)]}.")
    phi_q, phi_k = spec.features(x, y, W, x_mask=xm, y_mask=ym, params=params)
    return causal_linear_attention(_f32(phi_q), _f32(phi_k), _f32(v), chunk_size, mask=ym,
                                   q_mask=xm, eps=eps, guard=guard, precision=precision)
  phi_q, phi_k = spec.features(x, y, W, x_mask=xm, y_mask=ym, params=params)
  phi_q, phi_k = _f32(phi_q), _f32(phi_k)
  return linear_attention(phi_q, phi_k, _f32(v), ym, xm, eps=eps, guard=guard,
                          precision=precision)


def rf_attention(q, k, v, W, *, component, params=None, kv_mask=None, q_mask=None,
                 is_causal: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 eps: float = DEFAULT_EPS, precision=None, fused: bool = True,
                 implementation: str = pallas_attention.DEFAULT_IMPLEMENTATION):
  """Random-feature attention, Flax layout: the pure core of the layers.

  Args:
    q: ``[batch..., q_len, heads, head_dim]``; k: ``[batch..., kv_len, heads, head_dim]``;
      v: ``[batch..., kv_len, heads, v_dim]``.
    W: ``float32[num_features, head_dim]`` (one matrix shared by all heads).
    component: a component name (``registry.get_component``) or a ``ComponentSpec``.
    params: learnable component parameters (``spec.init_params``), or None.
    kv_mask: ``bool[batch..., kv_len]``; q_mask: ``bool[batch..., q_len]`` (True = real; any
      shape that broadcasts, e.g. one ``[len]`` mask for the batch).
    is_causal: causal attention (``causal_log_attention``; needs q_len == kv_len);
      data-dependent statistics take their neutral values (``components`` module doc).
    chunk_size: chunk length of the causal prefix sums of the XLA path (the causal kernels
      keep their own, ``pallas_causal.causal_rf_attention_pallas``'s ``chunk_rows``).
    eps: relative normaliser floor (see module doc; active only for non-positive components).
    precision: precision of the attention contractions of the materialised path (features use
      HIGHEST projections).
    fused: for bidirectional attention with a positive log-linear component (every positive
      one: ``spec.log_linear``), use ``fused.positive_rf_attention``: the ``[len, m]`` feature
      maps are recomputed in the backward pass instead of stored, and kept in ``q``'s dtype
      when that is bfloat16/float16 (exponentials and accumulation stay float32).  False, or
      TrigRF, materialises float32 features and calls ``linear_attention``; causal attention
      runs ``causal_log_attention`` on float32 log-features, or, with a positive log-linear
      component and the pallas backend, ``pallas_causal.causal_rf_attention_pallas``.  All
      compute the same function.
    implementation: the fused path's backend: ``"pallas"`` (``pallas_attention`` or, causal,
      ``pallas_causal``: Pallas kernels, feature maps only as on-chip tiles; interpret mode off
      GPU), ``"xla"`` (``fused.positive_rf_attention`` or ``causal_log_attention``) or
      ``"auto"`` (pallas on GPU for bidirectional 16-bit inputs, xla elsewhere: the measured
      faster choice, ``pallas_attention.select_implementation``).  Where the kernels do not
      apply, pallas falls back to xla and says so once in the log
      (``pallas_attention.select_implementation``).

  q and k are scaled by ``head_dim**-0.25`` so ``phi(q).phi(k)`` estimates
  ``exp(q.k / sqrt(head_dim))``.  Features are max-stabilised (the constants cancel); the
  result is returned in ``q``'s dtype.
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  exact.check_qkv(q, k, v)
  kv_mask, q_mask = exact.flax_masks(q, k, kv_mask, q_mask)
  if is_causal and q.shape[-3] != k.shape[-3]:
    raise ValueError(f"is_causal needs q_len == kv_len, got {q.shape[-3]} and {k.shape[-3]}.")
  hm = lambda m: None if m is None else m[..., None, :]  # [batch..., 1, len] for the heads dim
  out = rf_attention_heads(to_heads(q), to_heads(k), to_heads(v), W, component=component,
                           params=params, kv_mask=hm(kv_mask), q_mask=hm(q_mask),
                           is_causal=is_causal, chunk_size=chunk_size, eps=eps,
                           precision=precision, fused=fused, implementation=implementation)
  return to_heads(out).astype(q.dtype)


# ----------------------------------------------------------------------------- dropout


def key_dropout(v, rng, rate: float, broadcast_dropout: bool = True, n_batch_dims: int = 1):
  """The layers' attention dropout (module doc): drops whole keys of ``v [batch..., kv_len,
  heads, dv]`` per (batch, key, head) with probability ``rate`` and rescales by ``1/(1-rate)``;
  applied to the values only, so normalisers keep every key.  ``broadcast_dropout`` shares the
  mask over the batch dims."""
  if rate <= 0.0:
    return v
  if rate >= 1.0:
    return jnp.zeros_like(v)
  shape = list(v.shape[:-1]) + [1]
  if broadcast_dropout:
    for i in range(n_batch_dims):
      shape[i] = 1
  keep = jax.random.bernoulli(rng, 1.0 - rate, tuple(shape))
  return jnp.where(keep, v / jnp.asarray(1.0 - rate, v.dtype), jnp.zeros((), v.dtype))


# ----------------------------------------------------------------------------- Flax hook


def reduce_dense_mask(mask, q_len: int, kv_len: int):
  """Reduces Flax's dense mask ``[batch..., heads|1, q_len, kv_len]`` to (key mask
  ``[batch..., heads|1, kv_len]``, query mask ``[batch..., heads|1, q_len]``).

  Assumes the mask is separable, ``mask[i, j] = q_ok(i) & kv_ok(j)`` (a padding mask), possibly
  intersected with a causal mask (give causality by ``is_causal``; the triangle itself is
  dropped).  A key is kept if any query may see it; a query if it may see any key.
  """
  mask = jnp.asarray(mask)
  if mask.ndim < 3 or mask.shape[-1] != kv_len or mask.shape[-2] not in (1, q_len):
    raise ValueError(f"mask must be Flax's dense [batch..., heads|1, q_len={q_len}, "
                     f"kv_len={kv_len}], got {tuple(mask.shape)}.")
  mask = mask.astype(bool)
  return jnp.any(mask, axis=-2), jnp.any(mask, axis=-1)


def make_attention_fn(component: str, weight: str, num_features: int, *,
                      key: Optional[Array] = None, seed: int = 0, W: Optional[Array] = None,
                      weight_kwargs: Optional[dict] = None, component_params: Any = None,
                      is_causal: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE,
                      eps: float = DEFAULT_EPS,
                      implementation: str = pallas_attention.DEFAULT_IMPLEMENTATION,
                      ) -> Callable[..., Array]:
  """Returns an ``attention_fn`` for Flax's stock attention layers.

  ``flax.linen.MultiHeadDotProductAttention(attention_fn=fn)`` and
  ``flax.nnx.MultiHeadAttention(attention_fn=fn)`` work as is.  The returned
  ``fn(query, key, value, mask=None, dropout_rng=None, dropout_rate=0., broadcast_dropout=True,
  deterministic=True, dtype=None, precision=None, is_causal=False, module=None, **unused)``
  takes ``[batch..., len, heads, head_dim]`` arrays.

  * W: drawn once per head_dim from ``key`` (default ``jax.random.key(seed)``) with
    ``registry.get_weight(weight).init`` (concretely, at the first trace), or given as ``W``.
    A learnable weight (fastfoodl, gmm) or component parameters are used *frozen at their
    initial values* here (the function has no parameters); train them with
    ``layers.RFMultiHeadDotProductAttention`` / ``layers.RFMultiHeadAttention`` instead.
  * mask: the stock layers pass a dense ``[batch..., heads|1, q_len, kv_len]`` boolean mask,
    which costs O(n^2) memory to build; it is reduced to key/query masks with
    ``reduce_dense_mask`` (assumes a separable padding mask; causality comes only from
    ``is_causal``, the factory's or nnx's call argument). Use the package's layers with
    ``kv_mask`` to keep memory linear.
  * dropout: key dropout on the values (module doc) when ``deterministic`` is False.
  * implementation: ``"auto" | "pallas" | "xla"``, as in ``rf_attention``.
  """
  pallas_attention.resolve_implementation(implementation)  # validates early
  comp, spec = registry.check_pair(component, weight)
  if not isinstance(num_features, (int, np.integer)) or num_features < 1:
    raise ValueError(f"num_features must be a positive int, got {num_features!r}.")
  num_features = int(num_features)
  wkw = dict(weight_kwargs or {})
  base_key = key if key is not None else jax.random.key(seed)
  cache: dict[int, tuple[Array, Any]] = {}

  def _materials(d):
    if d not in cache:
      with jax.ensure_compile_time_eval():
        if W is not None:
          w = jnp.asarray(W, jnp.float32)
          if w.shape != (num_features, d):
            raise ValueError(f"W must have shape (num_features={num_features}, head_dim={d}), "
                             f"got {tuple(w.shape)}.")
        else:
          wkey, _ = jax.random.split(base_key)
          p, b = spec.init(wkey, num_features, d, **wkw)
          w = jnp.asarray(spec.matrix(p, b), jnp.float32)
        cp = component_params
        if cp is None and comp.init_params is not None:
          cp = comp.init_params(jax.random.split(base_key)[1], d)
      cache[d] = (w, cp)
    return cache[d]

  def attention_fn(query, key, value, mask=None, dropout_rng=None, dropout_rate=0.0,
                   broadcast_dropout=True, deterministic=True, dtype=None, precision=None,
                   is_causal=False, module=None, **unused):
    del module, unused
    causal = bool(is_causal) or bool(_factory_causal)
    w, cp = _materials(query.shape[-1])
    q, k, v = to_heads(query), to_heads(key), to_heads(value)
    kvm = qm = None
    if mask is not None:
      kvm, qm = reduce_dense_mask(mask, query.shape[-3], key.shape[-3])
    if not deterministic and dropout_rate > 0.0:
      if dropout_rng is None:
        raise ValueError("dropout_rate > 0 with deterministic=False needs a dropout_rng.")
      v = to_heads(key_dropout(value, dropout_rng, dropout_rate, broadcast_dropout,
                                value.ndim - 3))
    out = rf_attention_heads(q, k, v, w, component=comp, params=cp, kv_mask=kvm, q_mask=qm,
                             is_causal=causal, chunk_size=chunk_size, eps=eps,
                             precision=precision, implementation=implementation)
    out_dtype = dtype if dtype is not None else query.dtype
    return to_heads(out).astype(out_dtype)

  _factory_causal = is_causal
  attention_fn.component = comp.name
  attention_fn.weight = spec.name
  attention_fn.num_features = num_features
  return attention_fn
