"""Tests for spectraformer_jax.weights (fixed weight generators) and their registry entries."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from spectraformer_jax import registry
from spectraformer_jax import weights

FIXED = ["iid", "orf", "sorf", "scrf", "rom", "simrf", "qmc", "mm", "sgq", "fastfood"]
# Rows exactly N(0, I_d) marginally (documented in weights.py).
EXACT_GAUSSIAN = ["iid", "orf", "scrf", "simrf", "qmc", "fastfood"]
# Approximately Gaussian rows (structured Hadamard products with chi norms).
APPROX_GAUSSIAN = ["sorf", "rom"]
SHAPES = [(100, 24), (7, 5), (1, 1)]


def _gen(name, **kw):
  f = getattr(weights, name)
  return lambda key, m, d: f(key, m, d, **kw)


def _many(name, m, d, n_keys, seed=0, **kw):
  f = _gen(name, **kw)
  keys = jax.random.split(jax.random.PRNGKey(seed), n_keys)
  return np.asarray(jax.jit(jax.vmap(lambda k: f(k, m, d)))(keys), np.float64)


# ----------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", FIXED)
def test_shapes_dtype_jit_determinism(name):
  f = getattr(weights, name)
  jf = jax.jit(f, static_argnums=(1, 2))
  for m, d in SHAPES:
    key = jax.random.PRNGKey(3)
    w = jf(key, m, d)
    assert w.shape == (m, d) and w.dtype == jnp.float32, (name, m, d, w.shape, w.dtype)
    assert np.all(np.isfinite(np.asarray(w)))
    if (m, d) == (7, 5):  # eager == jit (eager is slow for the structured ones: one shape)
      np.testing.assert_allclose(np.asarray(w), np.asarray(f(key, m, d)), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(jf(key, m, d)), np.asarray(w))  # same key, same W
    if m * d > 1:
      w2 = jf(jax.random.PRNGKey(4), m, d)
      assert not np.allclose(np.asarray(w2), np.asarray(w)), (name, m, d)


@pytest.mark.parametrize("name", FIXED)
def test_traced_key_inside_jit_and_vmap(name):
  f = getattr(weights, name)

  @jax.jit
  def g(seed):
    key = jax.random.fold_in(jax.random.PRNGKey(0), seed)  # traced key
    return f(key, 100, 24)

  w = g(jnp.int32(5))
  assert w.shape == (100, 24)
  ws = jax.vmap(lambda k: f(k, 100, 24))(jax.random.split(jax.random.PRNGKey(0), 3))
  assert ws.shape == (3, 100, 24)


def test_bad_arguments():
  with pytest.raises(ValueError):
    weights.iid(jax.random.PRNGKey(0), 0, 4)
  with pytest.raises(TypeError):
    weights.orf(jax.random.PRNGKey(0), 4.0, 4)
  with pytest.raises(ValueError, match="norm"):
    weights.orf(jax.random.PRNGKey(0), 4, 4, norm="bad")
  with pytest.raises(ValueError, match="sequence"):
    weights.qmc(jax.random.PRNGKey(0), 4, 4, sequence="bad")


# ----------------------------------------------------------------------------- moments


@pytest.mark.parametrize("name", EXACT_GAUSSIAN + APPROX_GAUSSIAN + ["mm"])
def test_first_and_second_moments(name):
  """E[omega] = 0 and E[omega omega^T] = I, within 5 standard errors (over keys) + 1e-3."""
  m, d, n = 100, 24, 300
  w = _many(name, m, d, n)
  mean_per_key = w.mean(axis=1)  # [n, d]
  second_per_key = np.einsum("kmi,kmj->kij", w, w) / m  # [n, d, d]
  for per_key, target in ((mean_per_key, np.zeros(d)), (second_per_key, np.eye(d))):
    est = per_key.mean(axis=0)
    se = per_key.std(axis=0) / math.sqrt(n)
    assert np.all(np.abs(est - target) <= 5 * se + 1e-3), (name, np.max(np.abs(est - target) / (se + 1e-9)))


@pytest.mark.parametrize("name", EXACT_GAUSSIAN)
def test_marginal_law_is_gaussian(name):
  """One row per key projected on a fixed direction is N(0, 1); its squared norm is chi^2(d)."""
  m, d, n = 100, 24, 600
  w = _many(name, m, d, n, seed=1)
  u = np.random.default_rng(0).standard_normal(d)
  u /= np.linalg.norm(u)
  for row in (0, 37, 99):
    proj = w[:, row, :] @ u
    assert stats.kstest(proj, "norm").pvalue > 1e-4, (name, row)
    sq = np.sum(w[:, row, :] ** 2, axis=-1)
    assert stats.kstest(sq, stats.chi2(d).cdf).pvalue > 1e-4, (name, row)


def test_approx_gaussian_norms():
  """sorf / rom with the default chi norms: squared row norms are chi^2(d)."""
  for name in APPROX_GAUSSIAN:
    w = _many(name, 64, 32, 600, seed=2)
    sq = np.sum(w[:, 5, :] ** 2, axis=-1)
    assert stats.kstest(sq, stats.chi2(32).cdf).pvalue > 1e-3, name


# ----------------------------------------------------------------------------- structure


def test_fwht_matches_dense_hadamard():
  for p in (1, 2, 8, 64):
    x = jax.random.normal(jax.random.PRNGKey(p), (3, p))
    h = weights.hadamard(p)
    np.testing.assert_allclose(np.asarray(weights.fwht(x)), np.asarray(x @ h), atol=1e-5)
    np.testing.assert_allclose(np.asarray(h @ h), np.eye(p), atol=1e-5)


def test_orf_blocks_orthogonal_and_norms():
  d = 24
  w = np.asarray(weights.orf(jax.random.PRNGKey(0), 100, d), np.float64)
  for b in range(100 // d):
    blk = w[b * d:(b + 1) * d]
    g = blk @ blk.T
    np.testing.assert_allclose(g - np.diag(np.diag(g)), 0, atol=1e-4)
  wf = np.asarray(weights.orf(jax.random.PRNGKey(0), 100, d, norm="fixed"))
  np.testing.assert_allclose(np.linalg.norm(wf, axis=1), math.sqrt(d), rtol=1e-5)


@pytest.mark.parametrize("norm", ["chi", "native"])
def test_sorf_structure(norm):
  d = 32  # power of two: blocks exactly orthogonal
  w = np.asarray(weights.sorf(jax.random.PRNGKey(0), 70, d, norm=norm), np.float64)
  for b in range(2):
    blk = w[b * d:(b + 1) * d]
    g = blk @ blk.T
    np.testing.assert_allclose(g - np.diag(np.diag(g)), 0, atol=1e-3)
  if norm == "native":
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), math.sqrt(d), rtol=1e-5)
    # d not a power of two: the p native rows of a block are a tight frame, W_b^T W_b = p I_d.
    w24 = np.asarray(weights.sorf(jax.random.PRNGKey(1), 32, 24, norm="native"), np.float64)
    np.testing.assert_allclose(w24.T @ w24, 32 * np.eye(24), atol=1e-3)


def test_hadamard_product_matches_dense():
  p = 8
  diags = jax.random.rademacher(jax.random.PRNGKey(0), (3, 2, p), jnp.float32)
  got = weights._hd_product_rows(diags)  # pylint: disable=protected-access
  h = weights.hadamard(p)
  for b in range(2):
    dense = h @ jnp.diag(diags[0, b]) @ h @ jnp.diag(diags[1, b]) @ h @ jnp.diag(diags[2, b])
    np.testing.assert_allclose(np.asarray(got[b]), np.asarray(dense), atol=1e-5)


def test_scrf_rows_are_signed_rolls():
  d = 5
  w = np.asarray(weights.scrf(jax.random.PRNGKey(0), 12, d))
  for b in range(2):
    blk = w[b * d:(b + 1) * d]
    for i in range(d):
      np.testing.assert_allclose(np.abs(blk[i]), np.abs(np.roll(blk[0], i)), rtol=1e-6)


def test_rom_entries_unit_variance_and_native_norms():
  w = _many("rom", 64, 32, 200, norm="native")
  np.testing.assert_allclose(np.mean(w ** 2), 1.0, atol=0.02)
  sq = np.sum(w ** 2, axis=-1).ravel()
  # native squared norms: mean d, spread ~ sqrt(d/2) (narrower than chi^2's sqrt(2 d)).
  assert abs(sq.mean() - 32) < 0.3 and 2.0 < sq.std() < 6.0, (sq.mean(), sq.std())


def test_simrf_simplex_angles():
  for d in (5, 24):
    w = np.asarray(weights.simrf(jax.random.PRNGKey(0), 2 * d + 1, d), np.float64)
    for b in range(2):
      blk = w[b * d:(b + 1) * d]
      u = blk / np.linalg.norm(blk, axis=1, keepdims=True)
      c = u @ u.T
      np.testing.assert_allclose(c[~np.eye(d, dtype=bool)], -1.0 / (d - 1), atol=1e-5)


def test_qmc_first_coordinate_is_stratified():
  """Sobol's first coordinate is a (0, 1)-sequence: m = 2^k points, one per interval [j/m, (j+1)/m)."""
  m = 64
  for scramble in ("lms", "shift"):
    w = weights.qmc(jax.random.PRNGKey(7), m, 6, scramble=scramble)
    u = stats.norm.cdf(np.asarray(w[:, 0], np.float64))
    counts = np.bincount(np.floor(u * m).astype(int), minlength=m)
    assert np.all(counts == 1), (scramble, counts)
  wh = weights.qmc(jax.random.PRNGKey(7), m, 6, sequence="halton")
  assert wh.shape == (m, 6) and np.all(np.isfinite(np.asarray(wh)))


