"""spectraformer-jax: random-feature attention phi(x) = f(W x) for JAX and Flax."""
