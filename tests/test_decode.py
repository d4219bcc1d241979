"""Recurrent decoding (``decode=True``) equals the parallel causal forward, with a state whose size
does not depend on the sequence length; clear errors where decoding is not defined."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lra_benchmarks import models
from spectraformer_jax import attention as attn
from spectraformer_jax import layers
from spectraformer_jax import recurrent
from spectraformer_jax import registry

EPS32 = float(np.finfo(np.float32).eps)
CAUSAL = [c for c in registry.component_names() if registry.supports_causal(c)]
B, H, L, D, M = 2, 2, 6, 8, 8


def _weight(component):
  valid = registry.get_component(component).weights or ("iid",)
  return "iid" if "iid" in valid else "identity"


def _condition(spec, x, y, W, params):
  """``mag_i / |den_i|`` of causal attention (1 for positive features): the factor by which
  the normaliser's cancellation amplifies float32 round-off, ``[..., L]``."""
  if spec.positive:
    return jnp.ones(x.shape[:-1])
  phi_q, phi_k = spec.features(x, y, W, params=params, stabilize=False)
  tri = jnp.tril(jnp.ones((x.shape[-2],) * 2))
  den = (jnp.einsum("...if,...jf->...ij", phi_q, phi_k) * tri).sum(-1)
  mag = (jnp.einsum("...if,...jf->...ij", jnp.abs(phi_q), jnp.abs(phi_k)) * tri).sum(-1)
  return mag / jnp.abs(den)


def _parallel_and_recurrent(component, q, k, v, key):
  """Parallel causal attention ``[B, H, L, dv]``, the same from ``recurrent.step`` one position
  at a time, the final state and the round-off condition ``[B, H, L]``."""
  spec = registry.get_component(component)
  wspec = registry.get_weight(_weight(component))
  W = wspec.matrix(*wspec.init(key, M, D))
  params = spec.init_params(key, D) if spec.init_params else None
  heads = lambda t: jnp.swapaxes(t, 1, 2)  # [B, H, L, d]
  x, y = heads(q) * D ** -0.25, heads(k) * D ** -0.25
  parallel = heads(attn.rf_attention(q, k, v, W, component=component, params=params,
                                     is_causal=True, chunk_size=4))

  def body(state, t):
    feats = recurrent.token_features(spec, x[:, :, t], y[:, :, t], W, params)
    return recurrent.step(state, feats, heads(v)[:, :, t])
  state = recurrent.init_state((B, H), spec.feature_dim(M), D, not spec.positive)
  state, outs = jax.lax.scan(body, state, jnp.arange(L))
  return parallel, jnp.moveaxis(outs, 0, 2), state, _condition(spec, x, y, W, params)


def test_recurrent_steps_equal_parallel_causal_attention_for_every_causal_component():
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(key, (B, L, H, D)) for key in keys[:3])
  with jax.default_matmul_precision("highest"):  # one program for all: one compilation
    results = jax.jit(lambda q, k, v: {c: _parallel_and_recurrent(c, q, k, v, keys[3])
                                       for c in CAUSAL})(q, k, v)
  assert set(results) >= {"posrf", "oprf", "saderf", "trigrf", "elu", "hedgehog"}
  for component, (parallel, decoded, state, cond) in results.items():
    # Both sum at most L * F float32 terms of size <= max|v|, amplified by the condition.
    tol = 32 * EPS32 * jnp.abs(v).max() * cond[..., None]
    err = jnp.abs(decoded - parallel)
    assert jnp.all(err <= tol), (component, float(err.max()))
    assert all(L not in a.shape for a in jax.tree.leaves(state)), component  # O(1) in L


def _layer(attention, **kw):
  return layers.RFMultiHeadDotProductAttention(
      num_heads=H, qkv_features=H * D, attention=attention, num_features=M, is_causal=True,
      chunk_size=4, precision=jax.lax.Precision.HIGHEST, **kw)


def _decode_all(module, variables, cache, inputs):
  """Feeds ``inputs [B, L, ...]`` one position per call; returns the outputs ``[B, L, ...]``
  and the final cache."""
  def body(cache, token):
    out, state = module.apply({**variables, "cache": cache}, token[:, None], mutable=["cache"])
    return state["cache"], out[:, 0]
  cache, outs = jax.lax.scan(body, cache, jnp.swapaxes(inputs, 0, 1))
  return jnp.swapaxes(outs, 0, 1), cache