def test_qmc_tails_symmetric():
  w = _many("qmc", 64, 4, 2000, seed=3).ravel()
  assert abs(np.mean(w > 3.0) - np.mean(w < -3.0)) < 5e-4
  assert np.isfinite(w).all()


def test_mm_exact_moments():
  for m, d in ((100, 24), (33, 32), (500, 64)):
    w = np.asarray(weights.mm(jax.random.PRNGKey(1), m, d), np.float64)
    np.testing.assert_allclose(w.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(w.T @ w / m, np.eye(d), atol=2e-4)
  # m <= d: centred, mean squared norm d.
  w = np.asarray(weights.mm(jax.random.PRNGKey(1), 10, 24), np.float64)
  np.testing.assert_allclose(w.mean(axis=0), 0, atol=1e-5)
  np.testing.assert_allclose(np.mean(np.sum(w ** 2, axis=1)), 24, rtol=1e-5)


def test_sparse_grid_rule_is_exact():
  for d, level in ((3, 2), (3, 3), (4, 4), (1, 3)):
    x, wt = weights.sparse_grid_gauss_hermite(d, level)
    np.testing.assert_allclose(wt.sum(), 1.0, atol=1e-12)
    np.testing.assert_allclose(wt @ x[:, 0] ** 2, 1.0, atol=1e-10)
    np.testing.assert_allclose(wt @ x[:, 0], 0.0, atol=1e-10)
    if level >= 3:
      np.testing.assert_allclose(wt @ x[:, 0] ** 4, 3.0, atol=1e-10)
      if d > 1:
        np.testing.assert_allclose(wt @ (x[:, 0] ** 2 * x[:, 1] ** 2), 1.0, atol=1e-10)
  assert len(weights.sparse_grid_gauss_hermite(32, 2)[1]) == 65
  assert len(weights.sparse_grid_gauss_hermite(5, 3)[1]) == 2 * 25 + 4 * 5 + 1
  assert weights._sgq_count(5, 3) == 71  # pylint: disable=protected-access


def test_sgq_rotated_nodes_and_weights():
  m, d = 100, 24  # level 2: 49 nodes per grid, 3 rotated copies (the last partial)
  w = np.asarray(weights.sgq(jax.random.PRNGKey(0), m, d), np.float64)
  nodes, wt = weights.sparse_grid_gauss_hermite(d, 2)
  n = len(wt)
  np.testing.assert_allclose(np.sort(np.linalg.norm(w[:n], axis=1)),
                             np.sort(np.linalg.norm(nodes, axis=1)), atol=1e-5)
  qw = weights.sgq_weights(m, d)
  assert qw.shape == (m,)
  # A complete rotated grid with its weights integrates omega omega^T exactly.
  np.testing.assert_allclose((w[:n] * qw[:n, None]).T @ w[:n], np.eye(d), atol=1e-4)


def test_fastfood_matches_dense_formula():
  m, d = 20, 6
  f = weights.fastfood_draw(jax.random.PRNGKey(0), m, d)
  w = np.asarray(weights.fastfood(jax.random.PRNGKey(0), m, d), np.float64)
  p = 8
  h = np.asarray(weights.hadamard(p), np.float64)
  s = np.asarray(f["S"], np.float64)
  for b in range(3):
    pi = np.eye(p)[np.asarray(f["perm"][b])]  # (Pi v)_i = v[perm[i]]
    bb = np.concatenate([np.asarray(f["B"][b]), np.ones(p - d)])
    dense = h @ np.diag(np.asarray(f["G"][b])) @ pi @ h @ np.diag(bb)
    rows = slice(b * p, min(m, (b + 1) * p))
    nrows = rows.stop - rows.start
    np.testing.assert_allclose(w[rows], dense[:nrows, :d] * s[rows, None], atol=1e-5)


# ----------------------------------------------------------------------------- kernel (light)


@pytest.mark.parametrize("name", EXACT_GAUSSIAN + APPROX_GAUSSIAN)
def test_posrf_kernel_mean_light(name):
  """Small-norm smoke check of unbiasedness (the full test lives with the components)."""
  m, d, n = 32, 16, 2000
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, d))
  x *= 0.6 / np.linalg.norm(x, axis=1, keepdims=True)
  y = rng.standard_normal((4, d))
  y *= 0.6 / np.linalg.norm(y, axis=1, keepdims=True)
  f = getattr(weights, name)
  xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)

  def est(key):
    w = f(key, m, d)
    z = (xj + yj) @ w.T
    return jnp.mean(jnp.exp(z - 0.5 * jnp.sum(xj ** 2, -1, keepdims=True)
                            - 0.5 * jnp.sum(yj ** 2, -1, keepdims=True)), axis=-1)

  e = np.asarray(jax.jit(jax.vmap(est))(jax.random.split(jax.random.PRNGKey(11), n)), np.float64)
  true = np.exp(np.sum(x * y, axis=1))
  z = (e.mean(0) - true) / (e.std(0) / math.sqrt(n))
  assert np.all(np.abs(z) < 4.5), (name, z)


