"""Deterministic and learnable feature maps of linear attention (not kernel estimators).

They follow the component contract of ``registry.py`` (pair functions
``*_features(x, y, W, *, x_mask=None, y_mask=None, params=None, stabilize=True) -> (phi_x,
phi_y)``, float32, masked key rows zero) but ``phi(x) . phi(y)`` is a kernel of its own, not an
estimate of ``exp(x . y)``.  They pair with the deterministic weight ``identity``
(``identity_weight``: ``W = I`` when ``num_features == head_dim``), which makes ``W x = x``;
``relu`` also pairs with every random weight matrix (Performer's generalised attention).

* ``elu`` (Katharopoulos et al., 2020): ``phi(x) = elu(W x) + 1`` (``m`` positive features).
* ``relu``: ``phi(x) = relu(W x) / sqrt(m)``; with random ``W`` this is the ReLU kernel of
  Performer's generalised attention (Choromanski et al., 2021), with ``identity`` the plain
  ``relu(x)`` map.  Non-negative; a row can be all zero (attention then gives a zero output).
* ``hedgehog`` (Zhang et al., 2024): a learnable linear map ``z = W (A x + b)`` (``A [d, d]``
  initialised to ``I``, ``b`` to 0; ``params = {"hedgehog_a", "hedgehog_b"}``) followed by the
  softmax-mimicking ``phi(x) = [softmax_r(z), softmax_r(-z)]`` (``2m`` positive features).
  Trained with the model, it learns to mimic softmax attention's spikiness.  One map per
  layer, shared by its heads (``init_params`` receives only ``head_dim``).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from spectraformer_jax import components as C
from spectraformer_jax._dtypes import f32 as _f32

Params = Any


def identity_weight(key, num_features: int, dim: int) -> jax.Array:
  """The deterministic "weight matrix" of the feature maps: row ``r`` is the unit vector
  ``e_(r mod dim)``, float32 ``[num_features, dim]`` (``I`` for ``num_features == dim``; more
  features repeat coordinates).  ``key`` is ignored."""
  del key
  return jax.nn.one_hot(jnp.arange(num_features) % dim, dim, dtype=jnp.float32)


def _mask_keys(phi_y, y, y_mask):
  yb = C._key_mask(y, y_mask)  # pylint: disable=protected-access
  return phi_y if yb is None else jnp.where(yb, phi_y, 0.0)


def _pair(fn, x, y, w, y_mask):
  """``(fn(W x), fn(W y))`` with masked key rows zero (float32)."""
  C._check(x, y, w)  # pylint: disable=protected-access
  project = C._project  # pylint: disable=protected-access
  return fn(project(x, w)), _mask_keys(fn(project(y, w)), y, y_mask)


def elu_features(x, y, w, *, x_mask=None, y_mask=None, params=None, stabilize=True):
  """``elu(W x) + 1`` of both sides, float32 ``[..., n, m]`` / ``[..., l, m]`` (positive)."""
  del x_mask, params, stabilize
  return _pair(lambda p: jax.nn.elu(p) + 1.0, x, y, w, y_mask)


def relu_features(x, y, w, *, x_mask=None, y_mask=None, params=None, stabilize=True):
  """``relu(W x) / sqrt(m)`` of both sides, float32 ``[..., n, m]`` / ``[..., l, m]``."""
  del x_mask, params, stabilize
  scale = 1.0 / math.sqrt(w.shape[0])
  return _pair(lambda p: jax.nn.relu(p) * scale, x, y, w, y_mask)


def hedgehog_init_params(key=None, dim: int = 1) -> Params:
  """Hedgehog's learnable map at the identity: ``A = I [dim, dim]``, ``b = 0 [dim]``."""
  del key
  return {"hedgehog_a": jnp.eye(dim, dtype=jnp.float32),
          "hedgehog_b": jnp.zeros((dim,), jnp.float32)}


def hedgehog_features(x, y, w, *, x_mask=None, y_mask=None, params=None, stabilize=True):
  """Hedgehog features ``[softmax_r(z), softmax_r(-z)]``, ``z = W (A x + b)``, float32
  ``[..., n, 2m]`` / ``[..., l, 2m]`` (positive).  ``params`` None means ``A = I, b = 0``."""
  del x_mask, stabilize
  C._check(x, y, w)  # pylint: disable=protected-access
  p = params if params is not None else hedgehog_init_params(dim=x.shape[-1])
  a, b = _f32(p["hedgehog_a"]), _f32(p["hedgehog_b"])

  def side(t):
    z = C._project(  # pylint: disable=protected-access
        jnp.einsum("...nd,ed->...ne", _f32(t), a, precision=jax.lax.Precision.HIGHEST) + b, w)
    return jnp.concatenate([jax.nn.softmax(z, -1), jax.nn.softmax(-z, -1)], -1)

  return side(x), _mask_keys(side(y), y, y_mask)
