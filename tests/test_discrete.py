"""GeomRF, PoisRF (discretely-induced RF) and HRF (hybrid RF): unbiased estimates of the softmax
kernel within CLT bounds, the laws of the integer frequencies, stabilisers and padding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectraformer_jax import attention as A
from spectraformer_jax import discrete
from spectraformer_jax import hybrid
from spectraformer_jax import registry

D, M, NK = 4, 16, 4000
SE_TOL = 4.0
COMPONENTS = ("geomrf", "poisrf", "hrf")


def _pairs():
  """Five (x, y) pairs with norms up to 1.2 and angles from 0.3 to 2.5 rad; one pair per
  leading index (the data-dependent lambda is per pair)."""
  rng = np.random.default_rng(0)
  xs, ys = [], []
  for nx, ny, ang in [(0.5, 0.5, 1.0), (1.0, 0.8, 0.3), (1.2, 1.0, 2.0), (0.8, 1.2, 2.5),
                      (0.3, 1.0, 1.5)]:
    q, _ = np.linalg.qr(rng.normal(size=(D, D)))
    xs.append(nx * q[:, 0])
    ys.append(ny * (np.cos(ang) * q[:, 0] + np.sin(ang) * q[:, 1]))
  return (jnp.asarray(np.stack(xs), jnp.float32)[:, None],
          jnp.asarray(np.stack(ys), jnp.float32)[:, None])


@functools.lru_cache(maxsize=None)
def _estimates(component, weight):
  """float64[NK, 5]: phi(x).phi(y) (stabilize=False) over NK independent draws of W."""
  comp, spec = registry.check_pair(component, weight)
  x, y = _pairs()

  def one(key):
    w = spec.matrix(*spec.init(key, M, D))
    px, py = comp.features(x, y, w, stabilize=False)
    return jnp.sum(px * py, -1)[:, 0]

  keys = jax.random.split(jax.random.key(1), NK)
  return np.asarray(jax.jit(jax.vmap(one))(keys), np.float64)


def _z(est):
  """|mean - exp(x.y)| in standard errors (SE floored at float32 rounding: PoisRF's optimal
  lambda makes a pair whose coordinate products share one sign exact, with zero variance)."""
  x, y = (np.asarray(t, np.float64)[:, 0] for t in _pairs())
  exact = np.exp(np.sum(x * y, -1))
  se = np.maximum(est.std(0, ddof=1) / np.sqrt(NK), 1e-6 * exact)
  return np.abs(est.mean(0) - exact) / se


@pytest.mark.parametrize("component", COMPONENTS)
def test_unbiased_for_the_softmax_kernel(component):
  """iid W here; the other weights each component takes are covered by test_estimators."""
  z = _z(_estimates(component, "iid"))
  assert np.all(z < SE_TOL), (component, z)


def test_biased_variant_is_detected():
  """Negative control: PoisRF scaled by 1.05 (a 5% bias) must fail the same check."""
  assert np.any(_z(_estimates("poisrf", "iid") * 1.05) > SE_TOL)


def test_frequency_laws():
  """The quantile transform of N(0, 1) entries gives Poisson(lambda) / geometric(q) counts:
  mean and variance within CLT bounds (variance of the sample variance from the 4th moment)."""
  w = jax.random.normal(jax.random.key(0), (20000, 2))
  lam = jnp.array([0.7, 3.0])
  for omega, mean, var in [
      (discrete.poisson_frequencies(w, lam), lam, lam),
      (discrete.geometric_frequencies(w, jnp.array([0.3, 0.8])),
       jnp.array([0.3, 0.8]) / (1 - jnp.array([0.3, 0.8])),
       jnp.array([0.3, 0.8]) / (1 - jnp.array([0.3, 0.8])) ** 2)]:
    o = np.asarray(omega, np.float64)
    assert np.all(o == np.round(o)) and np.all(o >= 0)
    n = o.shape[0]
    assert np.all(np.abs(o.mean(0) - mean) < 4 * np.sqrt(np.asarray(var) / n))
    m4 = ((o - o.mean(0)) ** 4).mean(0)
    assert np.all(np.abs(o.var(0) - var) < 4 * np.sqrt((m4 - o.var(0) ** 2) / n))


def _batch(seed=0, n=6, l=5):
  ks = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(ks[0], (2, n, D)) * 0.6
  y = jax.random.normal(ks[1], (2, l, D)) * 0.6
  mask = jnp.arange(l)[None] < jnp.array([[l], [l - 2]])
  return x, y, mask, jax.random.normal(ks[2], (M, D))


@pytest.mark.parametrize("component", COMPONENTS)
def test_stabilised_estimate_is_the_raw_one_times_row_and_head_constants(component):
  comp = registry.get_component(component)
  x, y, mask, w = _batch()
  est = jax.jit(lambda s: jnp.einsum("...nf,...lf->...nl",
                                     *comp.features(x, y, w, y_mask=mask, stabilize=s)),
                static_argnums=0)
  raw, st = est(False), est(True)
  for b in range(2):
    real = np.asarray(mask[b])
    ratio = np.asarray(st[b])[:, real] / np.asarray(raw[b])[:, real]
    assert np.all(ratio > 0)
    np.testing.assert_allclose(ratio, ratio[:, :1] * np.ones_like(ratio), rtol=1e-4)


@pytest.mark.parametrize("component", COMPONENTS)
def test_padding_is_invisible(component):
  """Masked keys have zero features and do not move the statistics of the real ones."""
  comp = registry.get_component(component)
  x, y, mask, w = _batch()
  features = jax.jit(lambda yy: comp.features(x, yy, w, y_mask=mask))
  px, py = features(y)
  px2, py2 = features(jnp.where(mask[..., None], y, 5.0))
  assert np.all(np.asarray(py)[~np.asarray(mask)] == 0)
  np.testing.assert_allclose(np.asarray(px), np.asarray(px2), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(py), np.asarray(py2), rtol=1e-6)
  assert py.shape[-1] == comp.feature_dim(M)


@pytest.mark.parametrize("component", COMPONENTS)
def test_attention_is_finite_and_close_to_softmax(component):
  """Through ``rf_attention`` (signed features: guarded normaliser) with many features the
  output approaches softmax attention."""
  ks = jax.random.split(jax.random.key(3), 4)
  q, k, v = (jax.random.normal(kk, (1, 8, 1, D)) * 0.5 for kk in ks[:3])
  w = jax.random.normal(ks[3], (2048, D))
  out = jax.jit(lambda q, k, v: A.rf_attention(q, k, v, w, component=component))(q, k, v)
  ref = A.softmax_attention(q, k, v)
  assert np.all(np.isfinite(np.asarray(out)))
  assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 0.1


def test_hrf_split_and_refusals():
  assert hybrid.split(16) == (7, 8, 1) and hybrid.feature_dim(16) == 2 * (7 + 16)
  with pytest.raises(ValueError, match="num_features >= 3"):
    hybrid.split(2)
  for component, weight in [("geomrf", "mm"), ("poisrf", "sorf"), ("hrf", "orf")]:
    with pytest.raises(ValueError, match="Valid weights"):
      registry.check_pair(component, weight)
