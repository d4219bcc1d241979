"""The fused path (features recomputed in the backward pass) against the materialised one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectraformer_jax import attention as A
from spectraformer_jax import components as C
from spectraformer_jax import fused
from spectraformer_jax import registry
from spectraformer_jax import weights

POSITIVE = [name for name in registry.component_names()
            if registry.get_component(name).log_linear is not None]
B, N, L, H, D, M = 2, 48, 40, 2, 16, 32


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _inputs(seed=0, scale=0.7, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (B, N, H, D)) * scale
  k = jax.random.normal(ks[1], (B, L, H, D)) * scale
  v = jax.random.normal(ks[2], (B, L, H, D))
  w = weights.orf(ks[3], M, D)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype), w


def test_every_positive_component_has_the_log_linear_form():
  assert set(POSITIVE) == {"posrf", "oprf", "gerf", "sderf", "aderf", "saderf", "aderf_full"}
  assert registry.get_component("trigrf").log_linear is None


def _masked_case(component):
  """``(out, grads) = f(**path)``: outputs and the gradients of q, k, v, W and the component
  parameters of ``rf_attention`` with key and query masks, under the given path arguments."""
  q, k, v, w = _inputs()
  kvm = jnp.arange(L)[None] < jnp.array([[L], [23]])
  qm = jnp.arange(N)[None] < jnp.array([[N], [30]])
  comp = registry.get_component(component)
  params = comp.init_params(jax.random.key(5), D) if comp.init_params else None
  probe = jax.random.normal(jax.random.key(9), (B, N, H, D))

  def f(**path):
    def loss(q, k, v, w, params):
      out = A.rf_attention(q, k, v, w, component=component, params=params, kv_mask=kvm,
                           q_mask=qm, **path)
      return jnp.sum(jnp.tanh(out) * probe), out

    with jax.default_matmul_precision("highest"):
      grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(
          q, k, v, w, params)
    return out, grads

  return f


@pytest.mark.parametrize("component", POSITIVE)
def test_fused_equals_materialised_values_and_gradients(component):
  f = _masked_case(component)
  (out_f, g_f), (out_m, g_m) = f(), f(fused=False)
  assert _rel(out_f, out_m) < 1e-5
  leaves_f, leaves_m = jax.tree.leaves(g_f), jax.tree.leaves(g_m)
  assert len(leaves_f) == len(leaves_m) >= 4
  for a, b in zip(leaves_f, leaves_m):
    assert np.all(np.isfinite(a))
    assert _rel(a, b) < 1e-4
  assert np.all(np.asarray(out_f)[1, 30:] == 0)  # masked queries


def test_blocks_do_not_change_the_result():
  q, k, v, w = _inputs(1)
  x, y = A.to_heads(q), A.to_heads(k)
  form = C.oprf_log_linear(x, y, w)
  f = lambda form, v, be: fused.positive_rf_attention(form, w, A.to_heads(v), block_elements=be)
  ref, g_ref = jax.value_and_grad(lambda v: jnp.sum(f(form, v, None) ** 2))(v)
  for block_elements in (1, 3 * L * M):  # one index per block; three (4 = 3 + remainder 1)
    out, g = jax.value_and_grad(lambda v: jnp.sum(f(form, v, block_elements) ** 2))(v)
    np.testing.assert_allclose(out, ref, rtol=1e-5)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="block_elements"):
    f(form, v, 0)


def test_no_feature_map_is_kept_for_the_backward_pass():
  """The residuals of the fused VJP are O((n + l) d + m dv) per head; the materialised path
  (the negative control) keeps [n, m] feature maps."""
  n = 256
  ks = jax.random.split(jax.random.key(2), 4)
  q, k, v = (jax.random.normal(ks[i], (1, n, 1, D)) * 0.5 for i in range(3))
  w = weights.iid(ks[3], 4 * M, D)

  def largest_residual(fused_path):
    _, vjp = jax.vjp(lambda q, k, v: A.rf_attention(q, k, v, w, component="posrf",
                                                    fused=fused_path), q, k, v)
    return max(leaf.size for leaf in jax.tree.leaves(vjp))

  assert largest_residual(False) >= n * 4 * M
  assert largest_residual(True) < n * 4 * M


def test_bfloat16_features_match_float32_within_bf16_rounding():
  """bf16 storage rounds each feature and contraction operand to 8 significant bits
  (relative 2^-9); the normalised output then differs by O(2^-8), far below 2e-2."""
  q, k, v, w = _inputs(3, dtype=jnp.bfloat16)
  up = lambda t: t.astype(jnp.float32)
  for component in ("posrf", "saderf"):
    ref = A.rf_attention(up(q), up(k), up(v), w, component=component, fused=False)
    out = A.rf_attention(q, k, v, w, component=component)
    assert out.dtype == jnp.bfloat16
    assert _rel(out, ref) < 2e-2
    g = jax.grad(lambda q: jnp.sum(A.rf_attention(q, k, v, w, component=component)
                                   .astype(jnp.float32) ** 2))(q)
    g_ref = jax.grad(lambda q: jnp.sum(A.rf_attention(q, up(k), up(v), w, component=component,
                                                      fused=False) ** 2))(up(q))
    assert _rel(g, g_ref) < 5e-2


def test_extreme_inputs_and_fully_masked_rows_stay_finite():
  q, k, v, w = _inputs(4, scale=6.0, dtype=jnp.bfloat16)  # |x| ~ 6 sqrt(16) / 2 = 12
  kvm = jnp.arange(L)[None] < jnp.array([[L], [0]])       # second sequence: no real key
  f = lambda q, k, v: A.rf_attention(q, k, v, w, component="posrf", kv_mask=kvm)
  out = f(q, k, v)
  assert np.all(np.isfinite(np.asarray(out, np.float32)))
  assert np.all(np.asarray(out[1], np.float32) == 0)
  grads = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)
  assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)


def test_bfloat16_gradient_of_gerf_a_matches_float32():
  """d/dA sums logit cotangents over rows and keys, and those sums nearly cancel (the ratio
  is invariant to per-row and per-head shifts): taken from bf16-rounded cotangents they would
  be off by O(2^-9 sum |cotangent|).  With float32 sums the error is bf16-sized relative to
  the gradient itself."""
  q, k, v, w = _inputs(5)
  raw = C.gerf_init_params()["gerf_a_raw"] + 1.0  # A = 1/8 - softplus(raw + 1) ~ -0.2
  r = jax.random.normal(jax.random.key(6), (B, H, N, D))

  def grad_a(dtype):
    def loss(raw):
      x, y = (jnp.swapaxes(t, 1, 2) * D ** -0.25 for t in (q, k))
      form = C.gerf_log_linear(x, y, w, params={"gerf_a_raw": raw})
      out = fused.positive_rf_attention(form, w, jnp.swapaxes(v, 1, 2), feature_dtype=dtype)
      return jnp.sum(out * r)
    return float(jax.grad(loss)(raw))

  g32, g16 = grad_a(jnp.float32), grad_a(jnp.bfloat16)
  assert abs(g16 - g32) <= 2e-2 * abs(g32) + 1e-3, (g16, g32)


@pytest.mark.parametrize("component", POSITIVE)
def test_pallas_implementation_equals_xla_values_and_gradients(component):
  """``implementation="pallas"`` (interpret mode off GPU) against ``"xla"``: outputs and the
  gradients of q, k, v, W and the component parameters, with key and query masks."""
  f = _masked_case(component)
  (out_p, g_p), (out_x, g_x) = f(implementation="pallas"), f(implementation="xla")
  assert _rel(out_p, out_x) < 1e-5
  for a, b in zip(jax.tree.leaves(g_p), jax.tree.leaves(g_x)):
    assert _rel(a, b) < 1e-4


def test_pallas_falls_back_to_xla_for_trigrf_and_causal(caplog):
  q, k, v, w = _inputs()
  ref = A.rf_attention(q, k, v, w, component="trigrf", implementation="xla")
  with caplog.at_level("WARNING"):
    out = A.rf_attention(q, k, v, w, component="trigrf", implementation="pallas")
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  assert "trigrf" in caplog.text
  with pytest.raises(ValueError, match="'auto', 'pallas', 'xla'"):
    A.rf_attention(q, k, v, w, component="posrf", implementation="triton")
