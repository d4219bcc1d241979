"""elu, relu and hedgehog: the maps themselves, the weights they pair with, linear attention
with them, and hedgehog's learnable map inside the Flax layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectraformer_jax import attention as A
from spectraformer_jax import feature_maps
from spectraformer_jax import layers
from spectraformer_jax import registry

D = 6


def _xy(seed=0):
  ks = jax.random.split(jax.random.key(seed), 2)
  return jax.random.normal(ks[0], (2, 5, D)), jax.random.normal(ks[1], (2, 4, D))


def test_registry_lists_the_taxonomy():
  assert {"geomrf", "poisrf", "hrf", "elu", "relu", "hedgehog"} <= set(registry.component_names())
  assert "identity" in registry.weight_names()


@pytest.mark.parametrize("component,weight,valid", [
    ("elu", "iid", "identity"), ("hedgehog", "orf", "identity"),
    ("posrf", "identity", "iid"), ("relu", "identity", None)])
def test_pairs_with_the_deterministic_weight(component, weight, valid):
  if valid is None:
    registry.check_pair(component, weight)
    registry.check_pair(component, "orf")
    return
  with pytest.raises(ValueError, match="refused") as err:
    registry.check_pair(component, weight)
  assert valid in str(err.value)


def test_identity_weight_rows():
  np.testing.assert_array_equal(feature_maps.identity_weight(None, D, D), np.eye(D))
  w = feature_maps.identity_weight(None, 8, 3)
  np.testing.assert_array_equal(np.argmax(w, -1), np.arange(8) % 3)


def test_elu_and_relu_are_their_formulas():
  x, y = _xy()
  eye = jnp.eye(D)
  px, py = feature_maps.elu_features(x, y, eye)
  xn = np.asarray(x, np.float64)
  np.testing.assert_allclose(px, np.where(xn > 0, xn + 1, np.exp(xn)), rtol=1e-6)
  assert np.all(np.asarray(py) > 0)
  rx, _ = feature_maps.relu_features(x, y, eye)
  np.testing.assert_allclose(rx, np.maximum(xn, 0) / np.sqrt(D), rtol=1e-6)


@pytest.mark.parametrize("component", ["elu", "relu", "hedgehog"])
def test_linear_attention_equals_its_quadratic_form(component):
  """rf_attention with a feature map is ``sum_j (phi_i . phi_j) v_j / sum_j phi_i . phi_j``
  over real keys, with the features of the scaled inputs ``q d^-1/4``, ``k d^-1/4``."""
  comp = registry.get_component(component)
  ks = jax.random.split(jax.random.key(1), 3)
  q, k, v = (jax.random.normal(kk, (1, 7, 1, D)) for kk in ks)
  mask = jnp.arange(7)[None] < 5
  out = A.rf_attention(q, k, v, jnp.eye(D), component=component, kv_mask=mask)
  px, py = comp.features(q[0, :, 0] * D ** -0.25, k[0, :, 0] * D ** -0.25, jnp.eye(D))
  scores = np.asarray(px @ py.T, np.float64)[:, :5]
  ref = scores @ np.asarray(v[0, :5, 0]) / scores.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(out[0, :, 0]), ref, rtol=1e-4, atol=1e-5)


def test_hedgehog_at_init_is_the_softmax_pair():
  x, y = _xy()
  px, _ = feature_maps.hedgehog_features(x, y, jnp.eye(D))
  np.testing.assert_allclose(px, jnp.concatenate([jax.nn.softmax(x, -1),
                                                  jax.nn.softmax(-x, -1)], -1), rtol=1e-6)
  assert np.all(np.asarray(px) > 0) and px.shape[-1] == 2 * D


def test_hedgehog_map_is_trained_inside_the_layer():
  """The learnable A, b are parameters of the layer and receive gradients."""
  x = jax.random.normal(jax.random.key(2), (2, 9, 8))
  layer = layers.RFMultiHeadDotProductAttention(num_heads=2, qkv_features=8, component="hedgehog",
                                                weight="identity", num_features=4)
  variables = layer.init(jax.random.key(0), x)
  params = variables["params"]
  assert params["component"]["hedgehog_a"].shape == (4, 4)

  def loss(p):
    return jnp.sum(layer.apply({**variables, "params": p}, x) ** 2)

  grads = jax.jit(jax.grad(loss))(params)["component"]
  assert float(jnp.abs(grads["hedgehog_a"]).max()) > 0
  assert float(jnp.abs(grads["hedgehog_b"]).max()) > 0
