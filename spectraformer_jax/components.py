"""Component functions f: random features phi(x) = f(W x) whose dot products estimate exp(x . y).

Conventions (the math is in ``docs/estimators.md``): ``x`` are queries and ``y`` keys, both
already scaled by ``d**-0.25``; ``W`` is float32[m, d] with rows omega (N(0, I_d) marginals
unless the weight matrix says otherwise).  Every estimator here targets the *softmax* kernel ``exp(x . y)``; the
Gaussian-kernel estimators of the papers (GERF/OPRF/DERF estimate ``exp(-|x - y|^2 / 2)``) are
turned into softmax-kernel estimators by folding ``exp(|x|^2/2)`` into the query features and
``exp(|y|^2/2)`` into the key features.

Two layers of API:

* per-side functions ``*_phi(x, W, ...)`` / ``*_logits(x, W, ...)``: pure features of one side
  (no stabiliser, no mask), used by tests and for exposition;
* pair functions ``*_features(x, y, W, *, x_mask=None, y_mask=None, params=None,
  stabilize=True, causal=False) -> (phi_x, phi_y)`` with the registry contract
  (``registry.py``): they compute the data-dependent parameters (``stats.py``) from the
  unmasked positions of both sides, return float32 even for bfloat16 inputs and zero the rows
  of ``phi_y`` at masked keys.  ``causal=True`` replaces every data-dependent statistic by its
  data-independent neutral value (OPRF/SADERF ``A = 0``, ``Psi = I``; SDERF ``Q = I``,
  ``a = 0``; ADERF ``Psi = I``, ``a = 0``), so these components reduce to PosRF-equivalent
  estimators and no statistic can see a future token; the cost is the variance reduction of
  the optimised parameters.
* ``*_log_linear`` (positive components, ``LogLinear``) and ``trigrf_log_features``
  (``SignedLogFeatures``): the log-features themselves, which causal attention stabilises
  prefix by prefix (``attention.causal_log_attention``).

Stabilisation (``stabilize=True``, bidirectional) of the positive components, exact and under
``stop_gradient``: with log-features ``lq[i, r]`` and ``lk[j, r]``, a per-feature-column key
shift ``c_r = max over unmasked keys j of lk[j, r]`` is subtracted on the key side and folded
into the query side, which then subtracts its row maximum ``M_i = max_r (lq[i, r] + c_r)``:

    phi_x[i, r] = exp(lq[i, r] + c_r - M_i),     phi_y[j, r] = exp(lk[j, r] - c_r).

``c_r`` cancels in every product and the estimate is scaled by ``exp(-M_i)`` per query row,
which cancels in attention normalisation.  No row can underflow: the column ``r*`` achieving
``M_i`` has ``phi_x[i, r*] = 1`` and ``sum_j phi_y[j, r*] >= 1``, so ``phi_x[i] . sum_j
phi_y[j] >= 1``.  TrigRF (signed, amplitude ``exp(|y_j|^2/2)`` per key row) keeps one key
constant per leading index (batch, head) over unmasked keys and drops the query amplitude (a
per-row constant).  Masked queries are not zeroed (attention masks its outputs); they are
excluded from the statistics.  No epsilon is added to the features (that would bias the
estimator); a denominator guard belongs to attention.

Dense-exponential (DE) family, used by PosRF, GERF(s=+1), OPRF, SDERF, ADERF, SADERF:
for omega ~ N(0, I), ``E[exp(2 omega^T A omega + omega^T u)] = det(I - 4A)^(-1/2)
exp(u^T (I - 4A)^-1 u / 2)``.  With ``f1(omega, x) = D exp(omega^T A omega + omega^T B1 x +
x^T C1 x)``, ``f2`` likewise with ``B2, C2``, ``D = det(I - 4A)^(1/4)``,
``B1^T (I - 4A)^-1 B2 = I`` and ``Ck = -Bk^T (I - 4A)^-1 Bk / 2`` one gets
``E[f1(x) f2(y)] = exp(x . y)`` exactly (the Gaussian-kernel version of the papers has an extra
``-I/2`` in ``Ck``).  All positive members here use diagonal ``A = diag(a)`` and
``B = diag(sqrt(1 - 4a))`` after a data-dependent linear change of coordinates that keeps
``x . y`` (rescaling by Psi/Psi^-1 or an orthogonal rotation), which makes ``C = -I/2`` and

    log f(omega, x) = sum_k log(1 - 4 a_k)/4 + sum_k a_k omega_k^2
                      + sum_k sqrt(1 - 4 a_k) omega_k x'_k - |x'|^2 / 2 - log(m) / 2.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from spectraformer_jax import stats
from spectraformer_jax._dtypes import f32 as _f32

Params = Any

# GERF's A is constrained to A < 1/8 (finite variance) as A = 0.124999 - softplus(raw).
GERF_A_MAX = 0.124999  # strictly below 1/8 even when softplus underflows (as the official clamp)
_GERF_RAW_AT_ZERO = math.log(math.expm1(GERF_A_MAX))  # softplus(raw) = 1/8  <=>  A = 0


# ----------------------------------------------------------------------------- helpers


def _project(x, w):
  """``x[..., n, d] @ W[m, d]^T -> [..., n, m]`` in float32 with full precision."""
  return jnp.einsum("...nd,md->...nm", _f32(x), _f32(w), precision=jax.lax.Precision.HIGHEST)


def _sq_norm(x):
  return jnp.sum(_f32(x) ** 2, axis=-1, keepdims=True)


def _key_mask(y, y_mask):
  """Boolean key mask broadcast to ``y.shape[:-1] + (1,)`` or None."""
  if y_mask is None:
    return None
  return jnp.broadcast_to(y_mask, y.shape[:-1])[..., None]


def row_max(logits):
  """Per-row stabiliser ``max_r logits[..., i, r]`` (stop_gradient), [..., n, 1]."""
  return jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))


def head_max(logits, mask):
  """One stabiliser per leading index: max over all unmasked rows and features, [..., 1, 1].

  Falls back to 0 when every key is masked (then every row is zeroed anyway).
  """
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  c = jnp.max(logits, axis=(-2, -1), keepdims=True)
  c = jnp.where(jnp.isfinite(c), c, 0.0)
  return jax.lax.stop_gradient(c)


def col_max(logits, mask):
  """Per-feature-column key stabiliser ``c_r = max_j logits[..., j, r]`` over unmasked rows
  ``j`` (stop_gradient), ``[..., 1, m]``; 0 in a leading index with no unmasked key."""
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  c = jnp.max(logits, axis=-2, keepdims=True)
  c = jnp.where(jnp.isfinite(c), c, 0.0)
  return jax.lax.stop_gradient(c)


def _masked_exp(ly, mask):
  """``exp(ly)`` with masked rows exactly zero, replaced by 0 *before* ``exp`` as well: the
  stabilisers ignore masked rows, so their shifted log-features can exceed ~88 and overflow,
  and ``where(mask, exp(ly), 0)`` alone would then give NaN gradients (``0 * inf``)."""
  if mask is None:
    return jnp.exp(ly)
  return jnp.where(mask, jnp.exp(jnp.where(mask, ly, 0.0)), 0.0)


def _key_exp(ly, mask, stabilize):
  """``exp`` of signed components' key log-amplitudes with the head stabiliser."""
  if stabilize:
    ly = ly - head_max(ly, mask)
  return _masked_exp(ly, mask)


