"""Tests of spectraformer_jax.layers: linen and nnx drop-in attention layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from spectraformer_jax import layers as L
from spectraformer_jax.layers import nnx as layers_nnx
from spectraformer_jax import registry

B, N, D, H = 2, 24, 32, 2


def _x(seed=0, n=N):
  return 0.5 * jax.random.normal(jax.random.key(seed), (B, n, D))


def _pad(n=N, real=(17, N)):
  return jnp.arange(n) < jnp.array(real)[:, None]


def _copy_linen_to_nnx(variables, m):
  p = variables["params"]
  for name in ("query", "key", "value", "out"):
    getattr(m, name).kernel[...] = p[name]["kernel"]
    getattr(m, name).bias[...] = p[name]["bias"]


def test_linen_state_shapes_and_flax_compat():
  x, pad = _x(), _pad()
  layer = L.RFMultiHeadDotProductAttention(num_heads=H, qkv_features=D, num_features=32,
                                           component="oprf", weight="orf")
  v = layer.init(jax.random.key(1), x, kv_mask=pad)
  stock = nn.MultiHeadDotProductAttention(num_heads=H, qkv_features=D)
  sv = stock.init(jax.random.key(1), x)
  same = jax.tree.map(lambda a, b: a.shape == b.shape, v["params"], sv["params"])
  assert all(jax.tree.leaves(same)) and set(v["params"]) == set(sv["params"])
  assert v["random_features"]["W"].shape == (32, D // H)
  assert v["random_features"]["W"].dtype == jnp.float32
  y = layer.apply(v, x, kv_mask=pad)
  assert y.shape == stock.apply(sv, x).shape
  # checkpoints interchange: the stock layer runs on our params and vice versa
  stock.apply({"params": v["params"]}, x)
  # softmax mode through our layer equals Flax's stock layer on the same params
  sm = L.RFMultiHeadDotProductAttention(num_heads=H, qkv_features=D, attention="softmax")
  mask = nn.make_attention_mask(pad, pad)
  with jax.default_matmul_precision("highest"):
    ref = stock.apply(sv, x, mask=mask)
    ours = sm.apply(sv, x, kv_mask=pad)
    ours_dense = sm.apply(sv, x, mask=mask)
    fl = L.RFMultiHeadDotProductAttention(num_heads=H, qkv_features=D, attention="flash")
    ours_flash = fl.apply(sv, x, kv_mask=pad)
  np.testing.assert_allclose(ours[0, :17], ref[0, :17], atol=1e-5)
  np.testing.assert_allclose(ours[1], ref[1], atol=1e-5)
  np.testing.assert_allclose(ours_dense[1], ref[1], atol=1e-5)
  np.testing.assert_allclose(ours_flash, ours, atol=1e-5)


def test_linen_padding_and_redraw():
  x, pad = _x(), _pad()
  layer = L.RFMultiHeadDotProductAttention(num_heads=H, num_features=64, weight="orf")
  v = layer.init(jax.random.key(1), x)
  with jax.default_matmul_precision("highest"):
    full = layer.apply(v, x, kv_mask=pad, q_mask=pad)
    short = layer.apply(v, x[:1, :17])
  np.testing.assert_allclose(full[0, :17], short[0], rtol=2e-4, atol=2e-5)
  # redraw: pure, jittable, changes the output; 'never' is deterministic
  v2 = jax.jit(lambda v, k: L.redraw_random_features(layer, v, k, x))(v, jax.random.key(7))
  assert v2["random_features"]["W"].shape == v["random_features"]["W"].shape == (64, D // H)
  assert not np.array_equal(v2["random_features"]["W"], v["random_features"]["W"])
  with pytest.raises(TypeError, match="example inputs"):
    L.redraw_random_features(layer, v, jax.random.key(7))
  # the same key redraws the same W (up to jit-vs-eager rounding); another key another W
  again = L.redraw_random_features(layer, v, jax.random.key(7), x)
  np.testing.assert_allclose(again["random_features"]["W"], v2["random_features"]["W"],
                             rtol=1e-5, atol=1e-5)
  other = L.redraw_random_features(layer, v, jax.random.key(8), x)
  assert not np.array_equal(other["random_features"]["W"], v2["random_features"]["W"])
  assert not np.allclose(layer.apply(v2, x), layer.apply(v, x))
  np.testing.assert_array_equal(layer.apply(v, x), layer.apply(v, x))
  # redraw='always': a fresh W per call from the 'features' stream
  al = L.RFMultiHeadDotProductAttention(num_heads=H, num_features=16, redraw="always")
  va = al.init(jax.random.key(1), x)
  a1 = al.apply(va, x, rngs={"features": jax.random.key(1)})
  a2 = al.apply(va, x, rngs={"features": jax.random.key(2)})
  assert not np.allclose(a1, a2)
  np.testing.assert_array_equal(al.apply(va, x), al.apply(va, x))  # no stream: stored W


def test_learnable_weight_and_component_params_are_trainable():
  x = _x()
  layer = L.RFMultiHeadDotProductAttention(num_heads=H, num_features=16, weight="fastfoodl",
                                           component="gerf")
  v = layer.init(jax.random.key(0), x)
  assert "weight" in v["params"] and "component" in v["params"]
  assert "buffers" in v["random_features"]
  grads = jax.grad(lambda p: jnp.sum(layer.apply({**v, "params": p}, x) ** 2))(v["params"])
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["weight"]))
  v2 = L.redraw_random_features(layer, v, jax.random.key(3), x)  # buffers are kept
  jax.tree.map(np.testing.assert_array_equal, v2["random_features"]["buffers"],
               v["random_features"]["buffers"])


def test_linen_equals_nnx_for_same_params_and_w():
  x, pad = _x(), _pad()
  for weight in ("iid", "gmm"):
    layer = L.RFMultiHeadDotProductAttention(num_heads=H, num_features=32, weight=weight,
                                             component="posrf", is_causal=True, chunk_size=8)
    v = layer.init(jax.random.key(0), x)
    m = L.RFMultiHeadAttention(H, D, num_features=32, weight=weight, component="posrf",
                               is_causal=True, chunk_size=8, rngs=nnx.Rngs(5))
    _copy_linen_to_nnx(v, m)
    spec = registry.get_weight(weight)
    if spec.learnable:
      m.weight_params = layers_nnx._to_vars(dict(v["params"]["weight"]), nnx.Param)
      m.weight_buffers = layers_nnx._to_vars(dict(v["random_features"]["buffers"]), L.WeightBuffers)
    else:
      m.random_features["W"][...] = v["random_features"]["W"]
    with jax.default_matmul_precision("highest"):
      np.testing.assert_allclose(m(x, kv_mask=pad), layer.apply(v, x, kv_mask=pad),
                                 rtol=1e-5, atol=1e-6)


def test_nnx_state_redraw_grad_jit_vmap_bf16():
  x, pad = _x(), _pad()
  m = L.RFMultiHeadAttention(H, D, num_features=32, component="oprf", weight="orf",
                             rngs=nnx.Rngs(0))
  stock = nnx.MultiHeadAttention(H, D, decode=False, rngs=nnx.Rngs(0))
  assert m(x).shape == stock(x).shape
  assert len(jax.tree.leaves(nnx.state(m, L.RandomFeatures))) == 1
  # fixed W is not a Param: grads only over the projections
  grads = nnx.grad(lambda m: jnp.sum(m(x, kv_mask=pad) ** 2))(m)
  assert "random_features" not in grads
  # jit and vmap agree with eager
  eager = m(x, kv_mask=pad)
  jitted = nnx.jit(lambda m, x, p: m(x, kv_mask=p))(m, x, pad)
  np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)
  gdef, state = nnx.split(m)
  vm = jax.vmap(lambda x, p: nnx.merge(gdef, state)(x[None], kv_mask=p[None])[0])(x, pad)
  np.testing.assert_allclose(vm, eager, rtol=1e-4, atol=1e-5)
  # in-place redraw inside nnx.jit
  w0 = m.random_features["W"][...]
  nnx.jit(L.redraw_random_features_nnx)(m, jax.random.key(3))
  assert not np.allclose(m.random_features["W"][...], w0)
  # bf16
  mb = L.RFMultiHeadAttention(H, D, num_features=32, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  yb = mb(x.astype(jnp.bfloat16), kv_mask=pad)
  assert yb.dtype == jnp.bfloat16 and bool(jnp.isfinite(yb.astype(jnp.float32)).all())
  lb = L.RFMultiHeadDotProductAttention(num_heads=H, num_features=32, component="trigrf",
                                        dtype=jnp.bfloat16)
  vb = lb.init(jax.random.key(0), x.astype(jnp.bfloat16))
  assert bool(jnp.isfinite(lb.apply(vb, x.astype(jnp.bfloat16)).astype(jnp.float32)).all())


def test_dropout_semantics():
  x = _x()
  layer = L.RFMultiHeadDotProductAttention(num_heads=H, num_features=16, dropout_rate=0.5)
  v = layer.init(jax.random.key(0), x, deterministic=True)
  d1 = layer.apply(v, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
  d2 = layer.apply(v, x, deterministic=False, dropout_rng=jax.random.key(2))
  e = layer.apply(v, x, deterministic=True)
  assert not np.allclose(d1, e) and not np.allclose(d1, d2)
  m = L.RFMultiHeadAttention(H, D, num_features=16, dropout_rate=0.5, rngs=nnx.Rngs(0))
  assert not np.allclose(m(x, deterministic=False), m(x, deterministic=True))


def test_bad_arguments_raise_clear_errors():
  x = _x()
  init = lambda **kw: L.RFMultiHeadDotProductAttention(**kw).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"qkv_features \(30\).*num_heads \(4\)"):
    init(num_heads=4, qkv_features=30)
  with pytest.raises(ValueError, match="Unknown component"):
    init(num_heads=H, component="nope")
  with pytest.raises(ValueError, match="Unknown weight"):
    init(num_heads=H, weight="nope")
  with pytest.raises(ValueError, match="attention="):
    init(num_heads=H, attention="fast")
  with pytest.raises(ValueError, match="num_features"):
    init(num_heads=H, num_features=0)
  with pytest.raises(ValueError, match="redraw"):
    init(num_heads=H, weight="gmm", redraw="always")
  layer = L.RFMultiHeadDotProductAttention(num_heads=H, num_features=16)
  v = layer.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="kv_mask must have shape"):
    layer.apply(v, x, kv_mask=jnp.ones((B, N + 1), bool))
  with pytest.raises(ValueError, match="mask must be Flax's dense"):
    layer.apply(v, x, mask=jnp.ones((B, N, N), bool))
  with pytest.raises(ValueError, match=r"qkv_features \(30\)"):
    L.RFMultiHeadAttention(4, D, qkv_features=30, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="Unknown weight"):
    L.RFMultiHeadAttention(H, D, weight="nope", rngs=nnx.Rngs(0))
  m = L.RFMultiHeadAttention(H, D, num_features=16, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="q_mask must have shape"):
    m(x, q_mask=jnp.ones((B,), bool))


def test_nnx_self_attention_with_kv_mask_only_ignores_padded_queries():
  # In self-attention q_mask defaults to kv_mask: padded queries stay out of OPRF's statistic
  # and their outputs are zero; real outputs do not depend on the padded values.
  m = L.RFMultiHeadAttention(H, D, num_features=32, component="oprf", weight="orf",
                             decode=False, rngs=nnx.Rngs(3))
  x, pad = _x(4), _pad()
  x2 = jnp.where(pad[..., None], x, 7.0)
  y, y2 = m(x, kv_mask=pad), m(x2, kv_mask=pad)
  np.testing.assert_allclose(np.asarray(y2)[np.asarray(pad)], np.asarray(y)[np.asarray(pad)],
                             rtol=1e-5, atol=1e-6)
  out_bias = np.asarray(m.out.bias[...])
  np.testing.assert_allclose(np.asarray(y)[~np.asarray(pad)],
                             np.broadcast_to(out_bias, y[~pad].shape), atol=1e-6)
