"""Tests for spectraformer_jax.learned: FastFoodL and GMM parameterisations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectraformer_jax import learned
from spectraformer_jax import registry
from spectraformer_jax import weights

TRIPLES = {
    "fastfoodl": (learned.fastfoodl_init, learned.fastfoodl_matrix, learned.fastfoodl_apply),
    "gmm": (learned.gmm_init, learned.gmm_matrix, learned.gmm_apply),
}
SHAPES = [(100, 24), (7, 5), (1, 1)]


@pytest.mark.parametrize("name", sorted(TRIPLES))
def test_shapes_apply_and_jit(name):
  init, matrix, apply = TRIPLES[name]
  for m, d in SHAPES:
    key = jax.random.PRNGKey(m + d)
    params, buffers = jax.jit(init, static_argnums=(1, 2))(key, m, d)
    w = jax.jit(matrix)(params, buffers)
    assert w.shape == (m, d) and w.dtype == jnp.float32
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, d))
    out = jax.jit(apply)(params, buffers, x)
    assert out.shape == (2, 3, m) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(x @ w.T), rtol=1e-4, atol=1e-4)
    # Same key -> same W; different key -> different W.
    p2, b2 = init(key, m, d)
    np.testing.assert_allclose(np.asarray(matrix(p2, b2)), np.asarray(w), rtol=1e-5, atol=1e-5)
    p3, b3 = init(jax.random.PRNGKey(999), m, d)
    assert not np.allclose(np.asarray(matrix(p3, b3)), np.asarray(w))


def test_fastfoodl_init_equals_fixed_fastfood():
  for m, d in SHAPES:
    key = jax.random.PRNGKey(5)
    params, buffers = learned.fastfoodl_init(key, m, d)
    np.testing.assert_allclose(np.asarray(learned.fastfoodl_matrix(params, buffers)),
                               np.asarray(weights.fastfood(key, m, d)), rtol=1e-5, atol=1e-5)
    assert set(params) == {"S", "G", "B"} and set(buffers) == {"perm"}


def test_gmm_init_is_standard_normal_and_reparameterised():
  m, d = 100, 24
  params, buffers = learned.gmm_init(jax.random.PRNGKey(0), m, d, num_components=3)
  np.testing.assert_array_equal(np.asarray(learned.gmm_matrix(params, buffers)),
                                np.asarray(buffers["eps"]))
  mu = jnp.arange(3 * d, dtype=jnp.float32).reshape(3, d)
  ls = jnp.full((3, d), np.log(2.0), jnp.float32)
  w = learned.gmm_matrix({"mu": mu, "log_sigma": ls}, buffers)
  c = np.asarray(buffers["component"])
  np.testing.assert_allclose(np.asarray(w), np.asarray(mu)[c] + 2.0 * np.asarray(buffers["eps"]),
                             rtol=1e-6)
  # At init, rows are i.i.d. N(0, I): pooled moments over keys.
  ws = jax.vmap(lambda k: learned.gmm_matrix(*learned.gmm_init(k, m, d)))(
      jax.random.split(jax.random.PRNGKey(1), 50))
  ws = np.asarray(ws, np.float64).reshape(-1, d)
  assert abs(ws.mean()) < 0.01 and abs(ws.var() - 1) < 0.02


@pytest.mark.parametrize("name", sorted(TRIPLES))
def test_gradients_flow(name):
  init, matrix, apply = TRIPLES[name]
  m, d = 100, 24
  params, buffers = init(jax.random.PRNGKey(0), m, d)
  x = jax.random.normal(jax.random.PRNGKey(1), (5, d)) * 0.3

  def loss_dense(p):
    return jnp.sum(jnp.exp(x @ matrix(p, buffers).T))

  def loss_fast(p):
    return jnp.sum(jnp.exp(apply(p, buffers, x)))

  g_dense = jax.jit(jax.grad(loss_dense))(params)
  g_fast = jax.jit(jax.grad(loss_fast))(params)
  for k in params:
    gd, gf = np.asarray(g_dense[k]), np.asarray(g_fast[k])
    assert np.all(np.isfinite(gd)) and np.any(gd != 0), (name, k)
    np.testing.assert_allclose(gf, gd, rtol=2e-3, atol=2e-3 * np.abs(gd).max())


def test_fastfoodl_trains():
  """A few gradient steps change W and reduce a simple loss."""
  m, d = 32, 8
  params, buffers = learned.fastfoodl_init(jax.random.PRNGKey(0), m, d)
  target = jax.random.normal(jax.random.PRNGKey(1), (m, d))

  def loss(p):
    return jnp.mean((learned.fastfoodl_matrix(p, buffers) - target) ** 2)

  l0 = loss(params)
  step = jax.jit(lambda p: jax.tree_util.tree_map(lambda a, g: a - 0.05 * g, p, jax.grad(loss)(p)))
  for _ in range(20):
    params = step(params)
  assert loss(params) < l0


def test_registry_learnable_specs():
  for name in ("fastfoodl", "gmm"):
    spec = registry.get_weight(name)
    assert spec.learnable
    params, buffers = spec.init(jax.random.PRNGKey(0), 100, 24)
    assert spec.matrix(params, buffers).shape == (100, 24)
    assert jax.tree_util.tree_leaves(params)


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_gmm_init_rejects_bad_num_components(bad):
  with pytest.raises(ValueError, match="num_components"):
    learned.gmm_init(jax.random.PRNGKey(0), 8, 4, num_components=bad)