def _exp_pair(lx, ly, y_mask_b, stabilize):
  """Positive features from log-features of both sides with the column/row stabilisers of the
  module docstring: ``exp(lx + c - M)`` and ``exp(ly - c)``."""
  if stabilize:
    c = col_max(ly, y_mask_b)
    lx = lx + c
    lx = lx - row_max(lx)
    ly = ly - c
  return jnp.exp(lx), _masked_exp(ly, y_mask_b)


def _check(x, y, w):
  if x.shape[-1] != y.shape[-1] or x.shape[-1] != w.shape[-1]:
    raise ValueError(f"Feature dims disagree: x {x.shape}, y {y.shape}, W {w.shape} "
                     "(need x[..., n, d], y[..., l, d], W[m, d]).")


# ----------------------------------------------------------------------------- TrigRF


def trigrf_phi(x, w):
  """TrigRF (random Fourier features) of one side, float32[..., n, 2m].

  ``phi(x) = exp(|x|^2/2) / sqrt(m) [cos(W x), sin(W x)]``.  Since
  ``cos(a)cos(b) + sin(a)sin(b) = cos(a - b)`` and ``E cos(omega . (x - y)) =
  exp(-|x - y|^2/2)`` (Gaussian kernel), ``E[phi(x) . phi(y)] = exp(x . y)``: unbiased for the
  softmax kernel.  Not positive (the attention normaliser can cross zero).  Overflows in
  float32 for ``|x| > ~13`` without the pair function's stabiliser.
  """
  p = _project(x, w)
  m = w.shape[0]
  amp = jnp.exp(0.5 * _sq_norm(x)) / math.sqrt(m)
  return amp * jnp.concatenate([jnp.cos(p), jnp.sin(p)], axis=-1)


