"""The causal Pallas kernels (interpret mode on CPU) against ``causal_log_attention``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectraformer_jax import attention as A
from spectraformer_jax import pallas_attention as P
from spectraformer_jax import pallas_causal
from spectraformer_jax.causal import causal_log_attention
from spectraformer_jax.components import LogLinear, log_linear_logits
from spectraformer_jax.pallas_causal import causal_rf_attention_pallas

# n not a multiple of the 16-row chunk (3 chunks), d, m, dv not powers of two.  Batch 1 is
# batch 0's inputs with the query/key projections scaled by 30: logits in the hundreds.
B, H, N, D, M, DV = 2, 2, 45, 12, 20, 6
CHUNK = 16
SCALES = (1.0, 30.0)
_HI = jax.lax.Precision.HIGHEST


def _inputs(seed: int = 0):
  """A random log-linear form (per-head ``col``, per-row offsets), ``W``, values and a probe."""
  ks = jax.random.split(jax.random.key(seed), 8)
  nrm = jax.random.normal
  scale = jnp.array(SCALES)[:, None, None, None]
  xq, xk = 0.5 * nrm(ks[0], (1, H, N, D)), 0.5 * nrm(ks[1], (1, H, N, D))
  form = LogLinear(xq=scale * xq, xk=scale * xk, col=0.3 * nrm(ks[2], (B, H, M)),
                   row_q=0.3 * nrm(ks[3], (B, H, N)), row_k=0.3 * nrm(ks[4], (B, H, N)))
  return form, 0.5 * nrm(ks[5], (M, D)), nrm(ks[6], (B, H, N, DV)), nrm(ks[7], (B, H, N, DV))


def _masks():
  """Ragged key lengths with a hole (key 3 of head 0 masked), ragged query lengths."""
  kv_mask = (jnp.arange(N) < jnp.array([N, 30])[:, None]).at[0, 3].set(False)
  q_mask = jnp.arange(N) < jnp.array([40, N])[:, None]
  return kv_mask[None], q_mask[None]


def _pallas(form, w, v, kv_mask, q_mask):
  return causal_rf_attention_pallas(form, w, v, kv_mask, q_mask, chunk_rows=CHUNK,
                                    interpret=True)


def _reference(form, w, v, kv_mask, q_mask):
  lq = log_linear_logits(form.xq, w, form.col, form.row_q)
  lk = log_linear_logits(form.xk, w, form.col, form.row_k)
  return causal_log_attention(lq, lk, v, chunk_size=CHUNK, mask=kv_mask, q_mask=q_mask,
                              precision=_HI)


def _value_and_grads(fn):
  """jit of ``(out, d/d(form, w, v) sum(out * probe))``."""
  def run(form, w, v, kv_mask, q_mask, probe):
    loss = lambda f, w, v: jnp.sum(fn(f, w, v, kv_mask, q_mask) * probe)
    return fn(form, w, v, kv_mask, q_mask), jax.grad(loss, argnums=(0, 1, 2))(form, w, v)
  return jax.jit(run)


_PALLAS = _value_and_grads(_pallas)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_values_and_gradients_equal_causal_log_attention_also_for_large_logits():
  """Masked keys and queries, 3 chunks with a partial one.  Both sides round each logit to
  float32 (``|logit| * 2^-24``, ~1e-7 at scale 1 and ~1e-5 at scale 30 where logits reach a
  few hundred) and sum in different orders: the tolerances are about 10x that, gradients 10x
  more (sums of many such terms)."""
  form, w, v, probe = _inputs()
  kv_mask, q_mask = _masks()
  out_p, (gf_p, gw_p, gv_p) = _PALLAS(form, w, v, kv_mask, q_mask, probe)
  out_r, (gf_r, gw_r, gv_r) = _value_and_grads(_reference)(form, w, v, kv_mask, q_mask, probe)
  for b, tol in zip(range(B), (1e-6, 1e-5)):
    assert _rel(out_p[b], out_r[b]) < tol, b
    for name in ("xq", "xk", "col", "row_k"):
      g = getattr(gf_p, name)[b]
      assert np.all(np.isfinite(np.asarray(g))), name
      assert _rel(g, getattr(gf_r, name)[b]) < 10 * tol, (b, name)
    assert _rel(gv_p[b], gv_r[b]) < 10 * tol, b
    assert np.max(np.abs(np.asarray(gf_p.row_q[b]))) < 1e-5   # cancels in the ratio
  assert _rel(gw_p, gw_r) < 1e-4
  masked_q = ~np.asarray(jnp.broadcast_to(q_mask, (B, H, N)))
  assert np.all(np.asarray(out_p)[masked_q] == 0.0)


def test_float16_operands_stay_close_also_for_large_logits():
  """float16 values and feature operands (float32 exponentials and accumulators): error near
  float16 rounding (2^-11 ~ 5e-4) times 4, gradients times 20, at both logit scales."""
  form, w, v, probe = _inputs()
  kv_mask, q_mask = _masks()

  def half(form, w, v, kv_mask, q_mask):
    return causal_rf_attention_pallas(form, w, v.astype(jnp.float16), kv_mask, q_mask,
                                      feature_dtype=jnp.float16, chunk_rows=CHUNK,
                                      interpret=True)

  out_h, grads_h = _value_and_grads(half)(form, w, v, kv_mask, q_mask, probe)
  out_r, grads_r = _value_and_grads(_reference)(form, w, v, kv_mask, q_mask, probe)
  assert _rel(out_h, out_r) < 2e-3
  (gf_h, *rest_h), (gf_r, *rest_r) = grads_h, grads_r
  pairs = [(getattr(gf_h, n), getattr(gf_r, n)) for n in ("xq", "xk", "col", "row_k")]
  for a, b in pairs + list(zip(rest_h, rest_r)):
    assert np.all(np.isfinite(np.asarray(a)))
    assert _rel(a, b) < 1e-2


def test_causality_a_token_changes_nothing_before_it():
  """Perturbing every input at position t leaves the outputs before t and the gradients (of a
  loss on those outputs) unchanged, and those gradients are zero from t on."""
  form, w, v, probe = _inputs(1)
  kv_mask, q_mask = _masks()
  t = 21
  probe = probe.at[..., t:, :].set(0.0)
  bump = lambda x: x.at[..., t, :].add(1.5)
  moved = form._replace(xq=bump(form.xq), xk=bump(form.xk),
                        row_k=form.row_k.at[..., t].add(2.0))
  out0, (gf0, _, gv0) = _PALLAS(form, w, v, kv_mask, q_mask, probe)
  out1, (gf1, _, gv1) = _PALLAS(moved, w, bump(v), kv_mask, q_mask, probe)
  np.testing.assert_allclose(out1[..., :t, :], out0[..., :t, :], rtol=1e-6, atol=1e-6)
  for a, b in ((gf0.xq, gf1.xq), (gf0.xk, gf1.xk), (gv0, gv1)):
    np.testing.assert_allclose(a[..., :t, :], b[..., :t, :], rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(b[..., t:, :]) == 0.0)
  assert not np.allclose(out1[..., t:, :], out0[..., t:, :])


@pytest.mark.parametrize("component,dtype,tol", [("posrf", jnp.float32, 1e-5),
                                                 ("gerf", jnp.bfloat16, 1e-2)])
def test_rf_attention_pallas_equals_xla_causal(component, dtype, tol):
  """``rf_attention(is_causal=True)``: the kernels equal the XLA path (values, gradients
  w.r.t. q, k, v, W and GERF's A).  float32: rounding (~1e-7) times 100; bfloat16: feature
  operands rounded to 2^-9 ~ 2e-3 on the kernel side only, times 5."""
  ks = jax.random.split(jax.random.key(2), 5)
  q, k, v = (jax.random.normal(kk, (1, 40, 2, 16)).astype(dtype) for kk in ks[:3])
  w = jax.random.normal(ks[3], (16, 16))
  params = {"gerf_a_raw": jnp.float32(1.0)} if component == "gerf" else None
  kv_mask = jnp.arange(40)[None] < 33
  probe = jax.random.normal(ks[4], (1, 40, 2, 16))

  def run(impl):
    def loss(q, k, v, w, params):
      out = A.rf_attention(q, k, v, w, component=component, params=params, kv_mask=kv_mask,
                           is_causal=True, implementation=impl)
      return jnp.sum(out.astype(jnp.float32) * probe), out
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(q, k, v, w, params)

  (grads_p, out_p), (grads_x, out_x) = run("pallas"), run("xla")
  assert _rel(out_p, out_x) < tol
  for i, (a, b) in enumerate(zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_x))):
    assert _rel(a, b) < 5 * tol, i


def test_causal_calls_route_to_the_kernels_when_asked_and_to_xla_under_auto(monkeypatch, caplog):
  """With a GPU reported, ``"pallas"`` sends causal positive log-linear calls to the causal
  kernels (float32 and 16-bit); ``"auto"`` keeps causal calls on the (faster) XLA core, and
  signed components (TrigRF) stay on XLA under both, each reason logged once."""
  calls = []

  def fake(form, w, v, kv_mask=None, q_mask=None, **kw):
    calls.append(kw["feature_dtype"])
    return jnp.zeros(v.shape, jnp.float32)

  P._log_once.cache_clear()
  monkeypatch.setattr(P, "pallas_available", lambda: True)
  monkeypatch.setattr(pallas_causal, "causal_rf_attention_pallas", fake)
  q = jax.random.normal(jax.random.key(3), (1, 16, 1, 8))
  w = jax.random.normal(jax.random.key(4), (8, 8))
  run = lambda component, dtype, impl: jax.jit(lambda x: A.rf_attention(
      x, x, x, w, component=component, is_causal=True, implementation=impl))(q.astype(dtype))
  with caplog.at_level("WARNING"):
    run("posrf", jnp.bfloat16, "pallas")
    run("posrf", jnp.float32, "pallas")
    assert calls == [jnp.bfloat16, jnp.float32]
    for impl in ("auto", "pallas"):
      run("posrf", jnp.bfloat16, "auto")
      run("trigrf", jnp.bfloat16, impl)
  assert calls == [jnp.bfloat16, jnp.float32]
  for reason in ("causal attention under implementation='auto'",
                 "component 'trigrf' has no positive log-linear form"):
    assert caplog.text.count(f"Pallas attention not used ({reason}") == 1, reason
  P._log_once.cache_clear()


def _lowered_triton_calls(fn, *args) -> int:
  exported = jax.export.export(
      jax.jit(fn), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
          *args)
  return exported.mlir_module().count("stablehlo.custom_call @__gpu$xla.gpu.triton")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_to_triton_for_cuda(dtype):
  """Forward (2 kernels) and gradient (4 kernels) lower through Pallas' Triton backend on this
  CPU machine: catches operations Triton cannot express."""
  form, w, v, _ = _inputs()
  fn = lambda f, w, v: causal_rf_attention_pallas(f, w, v.astype(dtype), feature_dtype=dtype,
                                                  chunk_rows=CHUNK, interpret=False)
  assert _lowered_triton_calls(fn, form, w, v) == 2
  grad = jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=(0, 1, 2))
  assert _lowered_triton_calls(grad, form, w, v) == 4


def test_bad_arguments_name_the_value():
  form, w, v, _ = _inputs()
  with pytest.raises(ValueError, match="power of two >= 16, got 24"):
    causal_rf_attention_pallas(form, w, v, chunk_rows=24)
  short = form._replace(xk=form.xk[..., :30, :], row_k=form.row_k[..., :30])
  with pytest.raises(ValueError, match="equal query and key lengths, got 45 and 30"):
    causal_rf_attention_pallas(short, w, v)
  with pytest.raises(ValueError, match="float64"):
    causal_rf_attention_pallas(form, w, v, feature_dtype=jnp.float64)
