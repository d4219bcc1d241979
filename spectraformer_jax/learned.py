"""Learnable weight-matrix parameterisations: (init, matrix, apply) triples.

* ``init(key, num_features, dim, **kw) -> (params, buffers)``: ``params`` (trainable pytree of
  float32 arrays) and ``buffers`` (non-trainable arrays: permutations, fixed noise). Works under
  ``jax.jit`` with a traced key; ``num_features``/``dim`` static.
* ``matrix(params, buffers) -> float32[m, d]``: W, differentiable in ``params``.
* ``apply(params, buffers, x) -> x @ W.T`` (float[..., d] -> float32[..., m]), the fast way where
  there is one.

At initialisation ``fastfoodl`` is exactly the fixed ``weights.fastfood`` draw of the same key
and ``gmm`` is an i.i.d. N(0, I) draw, so both start as unbiased softmax-kernel estimators; once
trained they estimate whatever kernel their spectral density defines (no longer exp(x.y)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spectraformer_jax import weights

__all__ = ["fastfoodl_init", "fastfoodl_matrix", "fastfoodl_apply",
           "gmm_init", "gmm_matrix", "gmm_apply"]


# ----------------------------------------------------------------------------- FastFoodL


def fastfoodl_init(key, num_features: int, dim: int):
  """Learnable Fastfood ``S H G Pi H B`` (blocks as in ``weights.fastfood``).

  params (trainable): ``S`` float32[m] (row scales of the stacked blocks, truncated to m rows),
  ``G`` float32[nb, p] (Gaussian diagonals) and ``B`` float32[nb, d] (sign diagonals, only the d
  entries that meet real input coordinates; relaxed to real values when trained), with
  nb = ceil(m/p) blocks and p = d rounded up to a power of two. They are initialised to the fixed
  Fastfood draw of the same key, so at init ``fastfoodl_matrix`` equals
  ``weights.fastfood(key, m, d)`` (an unbiased softmax-kernel W). buffers (fixed): ``perm``
  int32[nb, p], the permutation Pi. m and d are recovered from the shapes of S and B.
  """
  m, d = weights._check_shape(num_features, dim)  # pylint: disable=protected-access
  f = weights.fastfood_draw(key, m, d)
  return {"S": f["S"], "G": f["G"], "B": f["B"]}, {"perm": f["perm"]}


def fastfoodl_matrix(params, buffers) -> jnp.ndarray:
  """Materialised W = [S H G Pi H B blocks][:m, :d], float32[m, d]; differentiable in params.

  Cost O(m p log p).
  """
  return weights.fastfood_matrix(params["S"], params["G"], params["B"], buffers["perm"])


def fastfoodl_apply(params, buffers, x) -> jnp.ndarray:
  """``x @ W.T`` with fast Walsh-Hadamard transforms: float[..., d] -> float32[..., m].

  Per block: multiply x by B and zero-pad to p, fwht, permute, multiply by G, fwht; concatenate the
  blocks, keep m outputs, multiply by S. Cost O(nb p log p) = O(m log p) per input vector (vs
  O(m d) for the dense product); equals ``x @ fastfoodl_matrix(params, buffers).T`` up to float
  rounding.
  """
  s, g, b, perm = params["S"], params["G"], params["B"], buffers["perm"]
  nb, p = g.shape
  m, d = s.shape[0], b.shape[1]
  x = jnp.asarray(x, jnp.float32)
  if x.shape[-1] != d:
    raise ValueError(f"fastfoodl_apply: x has last dimension {x.shape[-1]}, W has dim {d}.")
  lead = x.shape[:-1]
  v = x[..., None, :] * b  # [..., nb, d]
  v = jnp.pad(v, [(0, 0)] * (len(lead) + 1) + [(0, p - d)])
  v = weights.fwht(v)
  v = jnp.take_along_axis(v, jnp.broadcast_to(perm, v.shape), axis=-1)  # (Pi v)_i = v[perm[i]]
  v = weights.fwht(v * g)
  return v.reshape(*lead, nb * p)[..., :m] * s


# ----------------------------------------------------------------------------- GMM


def gmm_init(key, num_features: int, dim: int, num_components: int = 4):
  """Learnable Gaussian-mixture spectral density, reparameterised.

  ``omega_i = mu_{c(i)} + exp(log_sigma_{c(i)}) * eps_i`` with eps_i ~ N(0, I_d) fixed noise and
  the component of row i fixed as ``c(i) = i mod C`` (C = min(num_components, m)), i.e. a mixture
  with (almost) equal weights whose rows are stratified over components. params: ``mu``
  float32[C, d] (init 0) and ``log_sigma`` float32[C, d] (diagonal log-scales, init 0), so at init
  every component is N(0, I) and the density is exactly N(0, I) (W is an i.i.d. Gaussian draw,
  unbiased for exp(x.y)). buffers: ``eps`` float32[m, d], ``component`` int32[m].
  The mixture weights are not learned (they would need a non-reparameterisable draw).
  """
  m, d = weights._check_shape(num_features, dim)  # pylint: disable=protected-access
  if not isinstance(num_components, (int, np.integer)) or num_components < 1:
    raise ValueError(f"gmm: num_components must be a positive int, got {num_components!r}.")
  c = min(int(num_components), m)
  (k,) = weights.purpose_keys(key, "gmm/eps")
  eps = jax.random.normal(k, (m, d), jnp.float32)
  params = {"mu": jnp.zeros((c, d), jnp.float32), "log_sigma": jnp.zeros((c, d), jnp.float32)}
  buffers = {"eps": eps, "component": jnp.arange(m, dtype=jnp.int32) % c}
  return params, buffers


def gmm_matrix(params, buffers) -> jnp.ndarray:
  """W with rows ``mu_c(i) + exp(log_sigma_c(i)) * eps_i``, float32[m, d]; differentiable."""
  c = buffers["component"]
  return params["mu"][c] + jnp.exp(params["log_sigma"][c]) * buffers["eps"]


def gmm_apply(params, buffers, x) -> jnp.ndarray:
  """``x @ W.T`` (dense; the mixture has no fast transform). O(m d) per input vector."""
  return jnp.matmul(jnp.asarray(x, jnp.float32), gmm_matrix(params, buffers).T,
                    precision=jax.lax.Precision.HIGHEST)