def trigrf_features(x, y, w, *, x_mask=None, y_mask=None, params=None, stabilize=True,
                    causal=False):
  """Pair TrigRF features (registry contract), float32 ``[..., n, 2m]`` and ``[..., l, 2m]``.

  Stabilised: the query amplitude ``exp(|x|^2/2)`` (a per-row constant) is dropped, the key
  amplitude becomes ``exp(|y|^2/2 - max_j |y_j|^2/2)`` (one constant per head, exact).  TrigRF
  has no statistics, so ``causal`` changes nothing here.
  """
  del params, x_mask, causal
  _check(x, y, w)
  m = w.shape[0]
  px, py = _project(x, w), _project(y, w)
  nx, ny = 0.5 * _sq_norm(x), 0.5 * _sq_norm(y)
  yb = _key_mask(y, y_mask)
  if stabilize:
    nx = jnp.zeros_like(nx)
  phi_x = jnp.exp(nx) / math.sqrt(m) * jnp.concatenate([jnp.cos(px), jnp.sin(px)], -1)
  phi_y = (_key_exp(ny, yb, stabilize) / math.sqrt(m)
           * jnp.concatenate([jnp.cos(py), jnp.sin(py)], -1))
  if yb is not None:
    phi_y = jnp.where(yb, phi_y, 0.0)
  return phi_x, phi_y


class SignedLogFeatures(NamedTuple):
  """Features as ``phi_q = sq * exp(lq)`` and ``phi_k = sk * exp(lk)``: float32 log-magnitudes
  ``lq [..., n, 1|F]``, ``lk [..., l, 1|F]`` (broadcast along the features) and bounded signed
  factors ``sq [..., n, F]``, ``sk [..., l, F]`` (``|s| <= 1``)."""
  lq: jax.Array
  lk: jax.Array
  sq: jax.Array
  sk: jax.Array


def trigrf_log_features(x, y, w, *, x_mask=None, y_mask=None, params=None,
                        causal=False) -> SignedLogFeatures:
  """TrigRF as ``SignedLogFeatures``: ``lq = 0`` (the query amplitude is a per-row constant,
  dropped), ``lk = |y|^2/2``, ``sq = [cos Wx, sin Wx]/sqrt(m)``, ``sk = [cos Wy, sin Wy]/sqrt(m)``
  (unstabilised, unmasked: causal attention shifts and masks them)."""
  del params, x_mask, y_mask, causal
  _check(x, y, w)
  scale = 1.0 / math.sqrt(w.shape[0])
  px, py = _project(x, w), _project(y, w)
  return SignedLogFeatures(jnp.zeros(x.shape[:-1] + (1,), jnp.float32), 0.5 * _sq_norm(y),
                           scale * jnp.concatenate([jnp.cos(px), jnp.sin(px)], -1),
                           scale * jnp.concatenate([jnp.cos(py), jnp.sin(py)], -1))


