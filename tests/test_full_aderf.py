"""ADERF with full matrices: equalised second moments, unbiasedness within CLT bounds, lower
MSE than the diagonal ADERF on correlated queries and keys, and its fused path."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from spectraformer_jax import attention as A
from spectraformer_jax import full_aderf
from spectraformer_jax import registry

D, N, M, NK = 4, 6, 16, 8000
MIX = jnp.array([[1.0, 0.8, 0, 0], [0, 0.5, 0.3, 0], [0, 0, 1.0, 0.9], [0.2, 0, 0, 0.4]])


def _data():
  """One head of correlated queries and keys (different covariances)."""
  k1, k2 = jax.random.split(jax.random.key(0))
  return ((jax.random.normal(k1, (1, N, D)) @ MIX) * 0.7,
          (jax.random.normal(k2, (1, N, D)) @ MIX.T) * 0.5)


def test_transformed_second_moments_are_equal_and_dot_products_kept():
  x, y = _data()
  s, s_inv, _, _, a = full_aderf.full_aderf_params(x, y)
  m1 = full_aderf._second_moment(x, None)[0]  # pylint: disable=protected-access
  m2 = full_aderf._second_moment(y, None)[0]  # pylint: disable=protected-access
  np.testing.assert_allclose(s[0] @ m1 @ s[0], s_inv[0] @ m2 @ s_inv[0], rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose((x[0] @ s[0]) @ (y[0] @ s_inv[0]).T, x[0] @ y[0].T, atol=1e-5)
  assert np.all(np.asarray(a) < 0.125)


@functools.lru_cache(maxsize=None)
def _estimates(component):
  comp = registry.get_component(component)
  x, y = _data()

  def one(key):
    px, py = comp.features(x, y, jax.random.normal(key, (M, D)), stabilize=False)
    return px[0] @ py[0].T

  keys = jax.random.split(jax.random.key(1), NK)
  return np.asarray(jax.jit(jax.vmap(one))(keys), np.float64)


def _exact():
  x, y = _data()
  return np.exp(np.asarray(x[0] @ y[0].T, np.float64))


def test_unbiased_for_the_softmax_kernel():
  est = _estimates("aderf_full")
  z = np.abs(est.mean(0) - _exact()) / (est.std(0, ddof=1) / np.sqrt(NK))
  assert z.max() < 4.0, z.max()


def test_lower_mse_than_diagonal_aderf_on_correlated_data():
  exact = _exact()
  err = {c: ((_estimates(c) - exact) / exact) ** 2 for c in ("aderf", "aderf_full")}
  per_draw = {c: e.mean((1, 2)) for c, e in err.items()}
  margin = 2 * np.hypot(*(p.std(ddof=1) / np.sqrt(NK) for p in per_draw.values()))
  assert per_draw["aderf_full"].mean() + margin < per_draw["aderf"].mean()


def test_fused_path_equals_materialised():
  ks = jax.random.split(jax.random.key(2), 4)
  q, k, v = (jax.random.normal(kk, (2, 9, 2, D)) for kk in ks[:3])
  w = jax.random.normal(ks[3], (M, D))
  mask = jnp.arange(9)[None] < jnp.array([[9], [6]])
  run = jax.jit(lambda fused: A.rf_attention(q, k, v, w, component="aderf_full", kv_mask=mask,
                                             q_mask=mask, fused=fused), static_argnums=0)
  np.testing.assert_allclose(np.asarray(run(True)), np.asarray(run(False)), rtol=2e-4, atol=2e-5)
