"""Recurrent (one token at a time) causal attention: O(1) memory in the sequence length.

Causal random-feature attention at position t is

    out_t = phi(q_t)^T S_t / phi(q_t)^T z_t,   S_t = sum_{j <= t} phi(k_j) v_j^T,
                                               z_t = sum_{j <= t} phi(k_j),

so a decoder only needs ``S [F, dv]`` and ``z [F]`` (F feature columns), whatever t is.  The
features are taken in log form, ``phi_q = sq * exp(lq)``, ``phi_k = sk * exp(lk)`` (positive
components: ``sq = sk = 1``), as ``attention.causal_log_attention`` takes them, and the state
is stabilised as that function stabilises its chunk states: with the running per-column key
maximum ``mu_r = max_{j <= t} lk_jr``

    S_r = sum_{j <= t} exp(lk_jr - mu_r) sk_jr v_j,      z_r = sum_{j <= t} exp(lk_jr - mu_r) sk_jr,

rescaled by ``exp(mu_old - mu_new)`` when a new key raises ``mu``.  The query side shifts by
``T = max_r (lq_r + mu_r)``: the scale ``exp(-T)`` cancels between numerator and normaliser, and
for positive features the column reaching ``T`` gives ``den >= 1`` (no underflow).  Signed
features (TrigRF) also carry ``z_abs_r = sum_j exp(lk_jr - mu_r) |sk_jr|`` for the normaliser
guard of ``attention`` (``den >= eps * |phi_q|^T z_abs`` in magnitude).  Components with
causal-safe features and no log form (``elu``, ``relu``, ``hedgehog``) enter with
``lq = lk = 0``, ``sq = phi_q``, ``sk = phi_k``.

Softmax has no such state; ``kv_cache_init`` / ``kv_cache_step`` keep Flax's key-value cache
(memory linear in the maximum length) for the exact baselines.

Shapes: ``...`` are the leading dims (batch, heads); one call handles one position.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from spectraformer_jax import components
from spectraformer_jax import exact
from spectraformer_jax import linear
from spectraformer_jax import registry
from spectraformer_jax._dtypes import f32 as _f32


class RecurrentState(NamedTuple):
  """State after t keys: ``s float32[..., F, dv]``, ``z float32[..., F]``, ``mu float32[..., F]``
  (running key-column maximum of ``lk``; ``-inf`` before the first key) and ``z_abs
  float32[..., F]`` for signed features (None for positive ones)."""
  s: jax.Array
  z: jax.Array
  mu: jax.Array
  z_abs: Optional[jax.Array]


class TokenFeatures(NamedTuple):
  """One position's features in log form: ``lq, lk float32[..., F|1]`` (broadcast along the
  features) and signed factors ``sq, sk float32[..., F]`` (None for positive features)."""
  lq: jax.Array
  lk: jax.Array
  sq: Optional[jax.Array]
  sk: Optional[jax.Array]


def init_state(lead: tuple[int, ...], num_columns: int, value_dim: int,
               signed: bool) -> RecurrentState:
  """The empty state (no key seen) for leading dims ``lead``: ``S = 0 [*lead, F, dv]``,
  ``z = 0``, ``mu = -inf`` ``[*lead, F]``, ``z_abs = 0`` if ``signed`` else None."""
  zeros = jnp.zeros(tuple(lead) + (num_columns,), jnp.float32)
  return RecurrentState(jnp.zeros(tuple(lead) + (num_columns, value_dim), jnp.float32), zeros,
                        jnp.full_like(zeros, -jnp.inf), zeros if signed else None)


def token_features(spec, x: jax.Array, y: jax.Array, W: jax.Array, params=None) -> TokenFeatures:
  """Causal features of one position of a component (``registry.ComponentSpec``).

  ``x, y float32[..., d]``: the query and key, already scaled by ``d**-0.25``; ``W [m, d]``.
  Positive log-linear components give ``lq = xq . w_r + col_r + row_q`` (likewise ``lk``),
  signed ones their ``log_features``, causal-safe feature maps ``lq = lk = 0`` with their
  features as signed factors; data-dependent statistics take their causal (neutral) values.
  Raises ValueError for a component without a causal form.
  """
  x, y = _f32(x)[..., None, :], _f32(y)[..., None, :]
  one = lambda t: t[..., 0, :]
  if spec.log_linear is not None:
    form = spec.log_linear(x, y, W, params=params, causal=True)
    return TokenFeatures(one(components.log_linear_logits(form.xq, W, form.col, form.row_q)),
                         one(components.log_linear_logits(form.xk, W, form.col, form.row_k)),
                         None, None)
  if spec.log_features is not None:
    lq, lk, sq, sk = spec.log_features(x, y, W, params=params, causal=True)
    return TokenFeatures(one(lq), one(lk), one(sq), one(sk))
  if spec.causal_features:
    phi_q, phi_k = spec.features(x, y, W, params=params)
    zero = jnp.zeros(phi_q.shape[:-2] + (1,), jnp.float32)
    return TokenFeatures(zero, zero, one(_f32(phi_q)), one(_f32(phi_k)))
  raise ValueError(
      f"Component {spec.name!r} has no causal form, so it cannot decode recurrently; causal "
      f"components: {[c for c in registry.component_names() if registry.supports_causal(c)]}.")


def step(state: RecurrentState, features: TokenFeatures, v: jax.Array, *,
         eps: float = linear.DEFAULT_EPS, precision=None) -> tuple[RecurrentState, jax.Array]:
  """Adds key t (``features.lk, sk``, value ``v float32[..., dv]``) to the state, then attends
  with query t; returns ``(new state, out float32[..., dv])`` (module doc for the formulas).

  ``out`` equals position t of ``attention.causal_log_attention`` on the same features (up to
  float32 rounding); the normaliser guard applies when the state carries ``z_abs``.
  """
  lq, lk, sq, sk = features
  f = state.z.shape[-1]
  lk = jnp.broadcast_to(lk, lk.shape[:-1] + (f,))
  mu = jnp.maximum(state.mu, lk)
  decay = jnp.exp(state.mu - mu)  # 0 before the first key (mu_old = -inf)
  kf = jnp.exp(lk - mu)
  if sk is not None:
    kf = kf * sk
  s = decay[..., None] * state.s + kf[..., None] * _f32(v)[..., None, :]
  z = decay * state.z + kf
  z_abs = None if state.z_abs is None else decay * state.z_abs + jnp.abs(kf)
  logit = lq + mu
  qf = jnp.exp(logit - jax.lax.stop_gradient(jnp.max(logit, -1, keepdims=True)))
  if sq is not None:
    qf = qf * sq
  num = jnp.einsum("...f,...fd->...d", qf, s, precision=precision)
  den = jnp.einsum("...f,...f->...", qf, z, precision=precision)
  mag = None if z_abs is None else jnp.einsum("...f,...f->...", jnp.abs(qf), z_abs,
                                              precision=precision)
  out = linear.guarded_divide(num, den, mag, eps)
  return RecurrentState(s, z, mu, z_abs), out


class KVCache(NamedTuple):
  """Flax's autoregressive key-value cache, Flax layout: ``key [batch..., L, heads, dk]``,
  ``value [batch..., L, heads, dv]`` (L = the length of the initialisation call) and
  ``index int32[]``, the next position."""
  key: jax.Array
  value: jax.Array
  index: jax.Array


def kv_cache_init(key_shape: tuple[int, ...], value_shape: tuple[int, ...], dtype) -> KVCache:
  """An empty cache for keys ``[batch..., L, heads, dk]`` and values ``[batch..., L, heads,
  dv]``."""
  return KVCache(jnp.zeros(key_shape, dtype), jnp.zeros(value_shape, dtype),
                 jnp.zeros((), jnp.int32))


def kv_cache_step(cache: KVCache, q: jax.Array, k: jax.Array, v: jax.Array, *,
                  precision=None) -> tuple[KVCache, jax.Array]:
  """Writes key/value t (``k, v [batch..., 1, heads, d]``) at ``cache.index`` and attends with
  ``q [batch..., 1, heads, dk]`` over positions ``<= t``: exact softmax,
  ``attention.masked_softmax_attention``, float32 ``[batch..., 1, heads, dv]``.  The index
  is clamped to the cache (``dynamic_update_slice``): decode at most L tokens."""
  put = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype),
                                                           cache.index, axis=-3)
  keys, values = put(cache.key, k), put(cache.value, v)
  allowed = jnp.arange(keys.shape[-3]) <= cache.index
  out = exact.masked_softmax_attention(q, keys, values, allowed, precision=precision)
  return KVCache(keys, values, cache.index + 1), out