# ----------------------------------------------------------------------------- DE core


class LogLinear(NamedTuple):
  """Log-features of a positive dense-exponential component, in log-linear form.

  ``log phi_q[..., i, r] = xq[..., i, :] . W[r, :] + col[..., r] + row_q[..., i]`` and
  ``log phi_k[..., j, r] = xk[..., j, :] . W[r, :] + col[..., r] + row_k[..., j]`` (one ``col`` for
  both sides).  float32 ``xq [..., n, d]``, ``xk [..., l, d]``, ``col [..., m]``,
  ``row_q [..., n]``, ``row_k [..., l]``.  Every component-specific transformation (rescaling,
  rotation, ``sqrt(1 - 4A)``, ``A |omega|^2``, norms) is O((n + l) d + m d) work in here; the
  ``[n, m]`` part is one projection and an ``exp``, which ``fused.positive_rf_attention``
  computes without storing.
  """
  xq: jax.Array
  xk: jax.Array
  col: jax.Array
  row_q: jax.Array
  row_k: jax.Array


def log_linear_logits(x, w, col, row):
  """``x[..., n, d] @ W^T + col[..., None, :] + row[..., None]``: float32 ``[..., n, m]``."""
  return _project(x, w) + col[..., None, :] + row[..., None]


def _de_side(x, w, a):
  """``(x', col, row)`` of the DE log-features of one side (module docstring):
  ``x' = sqrt(1 - 4a) * x``, ``col_r = sum_k a_k w_rk^2 + sum_k log(1 - 4a_k)/4 - log(m)/2``,
  ``row = -|x|^2/2``; ``a`` is None (A = 0) or ``[..., d]``."""
  x, w = _f32(x), _f32(w)
  m, d = w.shape
  row = -0.5 * jnp.sum(x * x, axis=-1)
  if a is None:
    return x, jnp.full(x.shape[:-2] + (m,), -0.5 * math.log(m), jnp.float32), row
  a = jnp.broadcast_to(_f32(a), x.shape[:-2] + (d,))  # scalars broadcast; use _scalar_a for [...]
  log_d = 0.25 * jnp.sum(jnp.log1p(-4.0 * a), axis=-1)         # [...]
  quad = jnp.einsum("md,...d->...m", w * w, a, precision=jax.lax.Precision.HIGHEST)
  col = quad + log_d[..., None] - 0.5 * math.log(m)
  return x * jnp.sqrt(1.0 - 4.0 * a)[..., None, :], col, row


def de_logits(x, w, a=None):
  """Log-features of the diagonal dense-exponential family (see module docstring).

  ``x[..., n, d]`` are the (already transformed) coordinates; ``a`` is None (A = 0, PosRF), a
  scalar, or ``[..., d]`` (diagonal A per coordinate; one A per leading index goes through
  ``_scalar_a`` first).  Returns float32 ``[..., n, m]``:
  ``sum_k log(1-4a_k)/4 + sum_k a_k w_rk^2 + sum_k sqrt(1-4a_k) w_rk x_k - |x|^2/2 - log(m)/2``.
  """
  xs, col, row = _de_side(x, w, a)
  return log_linear_logits(xs, w, col, row)


def _de_pair(x, y, w, a=None) -> LogLinear:
  """Both sides' DE log-features with the same ``a`` (None or ``[..., d]``) as a LogLinear."""
  if a is not None:
    a = jnp.broadcast_to(_f32(a), jnp.broadcast_shapes(x.shape[:-2], y.shape[:-2])
                         + (x.shape[-1],))
  xq, col, row_q = _de_side(x, w, a)
  xk, _, row_k = _de_side(y, w, a)
  return LogLinear(xq, xk, col, row_q, row_k)


def _positive_features(log_linear, x, y, w, x_mask, y_mask, params, stabilize, causal):
  """Pair features (registry contract) of a component given by its ``*_log_linear``: ``exp``
  of the log-linear logits of both sides with the contract's stabilisers and key mask."""
  _check(x, y, w)
  form = log_linear(x, y, w, x_mask=x_mask, y_mask=y_mask, params=params, causal=causal)
  return _exp_pair(log_linear_logits(form.xq, w, form.col, form.row_q),
                   log_linear_logits(form.xk, w, form.col, form.row_k),
                   _key_mask(y, y_mask), stabilize)


