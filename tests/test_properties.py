"""Invariants every attention path keeps, for every component, bidirectional and causal:
padding invariance, causality, finite gradients wherever outputs are finite, continuity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectraformer_jax import attention as A
from spectraformer_jax import components as C
from spectraformer_jax import layers as L
from spectraformer_jax import registry
from spectraformer_jax import stats
from spectraformer_jax import weights

COMPONENTS = registry.component_names()
CAUSAL = [c for c in COMPONENTS if registry.supports_causal(c)]
MODES = [(c, False) for c in COMPONENTS] + [(c, True) for c in CAUSAL]
H, D, M, CHUNK = 2, 8, 16, 8
REAL = 20  # real tokens; padded to 32 and to 48


def _qkv(seed, n, scale=1.0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return tuple(scale * jax.random.normal(k, (1, n, H, D)) for k in ks)


def _w(seed=7):
  return weights.orf(jax.random.key(seed), M, D)


def _attend(component, causal, fused=True, jit=False):
  """``(q, k, v, mask, r) -> (out, d sum(out * r) / d(q, k, v))`` of ``rf_attention`` with both
  masks given by one padding mask.  Eager unless ``jit`` on purpose: the small per-operation
  executables are shared by every component and shape here, much cheaper than one ``jit``
  each; ``jit`` pays off only for repeated calls with one shape (an eager ``scan`` is compiled
  again at every call)."""
  w = _w()

  def f(q, k, v, mask, r):
    out = A.rf_attention(q, k, v, w, component=component, kv_mask=mask, q_mask=mask,
                         is_causal=causal, chunk_size=CHUNK, fused=fused)
    return jnp.sum(out * r), out

  grad = jax.grad(f, argnums=(0, 1, 2), has_aux=True)
  if jit:
    grad = jax.jit(grad)
  return lambda q, k, v, mask, r: grad(q, k, v, mask, r)[::-1]


def _padded(x, n, fill_seed):
  """``x[:, :REAL]`` padded to length ``n`` with fresh garbage (large values)."""
  garbage = 25.0 * jax.random.normal(jax.random.key(fill_seed), (1, n - REAL) + x.shape[2:])
  return jnp.concatenate([x[:, :REAL], garbage], axis=1)


@pytest.mark.parametrize("component, causal", MODES)
def test_padding_invariance_pure_function(component, causal):
  f = _attend(component, causal)
  q, k, v = _qkv(0, REAL)
  r = jax.random.normal(jax.random.key(1), (1, REAL, H, D))
  results = []
  for n, seed in ((32, 2), (48, 3)):
    mask = (jnp.arange(n) < REAL)[None]
    pad = lambda t: _padded(t, n, seed)
    wo = jnp.concatenate([r, jnp.zeros((1, n - REAL, H, D))], 1)
    out, grads = f(pad(q), pad(k), pad(v), mask, wo)
    assert np.all(np.asarray(out)[:, REAL:] == 0)  # masked queries give zeros
    results.append([out[:, :REAL]] + [g[:, :REAL] for g in grads])
    assert all(np.all(np.asarray(g)[:, REAL:] == 0) for g in grads)
  for a, b in zip(*results):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=component)


@pytest.mark.parametrize("component, causal",
                         [(c, False) for c in COMPONENTS] + [("oprf", True)])
def test_padding_invariance_linen_layer_with_kv_mask_only(component, causal):
  # The LRA models used to pass only kv_mask: in self-attention the layer must still keep
  # padded queries out of every statistic (the stabilisers are covered in both modes above).
  weight = "orf" if ("orf" in (registry.get_component(component).weights or ("orf",))) else (
      registry.get_component(component).weights[0])
  layer = L.RFMultiHeadDotProductAttention(num_heads=H, qkv_features=H * D, num_features=M,
                                           component=component, weight=weight,
                                           is_causal=causal, chunk_size=CHUNK)
  x = jax.random.normal(jax.random.key(0), (1, REAL, H * D))
  variables = layer.init(jax.random.key(1), x)
  r = jax.random.normal(jax.random.key(2), (1, REAL, H * D))
  results = []

  def out_and_grad(x, mask):
    loss = lambda x: (lambda o: (jnp.sum(o[:, :REAL] * r), o))(
        layer.apply(variables, x, kv_mask=mask))
    g, out = jax.grad(loss, has_aux=True)(x)
    return out, g

  for n, seed in ((32, 3), (48, 4)):
    out, g = out_and_grad(_padded(x, n, seed), (jnp.arange(n) < REAL)[None])
    results.append((out[:, :REAL], g[:, :REAL]))
  for a, b in zip(*results):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=component)


@pytest.mark.parametrize("component", CAUSAL)
def test_causality_outputs_and_gradients_before_t_ignore_token_t(component):
  f = _attend(component, causal=True, jit=True)
  n, t = 24, 11
  q, k, v = _qkv(5, n)
  mask = jnp.ones((1, n), bool)
  wo = jnp.zeros((1, n, H, D)).at[:, :t].set(jax.random.normal(jax.random.key(6), (1, t, H, D)))
  out, grads = f(q, k, v, mask, wo)
  noise = lambda s: 3.0 * jax.random.normal(jax.random.key(s), (1, H, D))
  perturbations = (
      (q.at[:, t].add(noise(7)), k.at[:, t].add(noise(8)), v.at[:, t].add(noise(9))),
      (q, k.at[:, t].multiply(10.0), v),  # a large future key (and its statistics)
      (q.at[:, t:].set(20.0), k.at[:, t:].set(-20.0), v),  # every future token replaced
  )
  for q2, k2, v2 in perturbations:
    out2, grads2 = f(q2, k2, v2, mask, wo)
    np.testing.assert_allclose(out2[:, :t], out[:, :t], rtol=1e-5, atol=1e-6,
                               err_msg=component)
    assert np.any(np.abs(np.asarray(out[:, :t])) > 1e-3)  # the earlier rows are not zeroed
    for g, g2 in zip(grads, grads2):
      np.testing.assert_allclose(g2[:, :t], g[:, :t], rtol=1e-5, atol=1e-6, err_msg=component)
      assert np.all(np.asarray(g2)[:, t:] == 0)  # loss on rows < t: no gradient at >= t


def _norm_grid():
  """q, k ``[6, n, H, D]``: |q| = |k| in {1, 5, 12, 20, 30} per batch row, then a row with
  key norms mixed over [1, 30] (queries at 30)."""
  n = 16
  q, k, v = (jax.random.normal(jax.random.key(s), (6, n, H, D)) for s in (10, 11, 12))
  unit = lambda t: t / jnp.linalg.norm(t, axis=-1, keepdims=True)
  norms = jnp.array([1.0, 5.0, 12.0, 20.0, 30.0, 30.0])[:, None, None, None]
  mixed = jnp.linspace(1.0, 30.0, n)[jax.random.permutation(jax.random.key(13), n)]
  knorms = jnp.broadcast_to(norms, (6, n, H, 1)).at[5].set(mixed[:, None, None])
  return unit(q) * norms, unit(k) * knorms, v


@pytest.mark.parametrize("component, mode",
                         [(c, m) for c in COMPONENTS for m in ("fused", "materialised")]
                         + [(c, "causal") for c in CAUSAL])
def test_finite_gradients_and_no_zero_rows_up_to_norm_30(component, mode):
  spec = registry.get_component(component)
  if mode == "fused" and spec.log_linear is None:
    pytest.skip("no fused path for signed components")
  f = _attend(component, causal=mode == "causal", fused=mode == "fused")
  q, k, v = _norm_grid()
  mask = jnp.ones(q.shape[:2], bool).at[:, -3:].set(False)
  wo = jax.random.normal(jax.random.key(14), q.shape)
  out, grads = f(q, k, v, mask, wo)
  out = np.asarray(out)
  assert np.all(np.isfinite(out))
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
  real = out[:, :-3]
  assert np.all(np.max(np.abs(real), axis=-1) > 0), "a real query row underflowed to zero"


@pytest.mark.parametrize("component", sorted(set(COMPONENTS) - set(CAUSAL)))
def test_components_without_a_causal_form_are_refused_in_causal_mode(component):
  q, k, v = _qkv(0, 8)
  with pytest.raises(ValueError, match=f"{component!r} has no causal form.*posrf"):
    A.rf_attention(q, k, v, _w(), component=component, is_causal=True)


def test_sderf_is_continuous_when_eigenvalues_cross():
  # Phi's first two eigenvalues cross at s = 1: a 1e-5 change of the input must give a small
  # change of the output, whatever order or signs eigh picks for the eigenvectors.
  rot = np.linalg.qr(np.asarray(jax.random.normal(jax.random.key(20), (4, 4))))[0]
  e = np.eye(4)

  def inputs(s):
    x = np.stack([e[0], -e[0], s * e[1], -s * e[1], 0.7 * e[2], -0.7 * e[2], 0.4 * e[3],
                  -0.4 * e[3]])
    y = np.stack([0.5 * e[0], -0.5 * e[0], 0.5 * e[1], -0.5 * e[1], e[2], -e[2], 0.3 * e[3],
                  -0.3 * e[3]])
    return jnp.asarray(x @ rot.T, jnp.float32), jnp.asarray(y @ rot.T, jnp.float32)
  w = weights.iid(jax.random.key(22), 64, 4)
  v = jax.random.normal(jax.random.key(23), (8, 3))
  xa, ya = inputs(1.0)
  evals = np.linalg.eigvalsh(np.asarray(stats.pair_outer_mean(xa, ya)))
  assert np.min(np.diff(evals)) < 2e-3  # a (near) crossing indeed
  outs = []
  for s in (1.0 - 1e-5, 1.0 + 1e-5):
    x, y = inputs(s)
    px, py = C.sderf_features(x, y, w)
    outs.append(A.linear_attention(px, py, v, guard=False))
  assert float(jnp.max(jnp.abs(outs[0] - outs[1]))) < 1e-3


def test_causal_state_is_float32_for_bfloat16_features():
  ks = jax.random.split(jax.random.key(30), 3)
  n, f = 1024, 16
  pq = jnp.abs(jax.random.normal(ks[0], (1, n, f)))
  pk = jnp.abs(jax.random.normal(ks[1], (1, n, f)))
  v = 1.0 + jax.random.uniform(ks[2], (1, n, 4))
  bf = lambda t: t.astype(jnp.bfloat16)
  ref = A.causal_linear_attention(bf(pq).astype(jnp.float32), bf(pk).astype(jnp.float32),
                                  bf(v).astype(jnp.float32), 32, guard=False)
  out = A.causal_linear_attention(bf(pq), bf(pk), bf(v), 32, guard=False)
  # only the final rounding to bfloat16 remains (relative 2^-9), no accumulated state error
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=2 ** -8)
