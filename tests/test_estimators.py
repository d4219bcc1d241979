"""Statistical tests of every (component, weight) estimator of the softmax kernel exp(x . y).

One jitted, vmapped draw per weight matrix computes the estimates of all components on the
same pairs (d = 8, m = 16, NK = 2000 independent keys), cached for the module, so the whole file
stays well under a minute on 2 CPU cores.

Unbiasedness (every unbiased component x every non-learned weight): the Monte-Carlo mean over
the NK keys must match exp(x . y) within 4 standard errors (SE = sample std / sqrt(NK)).
Weights that are not unbiased by construction (see weights.py's table) get an explicit,
justified different assertion:

* ``sorf``, ``rom``: rows have unit-variance, uncorrelated entries but are not Gaussian
  ("approximately unbiased", bias O(1/d), Yu et al. 2016 Thm. 3): relative bias bounded.
* ``mm``: whitening changes the marginal law of the rows (bias O(1/m)): relative bias bounded.
* ``sgq``: equal-weight sparse-grid nodes are not a valid quadrature under the W-only contract
  (second moment 6/(2d+1) I at level 2): the test asserts the bias is *detected*, which also
  shows the 4-SE check can fail.

Variance ordering: structured/quasi-random matrices against iid at equal m on the same pairs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectraformer_jax import components as C
from spectraformer_jax import registry

D, M, NK = 8, 16, 2000
SE_TOL = 4.0

# gerf at its init is PosRF; test it at a non-trivial learnable A too (both signs of A).  A > 0
# up-weights large |omega| by exp(A |omega|^2): the 4-SE check needs the sample SE to be
# reliable, i.e. a finite fourth moment of the estimate (f(x) f(y))^4 ~ exp(8A |omega|^2),
# which needs A < 1/16; at A = 0.05 the SE itself is heavy-tailed and 4-SE excursions of
# unbiased draws occur.
VARIANTS = {
    **{name: (name, None) for name in registry.component_names()},
    "gerf[A=-0.2]": ("gerf", {"gerf_a_raw": jnp.float32(np.log(np.expm1(0.124999 + 0.2)))}),
    "gerf[A=0.03]": ("gerf", {"gerf_a_raw": jnp.float32(np.log(np.expm1(0.124999 - 0.03)))}),
    "gerf[s=-1,A=-0.1]": ("gerf_s-1", {"gerf_a_raw": jnp.float32(np.log(np.expm1(0.224999)))}),
}
FIXED_WEIGHTS = sorted(w for w, s in registry.WEIGHTS.items() if not s.learnable)
# Bound on |bias| / scale, scale = exp(x.y) for positive features and the amplitude
# exp((|x|^2 + |y|^2)/2) for the trigonometric ones (their estimates live on that scale; the
# relative bias w.r.t. a tiny exp(x.y) at obtuse angles is meaningless).  Measured at d = 8,
# m = 2d: sorf/rom <= ~0.11 (worst at GERF with A > 0, which up-weights large |omega|
# where the non-Gaussian rows differ most); mm <= ~0.32 (whitening at m = 2d is strong; bias
# O(1/m)).
APPROX_UNBIASED = {"sorf": 0.15, "rom": 0.15, "mm": 0.4}
TRIG_TYPE = {"trigrf", "gerf[s=-1,A=-0.1]"}
NOT_UNBIASED = {"sgq"}


def _pairs(norms_angles, seed):
  rng = np.random.default_rng(seed)
  xs, ys = [], []
  for nx, ny, ang in norms_angles:
    q, _ = np.linalg.qr(rng.normal(size=(D, D)))
    u, v = q[:, 0], q[:, 1]
    xs.append(nx * u)
    ys.append(ny * (np.cos(ang) * u + np.sin(ang) * v))
  # leading index = pair: the data-dependent statistics are per pair
  return (jnp.asarray(np.stack(xs), jnp.float32)[:, None, :],
          jnp.asarray(np.stack(ys), jnp.float32)[:, None, :])


# Norms up to 2. |x + y| is kept moderate for the positive features, whose estimates are
# log-normal-like: for large |x + y| the sample SE itself is unreliable (heavy tails).
UNBIASED_PAIRS = _pairs([(0.5, 0.5, 1.0), (1.0, 1.0, np.pi / 3), (2.0, 1.0, 2 * np.pi / 3),
                         (2.0, 2.0, 5 * np.pi / 6), (1.5, 0.3, 0.3)], seed=0)
ORDER_PAIRS = _pairs([(1.0, 1.0, np.pi / 3), (1.0, 1.0, np.pi / 2), (1.0, 0.5, 2.0),
                      (0.7, 0.7, 0.5)], seed=1)
SMALL_PAIRS = _pairs([(0.5, 0.5, np.pi / 3), (0.5, 0.5, np.pi / 2), (0.6, 0.3, 2.0),
                      (0.4, 0.4, 0.5)], seed=2)


def _features(variant):
  name, params = VARIANTS[variant]
  if name == "gerf_s-1":
    return functools.partial(C.gerf_features, s=-1, params=params)
  return functools.partial(registry.get_component(name).features, params=params)


@functools.lru_cache(maxsize=None)
def _draw_w(weight, key_seed, m=M):
  """NK independent draws of W for one weight matrix (one compile per weight)."""
  spec = registry.get_weight(weight)
  keys = jax.random.split(jax.random.PRNGKey(key_seed), NK)
  return jax.jit(jax.vmap(lambda k: spec.matrix(*spec.init(k, m, D))))(keys)


@functools.lru_cache(maxsize=None)
def _estimator(variant):
  """jit(vmap over W) of phi(x).phi(y) for one variant: compiled once, reused by all weights."""
  f = _features(variant)

  def one(w, x, y):
    px, py = f(x, y, w, stabilize=False)
    return jnp.sum(px * py, -1)[:, 0]

  return jax.jit(jax.vmap(one, in_axes=(0, None, None)))


def _estimates(weight, pairs, variants, key_seed):
  """float64[NK, len(variants), P]: phi(x).phi(y) (stabilize=False) for NK independent keys."""
  ws = _draw_w(weight, key_seed)
  x, y = pairs
  return np.stack([np.asarray(_estimator(v)(ws, x, y), np.float64) for v in variants], 1)


def _exact(pairs):
  x, y = pairs
  return np.exp(np.sum(np.asarray(x, np.float64) * np.asarray(y, np.float64), -1))[:, 0]


@functools.lru_cache(maxsize=None)
def _unbiased_draws(weight):
  variants = sorted(v for v in VARIANTS if registry.COMPONENTS.get(VARIANTS[v][0], None) is None
                    or (registry.COMPONENTS[VARIANTS[v][0]].unbiased
                        and (VARIANTS[v][0], weight) not in registry.REFUSED_PAIRS))
  return variants, _estimates(weight, UNBIASED_PAIRS, variants, 0)


def _z_and_bias(est, exact, scale=None):
  mean = est.mean(0)
  se = est.std(0, ddof=1) / np.sqrt(est.shape[0])
  z = np.abs(mean - exact) / np.maximum(se, 1e-7 * exact)
  return z, (mean - exact) / (exact if scale is None else scale)


@pytest.mark.parametrize("weight", FIXED_WEIGHTS)
def test_unbiased_softmax_kernel(weight):
  variants, est = _unbiased_draws(weight)
  exact = _exact(UNBIASED_PAIRS)
  x, y = (np.asarray(a, np.float64)[:, 0] for a in UNBIASED_PAIRS)
  amp = np.exp(0.5 * (np.sum(x * x, -1) + np.sum(y * y, -1)))
  report = {}
  for i, v in enumerate(variants):
    z, rel = _z_and_bias(est[:, i], exact, amp if v in TRIG_TYPE else None)
    report[v] = (float(z.max()), float(np.abs(rel).max()))
  if weight in NOT_UNBIASED:
    # sgq: W-only equal weights are not a quadrature; the bias must be detected for every
    # component (|z| > 4 on some pair), i.e. the check does fail on a biased estimator.
    assert all(z > SE_TOL for z, _ in report.values()), report
  elif weight in APPROX_UNBIASED:
    bound = APPROX_UNBIASED[weight]
    bad = {v: r for v, r in report.items() if r[1] > bound and r[0] > SE_TOL}
    assert not bad, f"{weight}: relative bias above {bound}: {bad}"
  else:
    bad = {v: r for v, r in report.items() if r[0] > SE_TOL}
    assert not bad, f"{weight}: mean off by more than {SE_TOL} SE (z, rel. bias): {bad}"


def test_biased_estimator_is_detected():
  """Negative control: the official code's PosRF (exp(Wx - |x|^2), Gaussian-kernel style)
  is biased for exp(x . y); the same 4-SE check must reject it."""
  x, y = UNBIASED_PAIRS

  def one(k):
    w = jax.random.normal(k, (M, D))
    fx = jnp.exp(x @ w.T - jnp.sum(x * x, -1, keepdims=True)) / np.sqrt(M)
    fy = jnp.exp(y @ w.T - jnp.sum(y * y, -1, keepdims=True)) / np.sqrt(M)
    return jnp.sum(fx * fy, -1)[:, 0]

  est = np.asarray(jax.vmap(one)(jax.random.split(jax.random.PRNGKey(0), NK)), np.float64)
  z, _ = _z_and_bias(est, _exact(UNBIASED_PAIRS))
  assert z.max() > SE_TOL


# ----------------------------------------------------------------------------- variance order

ORDER_VARIANTS = ("trigrf", "oprf", "saderf", "posrf")


@functools.lru_cache(maxsize=None)
def _order_mse(weight, which):
  pairs = ORDER_PAIRS if which == "order" else SMALL_PAIRS
  est = _estimates(weight, pairs, ORDER_VARIANTS, 0)  # same W draws, other pairs
  rel2 = (est - _exact(pairs)) ** 2 / _exact(pairs) ** 2  # [NK, V, P]
  per_draw = rel2.mean(-1)  # mean over pairs
  return per_draw.mean(0), per_draw.std(0, ddof=1) / np.sqrt(NK)


# (weight, component) -> expectation.  Theory: orthogonal rows (ORF, SORF, SimRF) give lower
# MSE for TrigRF (Yu et al. 2016) and for positive features (Choromanski et al. 2021, Thm 2;
# Reid et al. 2023 for SimRF); QMC has lower integration error for smooth integrands in low
# dimension; MM matches the first two moments exactly, which removes the leading error terms.
LOWER = [(w, c) for w in ("orf", "sorf", "qmc", "mm", "simrf") for c in ("trigrf", "oprf", "saderf")]


# Documented exceptions: asserted "not worse than iid" instead of "lower".
# QMC's error bound O((log m)^d / m) only beats Monte Carlo once m is large against 2^d; at
# m = 16 in d = 8 a Sobol set is barely more uniform than random points, and for TrigRF
# (whose integrand cos(omega . (x - y)) oscillates) the gain measured here is ~5%, within 2 SE.
NOT_WORSE_ONLY = {("qmc", "trigrf")}


@pytest.mark.parametrize("weight,component", LOWER)
def test_lower_mse_than_iid(weight, component):
  i = ORDER_VARIANTS.index(component)
  mse_w, se_w = _order_mse(weight, "order")
  mse_iid, se_iid = _order_mse("iid", "order")
  margin = 2.0 * np.hypot(se_w[i], se_iid[i])
  if (weight, component) in NOT_WORSE_ONLY:
    assert mse_w[i] < mse_iid[i] + margin, (weight, component, mse_w[i], mse_iid[i], margin)
  else:
    assert mse_w[i] + margin < mse_iid[i], (weight, component, mse_w[i], mse_iid[i], margin)


@pytest.mark.parametrize("weight", ["orf", "sorf", "qmc", "mm", "simrf"])
def test_lower_mse_than_iid_posrf(weight):
  """PosRF: the theory holds for every pair, but its squared error is heavy-tailed (log-normal
  features), so at |x + y| ~ 1.7 the MSE estimate from 2000 draws has ~10% standard error and
  the ordering is not resolvable (ORF, SORF measured at iid's level).  We therefore assert it on
  small-norm pairs (|x|, |y| <= 0.6), where the tails are light."""
  i = ORDER_VARIANTS.index("posrf")
  mse_w, se_w = _order_mse(weight, "small")
  mse_iid, se_iid = _order_mse("iid", "small")
  margin = 2.0 * np.hypot(se_w[i], se_iid[i])
  assert mse_w[i] + margin < mse_iid[i], (weight, mse_w[i], mse_iid[i], margin)