def _scalar_a(a, x):
  """A per leading index ([...] or scalar) -> [..., d] diag."""
  a = _f32(a)
  lead = x.shape[:-2]
  a = jnp.broadcast_to(a, lead) if a.ndim <= len(lead) else a
  return jnp.broadcast_to(a[..., None], lead + (x.shape[-1],))


# ----------------------------------------------------------------------------- PosRF


def posrf_phi(x, w):
  """PosRF / FAVOR+ (Choromanski et al., 2021), one side, float32[..., n, m].

  ``phi(x) = exp(W x - |x|^2/2) / sqrt(m)``; ``E[phi(x) . phi(y)] = E exp(omega.(x + y))
  exp(-|x|^2/2 - |y|^2/2) = exp(x . y)``: positive and unbiased for the softmax kernel.
  """
  return jnp.exp(de_logits(x, w))


def posrf_log_linear(x, y, w, *, x_mask=None, y_mask=None, params=None,
                     causal=False) -> LogLinear:
  """PosRF's log-features ``W x - |x|^2/2 - log(m)/2`` of both sides as a LogLinear."""
  del params, x_mask, y_mask, causal
  return _de_pair(x, y, w)


def posrf_features(x, y, w, *, x_mask=None, y_mask=None, params=None, stabilize=True,
                   causal=False):
  """Pair PosRF features (registry contract), float32 ``[..., n, m]`` / ``[..., l, m]``."""
  return _positive_features(posrf_log_linear, x, y, w, x_mask, y_mask, params, stabilize,
                            causal)


# ----------------------------------------------------------------------------- GERF


def gerf_a(params) -> jax.Array:
  """GERF's A from its parameters: ``A = 0.124999 - softplus(raw)`` (< 1/8); 0 when params is None."""
  if params is None or "gerf_a_raw" not in params:
    return jnp.float32(0.0)
  return GERF_A_MAX - jax.nn.softplus(_f32(params["gerf_a_raw"]))


def gerf_init_params(key=None, dim=None) -> Params:
  """Learnable scalar A of GERF, initialised at A = 0 (PosRF for s = +1)."""
  del key, dim
  return {"gerf_a_raw": jnp.float32(_GERF_RAW_AT_ZERO)}


def gerf_phi(x, w, a=0.0, s=1):
  """GERF (Likhosherstov et al., "Chefs' Random Tables", 2022), one side, float32.

  ``f(omega, x) = D exp(A |omega|^2 + s_side B omega . x + C |x|^2)`` with ``A < 1/8``,
  ``B = sqrt(s (1 - 4A))``, ``D = (1 - 4A)^(d/4)``, ``C_gauss = -(s + 1)/2`` for the
  Gaussian kernel; the softmax kernel adds ``+1/2``: ``C = -s/2``; the key side uses
  ``s * B``.  ``E[f(x) f(y)] = exp(x . y)`` (unbiased) for both ``s = +1`` (positive,
  ``[..., n, m]``) and ``s = -1``.  For ``s = -1`` the features are complex
  ``D exp(A|omega|^2 + |x|^2/2) exp(+-i b omega . x)`` with ``b = sqrt(1 - 4A)``; they are
  returned as real ``[Re, Im]`` blocks (``[..., n, 2m]``) with the key side's imaginary part
  sign-flipped, so the real dot product is ``Re(f(x) f(y))``: the real part of an unbiased
  estimator of a real quantity, hence unbiased.  ``A = 0, s = -1`` is TrigRF.
  """
  if s == 1:
    return jnp.exp(de_logits(x, w, _scalar_a(a, x)))
  if s != -1:
    raise ValueError(f"GERF sign s must be +1 or -1, got {s!r}.")
  logamp, p = _gerf_trig_parts(x, w, _f32(a))
  amp = jnp.exp(logamp)
  return jnp.concatenate([amp * jnp.cos(p), amp * jnp.sin(p)], -1)


