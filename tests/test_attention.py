"""Tests of spectraformer_jax.attention: linear/causal attention, softmax references, RF core,
the Flax attention_fn hook."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from spectraformer_jax import attention as A
from spectraformer_jax import registry


def _qkv(seed=0, b=2, n=64, h=2, d=16, scale=1.0):
  k = jax.random.split(jax.random.key(seed), 3)
  q = scale * jax.random.normal(k[0], (b, n, h, d))
  kk = scale * jax.random.normal(k[1], (b, n, h, d))
  v = jax.random.normal(k[2], (b, n, h, d))
  return q, kk, v


def _rel(a, b):
  return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


def _pos_feats(seed, shape):
  return jax.random.uniform(jax.random.key(seed), shape, minval=0.05, maxval=1.0)


# ----------------------------------------------------------------------------- linear attention


def test_linear_attention_matches_quadratic_and_masks():
  b, h, n, f, dv = 2, 3, 20, 8, 5
  pq, pk = _pos_feats(0, (b, h, n, f)), _pos_feats(1, (b, h, n, f))
  v = jax.random.normal(jax.random.key(2), (b, h, n, dv))
  kmask = (jnp.arange(n) < jnp.array([13, 20])[:, None])[:, None, :]
  qmask = (jnp.arange(n) < jnp.array([11, 20])[:, None])[:, None, :]
  hi = jax.lax.Precision.HIGHEST  # GPUs run float32 dots in TF32 by default
  out = A.linear_attention(pq, pk, v, kmask, qmask, precision=hi)
  s = jnp.einsum("...nf,...lf->...nl", pq, pk, precision=hi) * kmask[..., None, :]
  ref = jnp.einsum("...nl,...ld->...nd", s, v, precision=hi) / s.sum(-1, keepdims=True)
  ref = jnp.where(qmask[..., None], ref, 0)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(out[0, :, 11:]).max()) == 0.0  # masked queries give zeros
  # garbage (even NaN) at masked keys changes nothing
  v_bad = v.at[0, :, 13:].set(jnp.nan)
  pk_bad = pk.at[0, :, 13:].set(1e3)
  np.testing.assert_allclose(A.linear_attention(pq, pk_bad, v_bad, kmask, qmask, precision=hi), out,
                             rtol=1e-5, atol=1e-6)


def test_normaliser_guard_signed_features():
  """TrigRF-like signed features: finite outputs, sign kept, bounded by max|v| / eps; the
  guard is a no-op for positive features; all-masked keys give zeros."""
  pq = jnp.array([[1.0, -1.0], [1.0, 0.5]])
  pk = jnp.array([[1.0, 1.0], [2.0, 0.0]])
  v = jnp.array([[1.0], [3.0]])
  out = A.linear_attention(pq, pk, v, eps=1e-3)
  # row 0: den = (1-1) + 2 = 2? compute directly: phi_q0 . sum(phi_k) = 1*3 + (-1)*1 = 2
  np.testing.assert_allclose(out[0], (pq[0] @ (pk.T @ v)) / 2.0, rtol=1e-6)
  # a zero denominator: phi_q = [1, -3] -> 1*3 - 3*1 = 0
  out0 = A.linear_attention(jnp.array([[1.0, -3.0]]), pk, v, eps=1e-3)
  assert bool(jnp.isfinite(out0).all())
  mag = 1 * 3 + 3 * 1
  num = jnp.array([1.0, -3.0]) @ (pk.T @ v)
  np.testing.assert_allclose(out0[0], num / (1e-3 * mag), rtol=1e-5)
  # random signed features: finite and bounded
  pq = jax.random.normal(jax.random.key(0), (4, 50, 16))
  pk = jax.random.normal(jax.random.key(1), (4, 50, 16))
  vv = jax.random.uniform(jax.random.key(2), (4, 50, 3), minval=-1, maxval=1)
  o = A.linear_attention(pq, pk, vv, eps=1e-4)
  assert bool(jnp.isfinite(o).all()) and float(jnp.abs(o).max()) <= 1e4 * 1.001 * 50
  # positive features: identical with and without the guard
  a, b_ = _pos_feats(3, (2, 30, 8)), _pos_feats(4, (2, 30, 8))
  np.testing.assert_array_equal(A.linear_attention(a, b_, vv[:2, :30], guard=True),
                                A.linear_attention(a, b_, vv[:2, :30], guard=False))
  # all keys masked -> zeros, not NaN
  z = A.linear_attention(a, b_, vv[:2, :30], jnp.zeros((2, 30), bool))
  assert float(jnp.abs(z).max()) == 0.0


@pytest.mark.parametrize("signed", [False, True])
def test_causal_equals_masked_reference_and_chunk_invariant(signed):
  b, h, n, f, dv = 2, 2, 45, 8, 4
  if signed:
    pq = jax.random.normal(jax.random.key(0), (b, h, n, f))
    pk = jax.random.normal(jax.random.key(1), (b, h, n, f))
  else:
    pq, pk = _pos_feats(0, (b, h, n, f)), _pos_feats(1, (b, h, n, f))
  v = jax.random.normal(jax.random.key(2), (b, h, n, dv))
  kmask = (jnp.arange(n) < jnp.array([30, 45])[:, None])[:, None, :]
  with jax.default_matmul_precision("highest"):
    ref = A.causal_linear_attention_reference(pq, pk, v, kmask, kmask, eps=1e-2)
    outs = [A.causal_linear_attention(pq, pk, v, c, kmask, kmask, eps=1e-2)
            for c in ((1, 16, 128) if not signed else (7, 45))]
  tol = 1e-4 if signed else 1e-5
  for o in outs:
    assert _rel(o, ref) < tol
    assert _rel(o, outs[0]) < tol


def test_causal_grad_matches_reference_grad():
  b, n, f, dv = 2, 33, 6, 3
  pq, pk = _pos_feats(0, (b, n, f)), _pos_feats(1, (b, n, f))
  v = jax.random.normal(jax.random.key(2), (b, n, dv))
  g = jax.random.normal(jax.random.key(3), (b, n, dv))
  loss = lambda fn: lambda a, c, d: jnp.sum(fn(a, c, d) * g)
  with jax.default_matmul_precision("highest"):
    g1 = jax.jit(jax.grad(loss(lambda a, c, d: A.causal_linear_attention(a, c, d, 8)),
                          argnums=(0, 1, 2)))(pq, pk, v)
    g2 = jax.jit(jax.grad(loss(A.causal_linear_attention_reference), argnums=(0, 1, 2)))(
        pq, pk, v)
  for x, y in zip(g1, g2):
    assert _rel(x, y) < 1e-5


def test_causal_never_materialises_per_position_states():
  """The jaxpr of forward + backward holds no array of n * F * dv elements."""
  b, n, f, dv = 1, 512, 32, 24
  pq, pk = _pos_feats(0, (b, n, f)), _pos_feats(1, (b, n, f))
  v = jnp.ones((b, n, dv))
  fn = lambda a, c, d: jnp.sum(A.causal_linear_attention(a, c, d, 32, guard=False))
  jaxpr = jax.make_jaxpr(jax.grad(fn, argnums=(0, 1, 2)))(pq, pk, v)
  biggest = 0

  def visit(jp):
    nonlocal biggest
    for eqn in jp.eqns:
      for var in eqn.outvars:
        shape = getattr(var.aval, "shape", ())
        biggest = max(biggest, int(np.prod(shape)) if shape else 1)
      for p in eqn.params.values():
        for sub in (p if isinstance(p, (list, tuple)) else [p]):
          if hasattr(sub, "jaxpr"):
            visit(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
          elif hasattr(sub, "eqns"):
            visit(sub)

  visit(jaxpr.jaxpr)
  assert biggest < n * f * (dv + 1) / 4, biggest


# ----------------------------------------------------------------------------- softmax refs


@pytest.mark.parametrize("causal", [False, True])
def test_softmax_and_flash_agree_with_flax(causal):
  q, k, v = _qkv(n=40)
  kvm = jnp.arange(40) < jnp.array([29, 40])[:, None]
  mask = nn.make_attention_mask(kvm, kvm)
  if causal:
    mask = nn.combine_masks(mask, nn.make_causal_mask(kvm))
  with jax.default_matmul_precision("highest"):
    ref = nn.dot_product_attention(q, k, v, mask=mask)
    ref = jnp.where(kvm[:, :, None, None], ref, 0)
    s = A.softmax_attention(q, k, v, kvm, kvm, causal)
    f1 = A.flash_attention(q, k, v, kvm, kvm, causal)  # concrete prefix mask -> lengths
    f2 = jax.jit(lambda *a: A.flash_attention(*a, is_causal=causal, kv_mask_is_prefix=False))(
        q, k, v, kvm, kvm)
    f3 = jax.jit(lambda *a: A.flash_attention(*a, is_causal=causal, kv_mask_is_prefix=True))(
        q, k, v, kvm, kvm)
  for o in (s, f1, f2, f3):
    np.testing.assert_allclose(o, ref, atol=2e-5)
  # non-prefix mask goes in as a dense mask
  holes = kvm.at[:, 3].set(False)
  np.testing.assert_allclose(A.flash_attention(q, k, v, holes), A.softmax_attention(q, k, v, holes),
                             atol=2e-5)


def test_softmax_extra_batch_dims():
  q, k, v = _qkv(n=16)
  q3, k3, v3 = (t.reshape((1, 2) + t.shape[1:]) for t in (q, k, v))
  np.testing.assert_allclose(A.flash_attention(q3, k3, v3)[0], A.softmax_attention(q, k, v),
                             atol=2e-5)


# ----------------------------------------------------------------------------- RF core


def _draw_w(weight, m, d, seed=0):
  spec = registry.get_weight(weight)
  p, b = spec.init(jax.random.key(seed), m, d)
  return spec.matrix(p, b)


@pytest.mark.parametrize("component", ["posrf", "oprf"])
def test_rf_error_falls_with_num_features(component):
  q, k, v = _qkv(seed=1, b=2, n=128, h=2, d=16, scale=0.5)
  with jax.default_matmul_precision("highest"):
    exact = A.softmax_attention(q, k, v)
    errs = []
    for m in (16, 64, 256):
      e = [_rel(A.rf_attention(q, k, v, _draw_w("iid", m, 16, seed=s), component=component),
                exact) for s in range(3)]
      errs.append(float(np.mean(e)))
  assert errs[0] > errs[1] > errs[2], errs
  assert errs[2] < 0.6 * errs[0], errs


def test_rf_padding_equals_unpadded():
  q, k, v = _qkv(seed=2, b=1, n=50, h=2, d=16, scale=0.5)
  w = _draw_w("iid", 64, 16)
  real = 37
  kvm = jnp.arange(50)[None] < real
  for component in ("posrf", "oprf", "trigrf"):
    with jax.default_matmul_precision("highest"):
      padded = A.rf_attention(q, k, v, w, component=component, kv_mask=kvm, q_mask=kvm)
      unpadded = A.rf_attention(q[:, :real], k[:, :real], v[:, :real], w, component=component)
    np.testing.assert_allclose(padded[:, :real], unpadded, rtol=2e-4, atol=2e-5)
    assert float(jnp.abs(padded[:, real:]).max()) == 0.0


def test_rf_causal_matches_reference_and_dtypes():
  q, k, v = _qkv(seed=3, n=40, scale=0.5)
  w = _draw_w("iid", 32, 16)
  comp = registry.get_component("posrf")
  with jax.default_matmul_precision("highest"):
    out = A.rf_attention(q, k, v, w, component="posrf", is_causal=True, chunk_size=8)
    x, y = (jnp.swapaxes(t, 1, 2) * 16 ** -0.25 for t in (q, k))
    pq, pk = comp.features(x, y, w)
    ref = jnp.swapaxes(A.causal_linear_attention_reference(pq, pk, jnp.swapaxes(v, 1, 2)), 1, 2)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
  out16 = A.rf_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                         v.astype(jnp.bfloat16), w, component="oprf", is_causal=True)
  assert out16.dtype == jnp.bfloat16 and bool(jnp.isfinite(out16.astype(jnp.float32)).all())


def test_rf_jit_grad_vmap():
  q, k, v = _qkv(seed=4, n=24, scale=0.5)
  w = _draw_w("orf", 32, 16)
  f = lambda q, k, v: A.rf_attention(q, k, v, w, component="oprf")
  out = jax.jit(f)(q, k, v)
  vm = jax.jit(jax.vmap(f))(q[:, None], k[:, None], v[:, None])[:, 0]
  np.testing.assert_allclose(vm, out, rtol=1e-5, atol=1e-6)
  g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2)))(q, k, v)
  assert all(bool(jnp.isfinite(t).all()) and float(jnp.abs(t).max()) > 0 for t in g)


def test_rf_bad_arguments():
  q, k, v = _qkv(n=8)
  w = _draw_w("iid", 16, 16)
  with pytest.raises(ValueError, match="Unknown component"):
    A.rf_attention(q, k, v, w, component="nope")
  with pytest.raises(ValueError, match="kv_mask"):
    A.rf_attention(q, k, v, w, component="posrf", kv_mask=jnp.ones((2, 7), bool))
  with pytest.raises(ValueError, match="head_dim"):
    A.rf_attention(q, k, v, w[:, :8], component="posrf")
  with pytest.raises(ValueError, match="heads"):
    A.rf_attention(q, k[:, :, :1], v[:, :, :1], w, component="posrf")
  with pytest.raises(ValueError, match="Unknown weight"):
    A.make_attention_fn("posrf", "nope", 16)


# ----------------------------------------------------------------------------- Flax hook


def test_make_attention_fn_in_stock_linen_and_nnx_layers():
  x = jax.random.normal(jax.random.key(0), (2, 30, 32))
  kvm = jnp.arange(30) < jnp.array([22, 30])[:, None]
  fn = A.make_attention_fn("posrf", "orf", 64, seed=3)
  layer = nn.MultiHeadDotProductAttention(num_heads=2, attention_fn=fn)
  variables = layer.init(jax.random.key(1), x)
  out = layer.apply(variables, x, mask=nn.make_attention_mask(kvm, kvm))
  assert out.shape == (2, 30, 32) and bool(jnp.isfinite(out).all())
  # real positions equal the unpadded run
  short = layer.apply(variables, x[:1, :22])
  np.testing.assert_allclose(out[:1, :22], short, rtol=2e-4, atol=2e-5)
  # the same projections through the core
  p = variables["params"]
  proj = lambda name, t: jnp.einsum("bld,dhk->blhk", t, p[name]["kernel"]) + p[name]["bias"]
  core = fn(proj("query", x), proj("key", x), proj("value", x))
  ref = jnp.einsum("blhk,hkd->bld", core, p["out"]["kernel"]) + p["out"]["bias"]
  np.testing.assert_allclose(layer.apply(variables, x), ref, rtol=1e-4, atol=1e-5)

  m = nnx.MultiHeadAttention(num_heads=2, in_features=32, attention_fn=fn, decode=False,
                             rngs=nnx.Rngs(0))
  y = m(x, mask=nn.make_attention_mask(kvm, kvm))
  assert y.shape == (2, 30, 32) and bool(jnp.isfinite(y).all())
  yc = m(x, is_causal=True)  # nnx passes is_causal through
  assert bool(jnp.isfinite(yc).all())
  # causal: position 0 sees only itself, so it does not change when later tokens change
  x2 = x.at[:, 5:].set(0.0)
  np.testing.assert_allclose(m(x2, is_causal=True)[:, :5], yc[:, :5], rtol=1e-4, atol=1e-5)


def test_make_attention_fn_dropout_and_errors():
  q, k, v = _qkv(n=12)
  fn = A.make_attention_fn("oprf", "iid", 32)
  a = fn(q, k, v)
  b = fn(q, k, v, dropout_rng=jax.random.key(0), dropout_rate=0.5, deterministic=False)
  assert bool(jnp.isfinite(b).all()) and not np.allclose(a, b)
  np.testing.assert_allclose(fn(q, k, v, dropout_rate=0.5, deterministic=True), a)
  with pytest.raises(ValueError, match="num_features"):
    A.make_attention_fn("posrf", "iid", 0)
  with pytest.raises(ValueError, match="mask"):
    fn(q, k, v, mask=jnp.ones((2, 1, 12, 11), bool))


@pytest.mark.parametrize("component", ["trigrf", "gerf"])
def test_causal_log_attention_matches_reference_for_any_chunk_size(component):
  # Signed (trigrf) and positive (gerf with A != 0) log-features, a key mask, chunk sizes that
  # do and do not divide n: equal to the masked quadratic reference on the features.
  q, k, v = _qkv(seed=8, n=21, scale=0.6)
  w = _draw_w("orf", 16, 16)
  spec = registry.get_component(component)
  params = {"gerf_a_raw": jnp.float32(1.0)} if component == "gerf" else None
  mask = (jnp.arange(21) % 5 != 3)[None, None]
  x, y, vh = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
  x, y = x * 16 ** -0.25, y * 16 ** -0.25
  mask = jnp.broadcast_to(mask, x.shape[:-1])
  pq, pk = spec.features(x, y, w, y_mask=mask, params=params, stabilize=False, causal=True)
  with jax.default_matmul_precision("highest"):
    ref = A.causal_linear_attention_reference(pq, pk, vh, mask, guard=not spec.positive)
    for chunk in (4, 21, 64):
      out = A.rf_attention_heads(jnp.swapaxes(q, 1, 2), jnp.swapaxes(k, 1, 2), vh, w,
                                 component=spec, params=params, kv_mask=mask, is_causal=True,
                                 chunk_size=chunk)
      np.testing.assert_allclose(out, ref, rtol=2e-4, atol=2e-5, err_msg=str(chunk))


def test_causal_mode_uses_neutral_statistics():
  # Causal statistics would see the future; the data-dependent components fall back to their
  # data-independent neutral parameters, which makes them PosRF.
  q, k, v = _qkv(seed=9, n=16, scale=0.8)
  w = _draw_w("orf", 16, 16)
  f = lambda c: A.rf_attention(q, k, v, w, component=c, is_causal=True, chunk_size=8)
  base = f("posrf")
  for name in ("oprf", "sderf", "aderf", "saderf"):
    np.testing.assert_allclose(f(name), base, rtol=1e-5, atol=1e-6, err_msg=name)


def test_gradients_are_finite_when_the_normaliser_is_tiny_but_the_output_finite():
  # Features scaled by 1e-22 leave the ratio unchanged; its derivative must not go through
  # 1 / den^2 (which overflows).
  pq = jnp.full((1, 4, 8), 0.8)
  pk = pq * 1e-22
  v = jnp.arange(12.0).reshape(1, 4, 3)
  for guard in (False, True):
    out = A.linear_attention(pq, pk, v, guard=guard)
    np.testing.assert_allclose(out, jnp.broadcast_to(v.mean(-2, keepdims=True), out.shape),
                               rtol=1e-5)
    grads = jax.grad(lambda a, b: A.linear_attention(a, b, v, guard=guard).sum(),
                     argnums=(0, 1))(pq, pk)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
