"""Tests of the public API (``import spectraformer_jax as sfj``) and of padding-mask
broadcasting."""

import inspect
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import spectraformer_jax as sfj
from spectraformer_jax import attention, layers

B, N, H, D = 3, 8, 2, 4
REAL = 5  # real tokens per row in the shared padding mask


def test_every_exported_name_resolves_and_is_public():
  assert len(set(sfj.__all__)) == len(sfj.__all__)
  for name in sfj.__all__:
    assert not name.startswith("_"), name
    obj = getattr(sfj, name)
    assert inspect.getdoc(obj), f"{name} has no docstring"
  assert set(sfj.__all__) == set(_star_import())


def _star_import() -> dict:
  namespace: dict = {}
  exec("from spectraformer_jax import *", namespace)  # pylint: disable=exec-used
  namespace.pop("__builtins__")
  return namespace


def test_exports_are_the_submodules_objects_and_cover_the_layers_and_registry():
  assert sfj.RFMultiHeadDotProductAttention is layers.RFMultiHeadDotProductAttention
  assert sfj.rf_attention is attention.rf_attention
  assert sfj.valid_pairs() and all(sfj.check_pair(c, w) for c, w in sfj.valid_pairs())
  assert set(sfj.component_names()) >= {c for c, _ in sfj.valid_pairs()}


def test_version_matches_setup_py():
  setup = (pathlib.Path(__file__).parents[1] / "setup.py").read_text(encoding="utf-8")
  assert re.search(r'version="([^"]+)"', setup).group(1) == sfj.__version__


# ----------------------------------------------------------------------------- masks


def _qkv():
  q, k, v = jax.random.normal(jax.random.key(0), (3, B, N, H, D))
  return q, k, v


def _mask_shapes():
  """The same padding mask (first REAL tokens real, shared by every row) as [n], [1, n], [b, n]."""
  row = jnp.arange(N) < REAL
  return {"[n]": row, "[1, n]": row[None], "[b, n]": jnp.broadcast_to(row, (B, N))}


def _rf(q, k, v, kv_mask=None, q_mask=None):
  W = jax.random.normal(jax.random.key(1), (16, D))
  return sfj.rf_attention(q, k, v, W, component="posrf", kv_mask=kv_mask, q_mask=q_mask)


FUNCTIONS = {"rf": _rf, "softmax": sfj.softmax_attention, "flash": sfj.flash_attention}


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_functions_broadcast_n_1n_and_bn_masks_alike(fn):
  q, k, v = _qkv()
  outs = {s: np.asarray(FUNCTIONS[fn](q, k, v, kv_mask=m, q_mask=m))
          for s, m in _mask_shapes().items()}
  unmasked = np.asarray(FUNCTIONS[fn](q, k, v))
  assert not np.allclose(outs["[b, n]"], unmasked)  # the mask matters
  for s in ("[n]", "[1, n]"):
    np.testing.assert_array_equal(outs[s], outs["[b, n]"], err_msg=s)
  assert outs["[n]"].shape == (B, N, H, D)


@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize("arg, shape", [("kv_mask", (2, N)), ("kv_mask", (N + 1,)),
                                        ("q_mask", (B, 1, N)), ("q_mask", ())])
def test_functions_name_the_expected_mask_shape(fn, arg, shape):
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=re.escape(f"{arg} must have shape ({B}, {N})")):
    FUNCTIONS[fn](q, k, v, **{arg: jnp.ones(shape, bool)})


def _linen():
  layer = sfj.RFMultiHeadDotProductAttention(num_heads=H, num_features=16, component="posrf",
                                             weight="iid")
  x = jax.random.normal(jax.random.key(2), (B, N, H * D))
  variables = layer.init(jax.random.key(3), x)
  return lambda **kw: layer.apply(variables, x, **kw)


def _nnx():
  layer = sfj.RFMultiHeadAttention(H, H * D, num_features=16, component="posrf",
                                   weight="iid", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (B, N, H * D))
  return lambda **kw: layer(x, **kw)


LAYERS = {"linen": _linen, "nnx": _nnx}


@pytest.mark.parametrize("kind", LAYERS)
def test_layers_broadcast_n_1n_and_bn_masks_alike(kind):
  call = LAYERS[kind]()
  outs = {s: np.asarray(call(kv_mask=m)) for s, m in _mask_shapes().items()}
  assert not np.allclose(outs["[b, n]"], np.asarray(call()))
  for s in ("[n]", "[1, n]"):
    np.testing.assert_array_equal(outs[s], outs["[b, n]"], err_msg=s)
  # q_mask defaults to kv_mask in self-attention, whatever the mask's shape.
  m = _mask_shapes()["[1, n]"]
  np.testing.assert_array_equal(np.asarray(call(kv_mask=m, q_mask=m)), outs["[b, n]"])


@pytest.mark.parametrize("kind", LAYERS)
def test_layers_name_the_expected_mask_shape(kind):
  call = LAYERS[kind]()
  with pytest.raises(ValueError, match=re.escape(f"kv_mask must have shape ({B}, {N})")):
    call(kv_mask=jnp.ones((2, N), bool))
  with pytest.raises(ValueError, match=re.escape(f"q_mask must have shape ({B}, {N})")):
    call(q_mask=jnp.ones((N - 1,), bool))