def _gerf_trig_parts(x, w, a):
  """(log amplitude [..., n, m], phase [..., n, m]) of GERF with s = -1 (key side identical:
  the sign of the imaginary part cancels into ``cos cos + sin sin``)."""
  m, d = w.shape
  a = _f32(a)
  while a.ndim < x.ndim:  # [...] -> [..., 1, 1]
    a = a[..., None]
  b = jnp.sqrt(1.0 - 4.0 * a)
  wsq = jnp.sum(_f32(w) ** 2, -1)
  logamp = (0.25 * d * jnp.log1p(-4.0 * a) + a * wsq + 0.5 * _sq_norm(x)
            - 0.5 * math.log(m))
  return logamp, b * _project(x, w)


def gerf_log_linear(x, y, w, *, x_mask=None, y_mask=None, params=None,
                    causal=False) -> LogLinear:
  """GERF's (s = +1) log-features of both sides as a LogLinear; A from ``params``."""
  del x_mask, y_mask, causal  # A is a parameter, not a statistic
  return _de_pair(x, y, w, _scalar_a(gerf_a(params), x))


def gerf_features(x, y, w, *, x_mask=None, y_mask=None, params=None, stabilize=True,
                  causal=False, s=1):
  """Pair GERF features (registry contract); A from ``params`` (learnable, default A = 0).

  ``s = +1``: positive features ``[..., m]`` (registered as ``gerf``); ``s = -1``: real
  ``[Re, Im]`` blocks ``[..., 2m]`` (see ``gerf_phi``).  Unbiased for ``exp(x . y)``.
  """
  if s == 1:
    return _positive_features(gerf_log_linear, x, y, w, x_mask, y_mask, params, stabilize,
                            causal)
  del x_mask
  _check(x, y, w)
  if s != -1:
    raise ValueError(f"GERF sign s must be +1 or -1, got {s!r}.")
  a = gerf_a(params)
  yb = _key_mask(y, y_mask)
  lx, px = _gerf_trig_parts(x, w, a)
  ly, py = _gerf_trig_parts(y, w, a)
  if stabilize:
    lx = lx - row_max(lx)
  phi_x = jnp.exp(lx)
  phi_y = _key_exp(ly, yb, stabilize)
  phi_x = jnp.concatenate([phi_x * jnp.cos(px), phi_x * jnp.sin(px)], -1)
  # key side: [Re, -Im] of exp(-i b omega.y) = [cos, sin]
  phi_y = jnp.concatenate([phi_y * jnp.cos(py), phi_y * jnp.sin(py)], -1)
  if yb is not None:
    phi_y = jnp.where(yb, phi_y, 0.0)
  return phi_x, phi_y


# ----------------------------------------------------------------------------- OPRF


def oprf_phi(x, w, a):
  """OPRF (optimal positive RF, "Chefs' Random Tables"), one side, float32[..., n, m].

  GERF with s = +1 and the data-dependent ``A*`` of ``stats.oprf_a`` (pass it as ``a``,
  one value per leading index): ``phi(x) = (1-4A)^(d/4) exp(A|omega|^2 + sqrt(1-4A) omega.x
  - |x|^2/2) / sqrt(m)``.  Positive; unbiased for ``exp(x . y)`` given A (A depends on the
  data, not on omega).
  """
  return jnp.exp(de_logits(x, w, _scalar_a(a, x)))


def oprf_log_linear(x, y, w, *, x_mask=None, y_mask=None, params=None,
                    causal=False) -> LogLinear:
  """OPRF's log-features of both sides as a LogLinear, ``A* = stats.oprf_a(x, y, masks)``
  (``A = 0``, i.e. PosRF, when ``causal``)."""
  del params
  if causal:
    return _de_pair(x, y, w)
  return _de_pair(x, y, w, _scalar_a(stats.oprf_a(x, y, x_mask, y_mask), x))