def test_layer_decode_equals_parallel_forward_signed_features_softmax_and_flash():
  attentions = {"trigrf": _layer("spectraformer", component="trigrf", weight="orf"),
                "softmax": _layer("softmax"), "flash": _layer("flash")}
  x = jax.random.normal(jax.random.key(1), (B, L, 12)) * 0.5

  @jax.jit
  def run(x):  # one program for the three layers: one compilation
    results = {}
    for name, layer in attentions.items():
      variables = layer.init(jax.random.key(0), x)
      decoder = layer.clone(decode=True)
      _, cache = decoder.apply(variables, x, mutable=["cache"])
      results[name] = (layer.apply(variables, x),
                       _decode_all(decoder, variables, cache["cache"], x)[0])
    return results

  for name, (parallel, decoded) in run(x).items():
    np.testing.assert_allclose(decoded, parallel, atol=1e-5 * float(jnp.abs(parallel).max()),
                               err_msg=name)


def _decoder(attention):
  config = models.ModelConfig(vocab_size=11, num_classes=11, max_len=32, num_layers=2,
                              emb_dim=16, num_heads=2, qkv_dim=16, mlp_dim=16,
                              attention=attention, component="posrf", weight="orf",
                              num_features=8)
  return models.build_model(config, dual=False, per_token=True, causal=True)


def test_decoder_cache_size_does_not_depend_on_the_length_for_random_features():
  model = _decoder("spectraformer")
  tokens = jnp.zeros((B, 4), jnp.int32)
  variables = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(3), (tokens,)))
  shapes = lambda length: jax.tree.map(jnp.shape, jax.eval_shape(
      lambda v: models.init_cache(model, v, jnp.zeros((B, length), jnp.int32)), variables))
  assert shapes(4) == shapes(32)
  # The position and, per layer, S [B, H, m, dv], z and mu [B, H, m] (positive: no z_abs).
  sizes = [np.prod(s, dtype=int) for s in
           jax.tree.leaves(shapes(4), is_leaf=lambda s: type(s) is tuple)]
  assert sum(sizes) == 1 + 2 * B * H * 8 * (8 + 2)
  # A decoding step maps the cache to one of the same shapes: it never grows.
  step = lambda v, cache: model.clone(decode=True).apply(
      {**v, "cache": cache}, tokens[:, :1], mutable=["cache"])[1]["cache"]
  cache = jax.eval_shape(lambda v: models.init_cache(model, v, tokens), variables)
  assert jax.tree.map(jnp.shape, jax.eval_shape(step, variables, cache)) == shapes(4)


def test_decoder_decoded_logits_equal_the_parallel_forward():
  model = _decoder("softmax")  # the layers' decoding of random features: tests above
  tokens = jax.random.randint(jax.random.key(2), (B, 12), 1, 11)

  @jax.jit
  def run():
    variables = models.init_variables(model, jax.random.key(3), (tokens,))
    cache = models.init_cache(model, variables, tokens)
    return model.apply(variables, tokens), _decode_all(model.clone(decode=True), variables,
                                                       cache, tokens)
  parallel, (decoded, final) = run()
  np.testing.assert_allclose(decoded, parallel, atol=1e-4, rtol=1e-4)
  assert int(final["index"]) == 12  # the decoder's position counter advanced once per token


def test_decode_errors_are_clear():
  x = jax.ShapeDtypeStruct((B, L, 12), jnp.float32)
  layer = _layer("spectraformer", component="posrf", weight="iid")
  variables = jax.eval_shape(layer.init, jax.random.key(0), x)
  decode = lambda module, variables: jax.eval_shape(
      lambda v, x: module.apply(v, x, mutable=["cache"]), variables, x)
  _, cache = decode(layer.clone(decode=True), variables)
  with pytest.raises(ValueError, match="one token per call"):
    decode(layer.clone(decode=True), {**variables, **cache})
  with pytest.raises(ValueError, match="is_causal=True"):
    decode(layer.clone(decode=True, is_causal=False), variables)
  with pytest.raises(ValueError, match="no causal form"):
    recurrent.token_features(registry.get_component("hrf"), jnp.ones((12,)), jnp.ones((12,)),
                             jnp.ones((M, 12)))


@pytest.mark.parametrize("attention", ["spectraformer", "softmax"])
def test_nnx_decode_equals_parallel_forward(attention):
  layer = layers.RFMultiHeadAttention(H, 12, H * D, attention=attention, component="posrf",
                                      weight="orf", num_features=M, is_causal=True,
                                      precision=jax.lax.Precision.HIGHEST, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (B, 4, 12))
  parallel = nnx.jit(lambda layer, x: layer(x))(layer, x)
  with pytest.raises(ValueError, match="init_cache"):
    layer(x[:, :1], decode=True)
  layer.init_cache(x.shape)
  step = nnx.jit(lambda layer, token: layer(token, decode=True))
  decoded = jnp.concatenate([step(layer, x[:, t:t + 1]) for t in range(4)], axis=1)
  np.testing.assert_allclose(decoded, parallel, atol=1e-5 * float(jnp.abs(parallel).max()))
