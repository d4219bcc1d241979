"""Exact reference kernels."""

import jax
import jax.numpy as jnp
import numpy as np

from spectraformer_jax import kernels


def _xy():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 4))
  y = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 4))
  return x, y


def test_softmax_and_gaussian_kernels_match_brute_force():
  x, y = _xy()
  xn, yn = np.asarray(x, np.float64), np.asarray(y, np.float64)
  dots = np.einsum("bnd,bld->bnl", xn, yn)
  np.testing.assert_allclose(kernels.softmax_kernel(x, y), np.exp(dots), rtol=1e-5)
  d2 = np.sum((xn[:, :, None] - yn[:, None]) ** 2, -1)
  np.testing.assert_allclose(kernels.gaussian_kernel(x, y), np.exp(-d2 / 2), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(kernels.log_gaussian_kernel(x, y), -d2 / 2, rtol=1e-4, atol=1e-5)


def test_gaussian_kernel_is_bounded_and_one_on_diagonal():
  x, _ = _xy()
  k = kernels.gaussian_kernel(10 * x, 10 * x)
  assert np.all(np.asarray(k) <= 1.0) and np.all(np.asarray(k) >= 0)
  np.testing.assert_allclose(np.diagonal(np.asarray(k), axis1=-2, axis2=-1), 1.0, atol=1e-3)


def test_relation_between_kernels():
  x, y = _xy()
  lhs = kernels.softmax_kernel(x, y)
  rhs = (kernels.gaussian_kernel(x, y) * jnp.exp(0.5 * jnp.sum(x * x, -1))[..., :, None]
         * jnp.exp(0.5 * jnp.sum(y * y, -1))[..., None, :])
  np.testing.assert_allclose(lhs, rhs, rtol=1e-4)


def test_softmax_attention_weights_stable_and_masked():
  x, y = _xy()
  mask = jnp.array([[True, False, True], [False, False, False]])
  w = kernels.softmax_attention_weights(100 * x, y, mask)
  assert np.all(np.isfinite(w))
  np.testing.assert_allclose(np.asarray(w)[0].sum(-1), 1.0, rtol=1e-5)
  assert np.all(np.asarray(w)[0][:, 1] == 0)
  assert np.all(np.asarray(w)[1] == 0)  # no real key: zero row
  ref = jax.nn.softmax(np.einsum("nd,ld->nl", x[0], y[0])[:, [0, 2]], -1)
  np.testing.assert_allclose(np.asarray(kernels.softmax_attention_weights(x, y, mask))[0][:, [0, 2]],
                             ref, rtol=1e-5)