def oprf_features(x, y, w, *, x_mask=None, y_mask=None, params=None, stabilize=True,
                  causal=False):
  """Pair OPRF features (registry contract): ``A* = stats.oprf_a(x, y, masks)`` per head."""
  return _positive_features(oprf_log_linear, x, y, w, x_mask, y_mask, params, stabilize,
                            causal)


# ----------------------------------------------------------------------------- DERF family


def sderf_features(x, y, w, *, x_mask=None, y_mask=None, params=None, stabilize=True,
                   causal=False):
  """Symmetric dense-exponential RF (SDERF; Likhosherstov et al., 2023), pair features.

  ``f(omega, x) = D exp(omega^T A omega + omega^T B x - |x|^2/2) / sqrt(m)`` on both sides
  with the symmetric ``A = Q diag(a) Q^T``, ``B = Q diag(sqrt(1 - 4a)) Q^T``,
  ``D = det(I - 4A)^(1/4)``, where ``Q, a = stats.sderf_params(x, y)``: ``Q`` the eigenvectors
  of ``Phi = mean_(i,j) (x_i + y_j)(x_i + y_j)^T`` and ``a_k`` the one-dimensional OPRF
  optimum for eigenvalue ``phi_k``.  ``A`` and ``B`` are continuous functions of ``Phi`` (they
  do not depend on how ``eigh`` orders or signs eigenvectors), so the output is continuous in
  the input.  ``B^T (I-4A)^-1 B = I`` so ``E[f(x) f(y)] = exp(x . y)``: positive, unbiased.
  ``causal``: ``Q = I``, ``a = 0`` (PosRF).
  """
  return _positive_features(sderf_log_linear, x, y, w, x_mask, y_mask, params, stabilize,
                            causal)


def _sym(q, diag):
  """``Q diag(diag) Q^T``: float32 ``[..., d, d]`` from ``Q [..., d, d]``, ``diag [..., d]``."""
  return jnp.einsum("...ik,...k,...jk->...ij", q, diag, q, precision=jax.lax.Precision.HIGHEST)


def _sderf_sides(x, y, w, q, a):
  """SDERF's ``(x B, y B, col, row_x, row_y)`` in log-linear form: ``B = Q diag(b) Q^T``,
  ``col_r = w_r^T Q diag(a) Q^T w_r + sum_k log(1 - 4a_k)/4 - log(m)/2``, ``row = -|x|^2/2``."""
  hi = jax.lax.Precision.HIGHEST
  x, y, w = _f32(x), _f32(y), _f32(w)
  b = _sym(q, jnp.sqrt(1.0 - 4.0 * a))
  quad = jnp.einsum("md,...de,me->...m", w, _sym(q, a), w, precision=hi)
  col = quad + (0.25 * jnp.sum(jnp.log1p(-4.0 * a), -1) - 0.5 * math.log(w.shape[0]))[..., None]
  rot = lambda t: jnp.einsum("...nd,...de->...ne", t, b, precision=hi)
  return rot(x), rot(y), col, -0.5 * jnp.sum(x * x, -1), -0.5 * jnp.sum(y * y, -1)


def sderf_log_linear(x, y, w, *, x_mask=None, y_mask=None, params=None,
                     causal=False) -> LogLinear:
  """SDERF's log-features of both sides (symmetric ``A``, ``B``) as a LogLinear."""
  del params
  if causal:
    return _de_pair(x, y, w)
  q, a = stats.sderf_params(x, y, x_mask, y_mask)
  xq, xk, col, row_q, row_k = _sderf_sides(x, y, w, q, a)
  lead = jnp.broadcast_shapes(x.shape[:-2], y.shape[:-2])
  return LogLinear(xq, xk, jnp.broadcast_to(col, lead + col.shape[-1:]), row_q, row_k)


def sderf_phi(x, w, q, a):
  """SDERF of one side given ``(q, a) = stats.sderf_params(...)`` (see ``sderf_features``)."""
  xs, _, col, row, _ = _sderf_sides(x, x, w, q, a)
  return jnp.exp(log_linear_logits(xs, w, col, row))


