"""The causal cores' two schedules: the chunk-parallel form equals the recurrent one and an
independent float64 reference, stays exact far beyond float32's exponent range, and has no
sequential loop over chunks nor per-position states."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from spectraformer_jax import causal

B, N, F, DV = 2, 45, 8, 3
_HI = jax.lax.Precision.HIGHEST


def _inputs(seed: int, trend: float = 0.0):
  """Log-features ``lq, lk [B, N, F]`` (keys growing by ``trend`` over the sequence), signed
  factors ``sq, sk``, values ``v [B, N, DV]`` and a ragged key mask (batch row 1 starts with 7
  masked keys, so its first queries see no key)."""
  ks = jax.random.split(jax.random.key(seed), 5)
  lq = jax.random.normal(ks[0], (B, N, F))
  lk = jax.random.normal(ks[1], (B, N, F)) + trend * jnp.linspace(0.0, 1.0, N)[:, None]
  sq, sk = jnp.cos(3.0 * jax.random.normal(ks[2], (2, B, N, F)))
  v = jax.random.normal(ks[3], (B, N, DV))
  mask = (jax.random.uniform(ks[4], (B, N)) < 0.8).at[1, :7].set(False)
  return lq, lk, sq, sk, v, mask


def _reference(lq, lk, v, mask, sq=None, sk=None):
  """``sum_{j <= i} w_ij v_j / sum_{j <= i} w_ij`` with ``w_ij = sum_r sq sk exp(lq + lk)``, in
  float64: log-sum-exp over columns, each row shifted by its own maximum (a row constant cancels
  in the ratio); rows without a visible key are 0."""
  lq, lk, v = (np.asarray(t, np.float64) for t in (lq, lk, v))
  logits = lq[:, :, None, :] + lk[:, None, :, :]                    # [B, i, j, F]
  allowed = np.tril(np.ones((N, N), bool)) & np.asarray(mask)[:, None, :]
  shift = np.max(np.where(allowed[..., None], logits, -np.inf), axis=(2, 3), keepdims=True)
  shift = np.where(np.isfinite(shift), shift, 0.0)
  terms = np.exp(logits - shift)
  if sq is not None:
    terms = terms * np.asarray(sq, np.float64)[:, :, None, :] * np.asarray(sk, np.float64)[:, None]
  w = np.where(allowed, terms.sum(-1), 0.0)
  den = w.sum(-1, keepdims=True)
  return np.where(den != 0, (w @ v) / np.where(den != 0, den, 1.0), 0.0)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_schedules_equal_the_float64_reference_across_a_large_key_trend():
  """Keys grow by 400 over the sequence (``exp`` of the raw logits overflows float32), chunk
  sizes that do not divide n.  Positive rows carry only float32 rounding of logits ~400
  (400 * 2^-24 ~ 2e-5 relative per term); signed features cancel and need 1e-4."""
  lq, lk, sq, sk, v, mask = _inputs(0, trend=400.0)
  cases = [(signed, chunk, schedule) for signed in (False, True)
           for chunk, schedule in ((4, "parallel"), (16, "recurrent"))]

  @jax.jit
  def outputs(lq, lk, sq, sk, v):
    return [causal.causal_log_attention(lq, lk, v, *((sq, sk) if signed else (None, None)),
                                        chunk, mask=mask, guard=signed, schedule=schedule)
            for signed, chunk, schedule in cases]

  with jax.default_matmul_precision("highest"):
    outs = outputs(lq, lk, sq, sk, v)
  refs = {signed: _reference(lq, lk, v, mask, *((sq, sk) if signed else (None, None)))
          for signed in (False, True)}
  for (signed, chunk, schedule), out in zip(cases, outs):
    assert np.all(np.isfinite(np.asarray(out)))
    assert _rel(out, refs[signed]) < (1e-4 if signed else 3e-5), (signed, chunk, schedule)


def test_parallel_gradients_equal_the_recurrent_ones():
  lq, lk, sq, sk, v, mask = _inputs(1, trend=50.0)
  probe = jax.random.normal(jax.random.key(2), (B, N, DV))

  def loss(lq, lk, v, sq, sk, schedule, signed):
    s = (sq, sk) if signed else (None, None)
    out = causal.causal_log_attention(lq, lk, v, *s, 8, mask=mask, guard=signed,
                                      schedule=schedule)
    return jnp.sum(jnp.tanh(out) * probe)

  @jax.jit
  def grads(*args):
    return {(schedule, signed): jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*args, schedule, signed)
            for schedule in causal.SCHEDULES for signed in (False, True)}

  with jax.default_matmul_precision("highest"):
    g = grads(lq, lk, v, sq, sk)
  for signed in (False, True):
    par, rec = g["parallel", signed], g["recurrent", signed]
    for name, a, b in zip(("lq", "lk", "v", "sq", "sk"), par, rec):
      assert np.all(np.isfinite(np.asarray(a))), name
      if signed or name in ("lq", "lk", "v"):
        assert _rel(a, b) < 1e-5, (signed, name)


def test_feature_product_schedules_agree():
  ks = jax.random.split(jax.random.key(3), 3)
  pq, pk = (jnp.exp(0.5 * jax.random.normal(kk, (B, N, F))) for kk in ks[:2])
  v = jax.random.normal(ks[2], (B, N, DV))
  run = jax.jit(lambda *a: [causal.causal_linear_attention(*a, 16, schedule=s)
                            for s in causal.SCHEDULES])
  with jax.default_matmul_precision("highest"):
    par, rec = run(pq, pk, v)
  assert _rel(par, rec) < 1e-6


def _loops_and_biggest(fn, *args):
  """Loop primitives in the jaxpr of ``fn`` (sub-jaxprs included) and its largest array size."""
  loops, biggest = set(), 0

  def visit(jaxpr):
    nonlocal biggest
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ("scan", "while"):
        loops.add(eqn.primitive.name)
      for var in eqn.outvars:
        biggest = max(biggest, int(np.prod(getattr(var.aval, "shape", ()) or (1,))))
      for p in eqn.params.values():
        for sub in p if isinstance(p, (list, tuple)) else [p]:
          if hasattr(sub, "jaxpr"):
            visit(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
          elif hasattr(sub, "eqns"):
            visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return loops, biggest


@pytest.mark.parametrize("signed", [False, True])
def test_parallel_schedule_has_no_loop_over_chunks_and_no_per_position_state(signed):
  """Forward + backward: no ``scan``/``while`` (the chunks are not visited one after another)
  and nothing as large as per-position states ``[n, F, dv]``; the recurrent schedule loops."""
  n, f, dv, chunk = 512, 32, 24, 32
  ks = jax.random.split(jax.random.key(4), 3)
  lq, lk = (jax.random.normal(kk, (1, n, f)) for kk in ks[:2])
  v = jax.random.normal(ks[2], (1, n, dv))
  s = (jnp.cos(lq), jnp.sin(lk)) if signed else (None, None)

  def fn(schedule):
    return jax.grad(lambda a, b, c: jnp.sum(causal.causal_log_attention(
        a, b, c, *s, chunk, guard=signed, schedule=schedule)), argnums=(0, 1, 2))

  loops, biggest = _loops_and_biggest(fn("parallel"), lq, lk, v)
  assert not loops
  assert biggest < n * f * dv // 4
  assert _loops_and_biggest(fn("recurrent"), lq, lk, v)[0] == {"scan"}
  feature_loops, _ = _loops_and_biggest(jax.grad(lambda a, b, c: jnp.sum(
      causal.causal_linear_attention(jnp.exp(a), jnp.exp(b), c, chunk)), argnums=(0, 1, 2)),
      lq, lk, v)
  assert not feature_loops


def test_bad_schedule_names_the_choices():
  lq, lk, _, _, v, _ = _inputs(5)
  with pytest.raises(ValueError, match=r"schedule must be one of \('parallel', 'recurrent'\)"):
    causal.causal_log_attention(lq, lk, v, schedule="sequential")
  with pytest.raises(ValueError, match="schedule"):
    causal.causal_prefix_product(lq, lk, v, schedule="scan")