# ----------------------------------------------------------------------------- registry


def test_registry_names_and_alias():
  assert registry.get_weight("gaus") is registry.get_weight("iid")
  for name in FIXED + ["fastfoodl", "gmm", "gaus"]:
    assert name in registry.weight_names()
  with pytest.raises(ValueError) as err:
    registry.get_weight("nonsense")
  msg = str(err.value)
  assert "nonsense" in msg
  for name in FIXED + ["fastfoodl", "gmm", "gaus"]:
    assert name in msg


@pytest.mark.parametrize("name", sorted(registry.WEIGHTS))
def test_registry_spec_init_matrix_under_jit(name):
  spec = registry.get_weight(name)
  assert spec.name == name

  @jax.jit
  def draw(key):
    params, buffers = spec.init(key, 100, 24)
    return spec.matrix(params, buffers), params

  w, params = draw(jax.random.PRNGKey(0))
  assert w.shape == (100, 24) and w.dtype == jnp.float32
  assert spec.learnable == bool(jax.tree_util.tree_leaves(params))


def test_every_random_draw_has_its_own_purpose_key(monkeypatch):
  # Generators must not consume the same random bits for different purposes (e.g. qmc's first
  # row and orf's chi norms): every draw goes through a distinct purpose string, and the
  # resulting sub-keys are distinct and deterministic in the key.
  seen = []
  real = weights.purpose_keys
  monkeypatch.setattr(weights, "purpose_keys", lambda key, *p: seen.extend(p) or real(key, *p))
  key = jax.random.PRNGKey(0)
  for name in ("iid", "orf", "sorf", "scrf", "rom", "simrf", "qmc", "mm", "sgq", "fastfood"):
    getattr(weights, name)(key, 8, 4)
  weights.qmc(key, 8, 4, sequence="halton")
  assert len(seen) == len(set(seen)) >= 20
  data = [tuple(np.asarray(jax.random.key_data(k)).ravel()) for k in real(key, *seen)]
  assert len(set(data)) == len(seen)
  again = [tuple(np.asarray(jax.random.key_data(k)).ravel()) for k in real(key, *seen)]
  assert again == data
