"""Dtype helper shared by the package's modules."""

import jax
import jax.numpy as jnp


def f32(x) -> jax.Array:
  """``x`` as a float32 array: the precision of every feature, statistic and kernel value."""
  return jnp.asarray(x, jnp.float32)
