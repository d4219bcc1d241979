"""Component functions and their statistics: shapes, dtypes, stability, masks, jit/grad.

Uses its own Gaussian W (independent of weights.py); the statistical checks across all weight
matrices live in test_estimators.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectraformer_jax import components as C
from spectraformer_jax import stats

PAIRS = {
    "trigrf": (C.trigrf_features, 2),
    "posrf": (C.posrf_features, 1),
    "oprf": (C.oprf_features, 1),
    "gerf": (C.gerf_features, 1),
    "gerf_s-1": (functools.partial(C.gerf_features, s=-1), 2),
    "sderf": (C.sderf_features, 1),
    "aderf": (C.aderf_features, 1),
    "saderf": (C.saderf_features, 1),
}
NAMES = sorted(PAIRS)


def _data(b=2, h=3, n=7, l=5, d=6, m=10, scale=0.7, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = scale * jax.random.normal(k[0], (b, h, n, d))
  y = scale * jax.random.normal(k[1], (b, h, l, d))
  w = jax.random.normal(k[2], (m, d))
  return x, y, w


def _est(px, py):
  return jnp.einsum("...nf,...lf->...nl", px, py, precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_dtype(name):
  # m = 10 not divisible by d = 6, d not a power of two.
  f, mult = PAIRS[name]
  x, y, w = _data()
  for dt in (jnp.float32, jnp.bfloat16):
    px, py = f(x.astype(dt), y.astype(dt), w)
    assert px.shape == (2, 3, 7, 10 * mult) and py.shape == (2, 3, 5, 10 * mult)
    assert px.dtype == jnp.float32 and py.dtype == jnp.float32
    assert np.all(np.isfinite(px)) and np.all(np.isfinite(py))


def test_trigrf_has_2m_features_and_matches_phi():
  x, y, w = _data()
  px, py = C.trigrf_features(x, y, w, stabilize=False)
  np.testing.assert_allclose(px, C.trigrf_phi(x, w), rtol=1e-5)
  np.testing.assert_allclose(py, C.trigrf_phi(y, w), rtol=1e-5)


def test_per_side_functions_match_pair_functions():
  x, y, w = _data()
  np.testing.assert_allclose(C.posrf_features(x, y, w, stabilize=False)[0], C.posrf_phi(x, w),
                             rtol=1e-5)
  a = stats.oprf_a(x, y)
  px, py = C.oprf_features(x, y, w, stabilize=False)
  np.testing.assert_allclose(px, C.oprf_phi(x, w, a), rtol=1e-5)
  np.testing.assert_allclose(py, C.oprf_phi(y, w, a), rtol=1e-5)
  q, a = stats.sderf_params(x, y)
  np.testing.assert_allclose(C.sderf_features(x, y, w, stabilize=False)[1],
                             C.sderf_phi(y, w, q, a), rtol=1e-4)
  psi, a = stats.aderf_params(x, y)
  px, py = C.aderf_features(x, y, w, stabilize=False)
  np.testing.assert_allclose(px, C.aderf_phi(x, w, psi, a, "query"), rtol=1e-5)
  np.testing.assert_allclose(py, C.aderf_phi(y, w, psi, a, "key"), rtol=1e-5)
  psi = stats.saderf_psi(x, y)
  a = stats.oprf_a(x * psi[..., None, :], y / psi[..., None, :])
  np.testing.assert_allclose(C.saderf_features(x, y, w, stabilize=False)[0],
                             C.saderf_phi(x, w, psi, a, "query"), rtol=1e-5)
  gx, gy = C.gerf_features(x, y, w, stabilize=False, s=-1)
  np.testing.assert_allclose(gx, C.gerf_phi(x, w, 0.0, s=-1), rtol=1e-5, atol=1e-6)
  # GERF with s = -1 and A = 0 is TrigRF; GERF at its init (A = 0, s = +1) is PosRF.
  np.testing.assert_allclose(gx, C.trigrf_phi(x, w), rtol=1e-5, atol=1e-6)
  params = C.gerf_init_params(None, 6)
  assert abs(float(C.gerf_a(params))) < 1e-7
  np.testing.assert_allclose(C.gerf_features(x, y, w, params=params)[0],
                             C.posrf_features(x, y, w)[0], rtol=1e-5)


@pytest.mark.parametrize("name", ["posrf", "oprf", "saderf", "sderf", "aderf", "gerf", "trigrf"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_finite_for_large_norms(name, dtype):
  f, _ = PAIRS[name]
  x, y, w = _data(m=16)
  # rows with norms spread over [0.1, 10]
  rx = jnp.linspace(0.1, 10.0, x.shape[-2])[:, None]
  ry = jnp.linspace(10.0, 0.1, y.shape[-2])[:, None]
  x = x / jnp.linalg.norm(x, axis=-1, keepdims=True) * rx
  y = y / jnp.linalg.norm(y, axis=-1, keepdims=True) * ry
  px, py = f(x.astype(dtype), y.astype(dtype), w)
  assert np.all(np.isfinite(px)) and np.all(np.isfinite(py))
  # the stabilisers leave at least one non-zero feature per query row and per head
  assert np.all(np.max(np.abs(px), -1) > 0)
  assert np.all(np.max(np.abs(py), axis=(-2, -1)) > 0)


@pytest.mark.parametrize("name", NAMES)
def test_masked_keys_give_zero_rows_and_do_not_matter(name):
  f, _ = PAIRS[name]
  x, y, w = _data()
  y_mask = jnp.array([True, True, False, True, False])
  y_mask = jnp.broadcast_to(y_mask, y.shape[:-1])
  x_mask = jnp.broadcast_to(jnp.array([True] * 5 + [False] * 2), x.shape[:-1])
  px, py = f(x, y, w, x_mask=x_mask, y_mask=y_mask)
  assert np.all(np.asarray(py)[..., 2, :] == 0) and np.all(np.asarray(py)[..., 4, :] == 0)
  assert np.all(np.any(np.asarray(py)[..., [0, 1, 3], :] != 0, axis=-1))
  # garbage at masked positions (keys and queries) changes nothing at real positions
  y2 = y.at[..., 2, :].set(50.0).at[..., 4, :].set(-30.0)
  x2 = x.at[..., 5:, :].set(40.0)
  px2, py2 = f(x2, y2, w, x_mask=x_mask, y_mask=y_mask)
  np.testing.assert_allclose(py2, py, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(px2[..., :5, :], px[..., :5, :], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_masked_keys_far_from_real_keys_give_finite_gradients(name):
  # The head stabiliser ignores masked keys, so their shifted log-features can overflow exp;
  # the forward value is masked either way, but the gradient must not become 0 * inf = NaN.
  f, _ = PAIRS[name]
  x, y, w = _data()
  y_mask = jnp.broadcast_to(jnp.array([True, True, True, False, False]), y.shape[:-1])
  params = C.gerf_init_params(None, x.shape[-1]) if name.startswith("gerf") else None
  big_real = (y * 20.0).at[..., 3:, :].set(0.0)  # padding = zero vectors, real keys large
  big_pad = y.at[..., 3:, :].set(20.0)           # padding larger than every real key
  for yy in (big_real, big_pad):
    loss = lambda x, y: jnp.sum(_est(*f(x, y, w, y_mask=y_mask, params=params)))
    val, (gx, gy) = jax.value_and_grad(loss, argnums=(0, 1))(x, yy)
    assert np.isfinite(val)
    assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gy))
    assert np.all(np.asarray(gy)[..., 3:, :] == 0)  # masked keys get no gradient


@pytest.mark.parametrize("name", NAMES)
def test_stabiliser_is_row_times_head_constant(name):
  f, _ = PAIRS[name]
  x, y, w = _data(m=32)
  y_mask = jnp.broadcast_to(jnp.array([True, True, True, False, True]), y.shape[:-1])
  raw = _est(*f(x, y, w, y_mask=y_mask, stabilize=False))
  stab = _est(*f(x, y, w, y_mask=y_mask, stabilize=True))
  keep = np.array([0, 1, 2, 4])
  raw, stab = np.asarray(raw)[..., keep], np.asarray(stab)[..., keep]
  ratio = stab / raw
  # ratio[b, h, i, j] = r(b, h, i) * c(b, h) > 0: constant along keys j
  assert np.all(ratio > 0)
  np.testing.assert_allclose(ratio, np.broadcast_to(ratio[..., :1], ratio.shape), rtol=2e-3)
  # hence attention-normalised outputs are equal
  v = np.asarray(jax.random.normal(jax.random.PRNGKey(9), y.shape))[..., keep, :]
  out_raw = (raw @ v) / raw.sum(-1, keepdims=True)
  out_stab = (stab @ v) / stab.sum(-1, keepdims=True)
  np.testing.assert_allclose(out_stab, out_raw, rtol=2e-3, atol=1e-4)


def test_key_stabiliser_is_per_column_never_per_key():
  # A per-key shift would make the key-side ratio vary over keys; a per-column shift (folded
  # into the query side) may vary over features only.
  x, y, w = _data(m=32)
  for name in NAMES:
    f, _ = PAIRS[name]
    _, py_raw = f(x, y, w, stabilize=False)
    _, py = f(x, y, w, stabilize=True)
    r = np.asarray(py) / np.asarray(py_raw)
    np.testing.assert_allclose(r, np.broadcast_to(r[..., :1, :], r.shape), rtol=1e-3,
                               err_msg=name)


@pytest.mark.parametrize("name", NAMES)
def test_jit_and_grad(name):
  f, _ = PAIRS[name]
  x, y, w = _data()
  params = C.gerf_init_params(None, x.shape[-1]) if name.startswith("gerf") else None

  def loss(x, y, params):
    px, py = f(x, y, w, params=params)
    kv = jnp.einsum("...lf,...ld->...fd", py, y)
    num = jnp.einsum("...nf,...fd->...nd", px, kv)
    den = jnp.einsum("...nf,...f->...n", px, py.sum(-2))
    return jnp.sum(num / (den[..., None] + 1e-6))

  val = jax.jit(loss)(x, y, params)
  np.testing.assert_allclose(val, loss(x, y, params), rtol=1e-4)
  g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, y, params)
  for leaf in jax.tree_util.tree_leaves(g):
    assert np.all(np.isfinite(leaf))
  if params is not None:
    assert float(jnp.abs(g[2]["gerf_a_raw"])) > 0  # A is trainable


def test_gerf_a_constraint():
  for raw in (-20.0, -1.0, 0.0, 5.0, 50.0):
    a = float(C.gerf_a({"gerf_a_raw": jnp.float32(raw)}))
    assert a < 0.125


# ----------------------------------------------------------------------------- statistics


def _masks(b, h, n, seed):
  rng = np.random.default_rng(seed)
  m = rng.random((b, h, n)) < 0.7
  m[..., 0] = True
  return jnp.asarray(m)


def test_oprf_stats_match_brute_force():
  x, y, _ = _data(n=9, l=6, d=5)
  xm, ym = _masks(2, 3, 9, 1), _masks(2, 3, 6, 2)
  s = (x[..., :, None, :] + y[..., None, :, :]) ** 2
  pm = (xm[..., :, None] & ym[..., None, :]).astype(np.float32)
  phi_bf = np.sum(np.sum(s, -1) * pm, axis=(-2, -1)) / np.sum(pm, axis=(-2, -1))
  np.testing.assert_allclose(stats.pair_sq_norm_mean(x, y, xm, ym), phi_bf, rtol=1e-4)
  coord_bf = np.sum(s * pm[..., None], axis=(-3, -2)) / np.sum(pm, axis=(-2, -1))[..., None]
  np.testing.assert_allclose(stats.pair_sq_coord_mean(x, y, xm, ym), coord_bf, rtol=1e-4)
  outer = (x[..., :, None, :] + y[..., None, :, :])
  outer_bf = np.einsum("bhnli,bhnlj,bhnl->bhij", outer, outer, pm) / np.sum(
      pm, axis=(-2, -1))[..., None, None]
  np.testing.assert_allclose(stats.pair_outer_mean(x, y, xm, ym), outer_bf, rtol=1e-4, atol=1e-5)
  # A* minimises the pair-averaged log second moment (brute-force grid over A)
  d = x.shape[-1]
  a = np.asarray(stats.oprf_a(x, y, xm, ym))
  grid = np.linspace(-3.0, 0.12, 200001)
  for idx in np.ndindex(a.shape):
    obj = (d * np.log1p(-4 * grid) - 0.5 * d * np.log1p(-8 * grid)
           + 2 * (1 - 4 * grid) / (1 - 8 * grid) * phi_bf[idx])
    assert abs(grid[np.argmin(obj)] - a[idx]) < 1e-3
  assert np.all(a <= 0)


def test_saderf_psi_matches_brute_force():
  x, y, _ = _data(n=9, l=6, d=5)
  x = x * jnp.arange(1.0, 6.0)  # anisotropic
  xm, ym = _masks(2, 3, 9, 3), _masks(2, 3, 6, 4)
  xs = np.where(np.asarray(xm)[..., None], np.asarray(x) ** 2, 0)
  ys = np.where(np.asarray(ym)[..., None], np.asarray(y) ** 2, 0)
  psi_bf = ((ys.sum(-2) / np.asarray(ym).sum(-1)[..., None])
            / (xs.sum(-2) / np.asarray(xm).sum(-1)[..., None])) ** 0.25
  psi = stats.saderf_psi(x, y, xm, ym)
  np.testing.assert_allclose(psi, psi_bf, rtol=1e-5)
  # the rescaling keeps every dot product
  np.testing.assert_allclose(jnp.einsum("...nd,...ld->...nl", x * psi[..., None, :],
                                        y / psi[..., None, :]),
                             jnp.einsum("...nd,...ld->...nl", x, y), rtol=1e-4, atol=1e-5)


def test_derf_stats_reduce_variance_objective():
  # ADERF/SDERF optimum: per-direction objective at the chosen a is below nearby a's.
  x, y, _ = _data(n=9, l=6, d=5)
  q, a = stats.sderf_params(x, y)
  phi = stats.pair_outer_mean(x, y)
  lam = np.einsum("...ij,...ik,...jk->...k", phi, q, q)  # eigenvalues (Q^T Phi Q diagonal)

  def obj(a, lam):
    return np.log1p(-4 * a) - 0.5 * np.log1p(-8 * a) + 2 * (1 - 4 * a) / (1 - 8 * a) * lam

  a, lam = np.asarray(a), np.asarray(lam)
  for da in (-1e-2, 1e-2):
    assert np.all(obj(a, lam) <= obj(np.minimum(a + da, 0.124), lam) + 1e-6)


def test_stats_have_no_gradient():
  x, y, w = _data()

  def f(x):
    return jnp.sum(stats.oprf_a(x, y)) + jnp.sum(stats.saderf_psi(x, y)) + jnp.sum(
        stats.sderf_params(x, y)[1]) + jnp.sum(stats.aderf_params(x, y)[1])

  assert float(jnp.max(jnp.abs(jax.grad(f)(x)))) == 0.0


@pytest.mark.parametrize("fn", [C.aderf_phi, C.saderf_phi])
def test_per_side_phi_rejects_unknown_side(fn):
  x, _, w = _data()
  psi = jnp.ones(x.shape[:-2] + x.shape[-1:])
  with pytest.raises(ValueError, match="'query' or 'key'.*'keys'"):
    fn(x, w, psi, 0.0, side="keys")