def aderf_features(x, y, w, *, x_mask=None, y_mask=None, params=None, stabilize=True,
                   causal=False):
  """Asymmetric dense-exponential RF, diagonal variant (ADERF), pair features.

  ``f1(omega, x) = D exp(sum_k a_k omega_k^2 + sum_k b_k psi_k omega_k x_k - |Psi x|^2/2)``,
  ``f2(omega, y) = D exp(sum_k a_k omega_k^2 + sum_k b_k omega_k y_k / psi_k - |Psi^-1 y|^2/2)``
  with ``b_k = sqrt(1 - 4 a_k)``, ``D = prod_k (1 - 4a_k)^(1/4)`` and
  ``psi, a = stats.aderf_params(x, y)`` (per-coordinate optimum of the pair-averaged log
  second moment over diagonal A, B1, B2).  ``B1 (I-4A)^-1 B2 = I``: positive, unbiased for
  ``exp(x . y)``.  The paper's ADERF allows full matrices ``B1, B2``; this is its diagonal
  special case, of which SADERF is the scalar-A special case.
  """
  return _positive_features(aderf_log_linear, x, y, w, x_mask, y_mask, params, stabilize,
                            causal)


def aderf_log_linear(x, y, w, *, x_mask=None, y_mask=None, params=None,
                     causal=False) -> LogLinear:
  """ADERF's log-features of both sides (``Psi x``, ``Psi^-1 y``, diagonal ``a``); PosRF
  (``Psi = I``, ``a = 0``) when ``causal``."""
  del params
  if causal:
    return _de_pair(x, y, w)
  psi, a = stats.aderf_params(x, y, x_mask, y_mask)
  return _de_pair(_f32(x) * psi[..., None, :], _f32(y) / psi[..., None, :], w, a)


def _side_scale(psi, side):
  """``psi`` for the query side, ``1 / psi`` for the key side."""
  if side not in ("query", "key"):
    raise ValueError(f"side must be 'query' or 'key', got {side!r}.")
  return psi if side == "query" else 1.0 / psi


def aderf_phi(x, w, psi, a, side="query"):
  """ADERF of one side given ``(psi, a) = stats.aderf_params(...)``; keys use ``1/psi``."""
  scale = _side_scale(psi, side)
  return jnp.exp(de_logits(_f32(x) * scale[..., None, :], w, a))


def saderf_features(x, y, w, *, x_mask=None, y_mask=None, params=None, stabilize=True,
                   causal=False):
  """Simplified ADERF (SADERF), pair features: ``x -> Psi x``, ``y -> Psi^-1 y`` then OPRF.

  ``psi = stats.saderf_psi(x, y)``, ``psi_k = (mean_j y_jk^2 / mean_i x_ik^2)^(1/4)``
  (keeps every ``x . y``), then OPRF's features with ``A* = stats.oprf_a(Psi x, Psi^-1 y)``.
  Positive; unbiased for ``exp(x . y)`` given the statistics.
  """
  return _positive_features(saderf_log_linear, x, y, w, x_mask, y_mask, params, stabilize,
                            causal)


def saderf_log_linear(x, y, w, *, x_mask=None, y_mask=None, params=None,
                      causal=False) -> LogLinear:
  """SADERF's log-features: OPRF's of ``Psi x`` and ``Psi^-1 y`` as a LogLinear; PosRF
  (``Psi = I``, ``A = 0``) when ``causal``."""
  if causal:
    return _de_pair(x, y, w)
  psi = stats.saderf_psi(x, y, x_mask, y_mask)
  return oprf_log_linear(_f32(x) * psi[..., None, :], _f32(y) / psi[..., None, :], w,
                         x_mask=x_mask, y_mask=y_mask, params=params)


def saderf_phi(x, w, psi, a, side="query"):
  """SADERF of one side given ``psi`` and OPRF's ``a`` of the rescaled inputs."""
  scale = _side_scale(psi, side)
  return oprf_phi(_f32(x) * scale[..., None, :], w, a)
