"""Registry: names, errors carrying the valid names, refused pairs, every pair builds features."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectraformer_jax import registry

DESIGN_COMPONENTS = {"trigrf", "posrf", "oprf", "gerf", "sderf", "aderf", "saderf"}


def test_all_design_components_registered():
  assert DESIGN_COMPONENTS <= set(registry.component_names())
  for name in DESIGN_COMPONENTS:
    spec = registry.get_component(name)
    assert spec.name == name and spec.description
    assert spec.feature_dim(10) == (20 if name == "trigrf" else 10)
    assert spec.positive == (name != "trigrf")


def test_unknown_component_lists_valid_names():
  with pytest.raises(ValueError) as err:
    registry.get_component("favor")
  msg = str(err.value)
  assert "'favor'" in msg
  for name in registry.component_names():
    assert name in msg


def test_unknown_weight_lists_valid_names():
  with pytest.raises(ValueError) as err:
    registry.get_weight("gauss")
  msg = str(err.value)
  assert "'gauss'" in msg
  for name in registry.weight_names():
    assert name in msg


def test_unknown_names_in_check_pair():
  with pytest.raises(ValueError, match="posrf"):
    registry.check_pair("nope", "iid")
  with pytest.raises(ValueError, match="qmc"):
    registry.check_pair("posrf", "nope")


def test_refused_pairs_raise_with_reason(monkeypatch):
  # REFUSED_PAIRS is empty by design (see registry.py); check the mechanism on a stand-in.
  for (c, w), reason in registry.REFUSED_PAIRS.items():
    with pytest.raises(ValueError, match="refused"):
      registry.check_pair(c, w)
    assert reason
  monkeypatch.setitem(registry.REFUSED_PAIRS, ("trigrf", "sgq"), "stand-in reason")
  with pytest.raises(ValueError, match="stand-in reason"):
    registry.check_pair("trigrf", "sgq")
  assert ("trigrf", "sgq") not in registry.valid_pairs()


def test_alias_resolves():
  comp, spec = registry.check_pair("posrf", "gaus")
  assert spec is registry.get_weight("iid") and comp.name == "posrf"


@pytest.mark.parametrize("component", sorted(registry.COMPONENTS))
def test_every_pair_builds_features(component):
  d, m = 6, 10
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, d)) * 0.5
  y = jax.random.normal(jax.random.PRNGKey(1), (2, 3, d)) * 0.5
  mask = jnp.array([[True, True, False], [True, False, False]])
  for c, w in registry.valid_pairs():
    if c != component:
      continue
    comp, spec = registry.check_pair(c, w)
    params, buffers = spec.init(jax.random.PRNGKey(2), m, d)
    W = spec.matrix(params, buffers)
    cparams = comp.init_params(jax.random.PRNGKey(3), d) if comp.init_params else None
    px, py = comp.features(x, y, W, y_mask=mask, params=cparams)
    f = comp.feature_dim(m)
    assert px.shape == (2, 4, f) and py.shape == (2, 3, f), (c, w)
    assert px.dtype == jnp.float32 and py.dtype == jnp.float32
    assert np.all(np.isfinite(px)) and np.all(np.isfinite(py)), (c, w)
    assert np.all(np.asarray(py)[~np.asarray(mask)] == 0), (c, w)
