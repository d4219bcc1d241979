"""The Pallas kernels (interpret mode on CPU) against a directly materialised attention formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectraformer_jax.components import LogLinear
from spectraformer_jax.pallas_attention import positive_rf_attention_pallas

# Small shapes that exercise every padding path: n, l not multiples of the 16-row tile, d, m, dv
# not powers of two, several chunks per sequence.
B, H, N, L, D, M, DV = 2, 2, 37, 29, 12, 20, 6
TILE, CHUNK = 16, 16
_HI = jax.lax.Precision.HIGHEST


def _form(seed: int, shift: float = 0.0) -> tuple[LogLinear, jax.Array, jax.Array]:
  """A random log-linear form with per-head ``col`` and per-row offsets, ``W`` and values."""
  ks = jax.random.split(jax.random.key(seed), 8)
  nrm = jax.random.normal
  form = LogLinear(xq=0.5 * nrm(ks[0], (B, H, N, D)), xk=0.5 * nrm(ks[1], (B, H, L, D)),
                   col=0.3 * nrm(ks[2], (B, H, M)) + shift,
                   row_q=0.3 * nrm(ks[3], (B, H, N)) + shift,
                   row_k=0.3 * nrm(ks[4], (B, H, L)) + shift)
  return form, 0.5 * nrm(ks[5], (M, D)), nrm(ks[6], (B, H, L, DV))


def _reference(form: LogLinear, w, v, kv_mask, q_mask):
  """``out_i = sum_j phi_q_i . phi_k_j v_j / sum_j phi_q_i . phi_k_j`` from materialised
  ``phi = exp(log-features)`` (no stabiliser: the test inputs are small), masked keys dropped,
  masked queries and queries without a valid key set to 0."""
  lq = jnp.einsum("...nd,md->...nm", form.xq, w, precision=_HI) + form.col[..., None, :] \
      + form.row_q[..., None]
  lk = jnp.einsum("...ld,md->...lm", form.xk, w, precision=_HI) + form.col[..., None, :] \
      + form.row_k[..., None]
  phi_q = jnp.exp(lq)
  phi_k = jnp.exp(lk) * kv_mask[..., None]
  scores = jnp.einsum("...nm,...lm->...nl", phi_q, phi_k, precision=_HI)
  num = jnp.einsum("...nl,...le->...ne", scores, v, precision=_HI)
  den = jnp.sum(scores, axis=-1, keepdims=True)
  out = num / jnp.where(den > 0, den, 1.0)
  return jnp.where(q_mask[..., None] & (den > 0), out, 0.0)


def _masks(masked: bool):
  """Key / query masks; the masked case has ragged lengths and one head with no valid key."""
  if not masked:
    return jnp.ones((B, H, L), bool), jnp.ones((B, H, N), bool)
  kv_len = jnp.array([[L, 11], [0, 17]])[..., None]
  q_len = jnp.array([[N, 23], [30, 5]])[..., None]
  return jnp.arange(L) < kv_len, jnp.arange(N) < q_len


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _pallas(form, w, v, kv_mask, q_mask, feature_dtype=jnp.float32):
  return positive_rf_attention_pallas(form, w, v, kv_mask, q_mask, feature_dtype=feature_dtype,
                                      block_rows=TILE, chunk_rows=CHUNK, interpret=True)


@pytest.mark.parametrize("masked", [False, True])
def test_values_and_gradients_equal_the_materialised_formula(masked):
  """With masks: ragged key and query lengths and one head without any valid key."""
  form, w, v = _form(0)
  kv_mask, q_mask = _masks(masked)
  probe = jax.random.normal(jax.random.key(1), (B, H, N, DV))

  def loss(fn, form, w, v):
    return jnp.sum(jnp.tanh(fn(form, w, v, kv_mask, q_mask)) * probe)

  out_p = jax.jit(_pallas)(form, w, v, kv_mask, q_mask)
  out_r = _reference(form, w, v, kv_mask, q_mask)
  assert _rel(out_p, out_r) < 1e-5
  g_p = jax.jit(jax.grad(lambda *a: loss(_pallas, *a), argnums=(0, 1, 2)))(form, w, v)
  g_r = jax.grad(lambda *a: loss(_reference, *a), argnums=(0, 1, 2))(form, w, v)
  names = ["xq", "xk", "col", "row_q", "row_k", "W", "v"]
  for name, a, b in zip(names, jax.tree.leaves(g_p), jax.tree.leaves(g_r)):
    assert np.all(np.isfinite(np.asarray(a))), name
    if name == "row_q":   # the ratio does not depend on per-query offsets
      assert np.max(np.abs(np.asarray(b))) < 1e-5 and np.max(np.abs(np.asarray(a))) < 1e-5
    else:
      assert _rel(a, b) < 1e-4, name
  if masked:   # head (1, 0) has no valid key: zero outputs, zero (finite) gradients
    assert np.all(np.asarray(out_p[1, 0]) == 0.0)
    for name in ("xq", "xk", "col", "row_k"):
      assert np.all(np.asarray(getattr(g_p[0], name)[1, 0]) == 0.0), name
    assert np.all(np.asarray(g_p[2][1, 0]) == 0.0)


def test_stabilisation_is_exact_for_logits_far_beyond_float32_exp_range():
  """A constant added to ``col`` and the row offsets scales every phi_q . phi_k equally: the
  attention is unchanged even where ``exp`` of the raw logits overflows (shift 400).  The
  logits ~800 carry float32 rounding 800 * 2^-24 ~ 5e-5 each: the tolerance."""
  form, w, v = _form(3)
  kv_mask, q_mask = _masks(True)
  big, _, _ = _form(3, shift=400.0)
  base = jax.jit(_pallas)(form, w, v, kv_mask, q_mask)
  shifted = jax.jit(_pallas)(big, w, v, kv_mask, q_mask)
  assert np.all(np.isfinite(np.asarray(shifted)))
  assert _rel(shifted, base) < 2e-4


def test_bfloat16_operands_stay_close_and_broadcast_leading_dims():
  """bfloat16 values and feature operands (float32 exp and accumulation): error near bfloat16
  rounding (2^-9); ``col`` shared by all heads broadcasts like the other inputs."""
  form, w, v = _form(4)
  form = form._replace(col=form.col[0, 0])
  kv_mask, q_mask = _masks(True)
  out = jax.jit(_pallas, static_argnums=5)(form, w, v.astype(jnp.bfloat16), kv_mask, q_mask,
                                           jnp.bfloat16)
  assert out.shape == (B, H, N, DV) and out.dtype == jnp.float32
  assert _rel(out, _reference(form, w, v, kv_mask, q_mask)) < 1e-2


def test_bad_arguments_name_the_value():
  form, w, v = _form(5)
  with pytest.raises(ValueError, match="float64"):
    positive_rf_attention_pallas(form, w, v, feature_dtype=jnp.float64)
  with pytest.raises(ValueError, match="power of two"):
    positive_rf_attention_pallas(form, w, v, block_rows=24)
  with pytest.raises(ValueError, match=r"W must be"):
    positive_rf_attention_pallas(form, w[:, :5], v)


@pytest.fixture
def fresh_log():
  """Forgets which fallbacks were logged, before and after the test (they are logged once)."""
  from spectraformer_jax import pallas_attention as P
  P._log_once.cache_clear()
  yield
  P._log_once.cache_clear()


def test_auto_is_the_default_and_resolves_to_xla_off_gpu_said_once(caplog, monkeypatch,
                                                                      fresh_log):
  from configs import base
  from spectraformer_jax import pallas_attention as P

  assert P.DEFAULT_IMPLEMENTATION == "auto"
  assert base.get_base_config().model.implementation == P.DEFAULT_IMPLEMENTATION
  monkeypatch.setattr(P, "pallas_available", lambda: False)
  with caplog.at_level("INFO"):
    assert [P.resolve_implementation("auto") for _ in range(3)] == ["xla"] * 3
    assert P.resolve_implementation("pallas") == "pallas"
  assert caplog.text.count("implementation='auto'") == 1


def test_auto_on_a_gpu_runs_the_kernels_only_where_they_cover_the_call(caplog, monkeypatch,
                                                                        fresh_log):
  """With a GPU reported, ``"auto"`` sends bidirectional positive components with 16-bit
  inputs to the kernels (run here in interpret mode); float32 inputs and TrigRF run on the XLA
  path, each fallback logged once (causal calls: ``test_pallas_causal``)."""
  from spectraformer_jax import attention as A
  from spectraformer_jax import pallas_attention as P

  kernel_outputs = []
  kernels = P.positive_rf_attention_pallas

  def interpreted(*args, **kwargs):
    kernel_outputs.append(kernels(*args, **{**kwargs, "interpret": True}))
    return kernel_outputs[-1]

  monkeypatch.setattr(P, "pallas_available", lambda: True)
  monkeypatch.setattr(P, "positive_rf_attention_pallas", interpreted)
  ks = jax.random.split(jax.random.key(6), 4)
  q, k, v = (jax.random.normal(kk, (1, 16, 1, 8)) for kk in ks[:3])
  w = jax.random.normal(ks[3], (16, 8))
  run = lambda component, causal, dtype, impl="auto": A.rf_attention(
      *(t.astype(dtype) for t in (q, k, v)), w, component=component, is_causal=causal,
      implementation=impl)
  with caplog.at_level("WARNING"):
    out = run("oprf", False, jnp.bfloat16)
    assert len(kernel_outputs) == 1
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  np.asarray(jnp.swapaxes(kernel_outputs[0], 1, 2)
                                             .astype(jnp.bfloat16), np.float32))
    np.testing.assert_array_equal(run("oprf", False, jnp.float32),
                                  run("oprf", False, jnp.float32, "xla"))
    for component, causal, dtype in (("posrf", True, jnp.float32),
                                     ("trigrf", False, jnp.bfloat16)):
      run(component, causal, dtype)
    assert len(kernel_outputs) == 1
  for reason in ("float32 features under implementation='auto'",
                 "component 'trigrf' has no positive log-linear form"):
    assert caplog.text.count(f"Pallas attention not used ({reason}") == 1, reason
