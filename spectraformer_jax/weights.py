"""Weight matrices W (rows = frequencies omega) for random-feature attention.

Every generator has the signature ``fn(key, num_features, dim, **kw) -> float32[num_features, dim]``
and is pure: the same key gives the same W. ``num_features`` (m) and ``dim`` (d) must be static
Python ints; the key may be traced, so every generator works under ``jax.jit``. Anything a
generator precomputes on the host (numpy/scipy) depends only on the static shapes and is cached;
the docstrings say so.

Target distribution. The rows are frequencies for the softmax/Gaussian kernel: each row should be
(marginally) ``N(0, I_d)`` so that with ``x, y`` in R^d
``E[exp(omega.x - |x|^2/2) exp(omega.y - |y|^2/2)] = exp(x.y)`` (PosRF) and
``E[cos(omega.(x - y))] = exp(-|x - y|^2/2)`` (TrigRF). Rows may be *dependent* (that is where the
variance reduction comes from); for an unbiased kernel estimate only the marginal law of each row
matters, because the estimate is an average over rows.

Summary (``unbiased`` = every row is exactly N(0, I_d) marginally, so every unbiased component
stays unbiased):

=========  ==========================================  =========  ===============================
name       structure                                   unbiased   host-side precomputation
=========  ==========================================  =========  ===============================
iid        i.i.d. N(0, 1) entries                      yes        none
orf        Haar-orthogonal d x d blocks, chi(d) norms  yes        none   (norm="fixed": no)
sorf       sqrt(p) H D1 H D2 H D3, chi(d) norms        approx.    none   (norm="native": no)
scrf       random signs x circulant(g) blocks          yes        none
rom        S-Hybrid sqrt(p) H Du H D2 H D3, Re/Im     approx.    none   (norm="native": no)
simrf      rotated simplex directions, chi(d) norms    yes        simplex directions (cached)
qmc        scrambled Sobol / shifted Halton -> ndtri   yes (*)    Sobol/Halton integer points
mm         centred + whitened Gaussian sample          no (mild)  none
sgq        Smolyak Gauss-Hermite nodes, rotated        no         sparse grid nodes and weights
fastfood   S H G Pi H B blocks (Le et al. 2013)        yes        none
=========  ==========================================  =========  ===============================

``p`` is ``d`` rounded up to a power of two; Hadamard-based generators build ``p x p`` blocks and
keep the first ``d`` columns (this is what padding the input x with zeros to length p computes).
(*) up to float32 rounding in the extreme tails of the inverse normal CDF (|omega_k| > ~5.3,
probability ~1e-7 per coordinate).

Shapes that are not multiples of the block size: all block generators draw
``ceil(m / block_rows)`` independent blocks and keep the first ``m`` rows.

Cost: drawing W costs at most ``O(m d^2)`` (QR / dense d x d products per block) except where
noted; using W inside attention costs ``O(n m d)`` whatever its structure (the fast Hadamard
application of the structured matrices is exposed in ``learned.fastfoodl_apply``).
"""

from __future__ import annotations

import functools
import math
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "iid", "orf", "sorf", "scrf", "rom", "simrf", "qmc", "mm", "sgq", "fastfood",
    "fwht", "hadamard", "next_pow2", "haar_orthogonal", "chi_norms", "sparse_grid_gauss_hermite",
    "sgq_weights", "fastfood_draw", "fastfood_matrix", "purpose_keys",
]


# ----------------------------------------------------------------------------- helpers


def purpose_keys(key, *purposes: str):
  """One independent sub-key per named purpose: ``fold_in(key, crc32(purpose))``.

  Every random draw of every generator uses its own purpose string (``"orf/norms"``,
  ``"qmc/shift"``, ...), so no two purposes, within a generator or across generators, consume
  the same random bits for the same key.  Returns a tuple of keys (one per purpose).
  """
  return tuple(jax.random.fold_in(key, zlib.crc32(p.encode()) & 0x7FFFFFFF) for p in purposes)


def _check_shape(num_features, dim):
  if not isinstance(num_features, (int, np.integer)) or not isinstance(dim, (int, np.integer)):
    raise TypeError(f"num_features and dim must be static Python ints, got "
                    f"{type(num_features).__name__} and {type(dim).__name__}.")
  if num_features < 1 or dim < 1:
    raise ValueError(f"num_features and dim must be >= 1, got {num_features} and {dim}.")
  return int(num_features), int(dim)


def next_pow2(n: int) -> int:
  """Smallest power of two >= n."""
  return 1 << max(0, int(n - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _hadamard_np(p: int) -> np.ndarray:
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < p:
    h = np.block([[h, h], [h, -h]])
  return h / np.float32(math.sqrt(p))


def hadamard(p: int) -> jnp.ndarray:
  """The normalised (orthogonal, symmetric) Sylvester Hadamard matrix of size p (power of two).

  Host-side: built in numpy once per p and cached.
  """
  if p != next_pow2(p):
    raise ValueError(f"Hadamard size must be a power of two, got {p}.")
  return jnp.asarray(_hadamard_np(p))


def fwht(x: jnp.ndarray) -> jnp.ndarray:
  """Normalised fast Walsh-Hadamard transform along the last axis: ``x @ H`` (H symmetric).

  The last axis must have power-of-two length p; cost O(p log p) per vector. Equals
  ``x @ hadamard(p)`` (Sylvester ordering).
  """
  p = x.shape[-1]
  if p != next_pow2(p):
    raise ValueError(f"fwht needs a power-of-two length, got {p}.")
  lead = x.shape[:-1]
  h = 1
  y = x
  while h < p:
    y = y.reshape(*lead, p // (2 * h), 2, h)
    a, b = y[..., 0, :], y[..., 1, :]
    y = jnp.stack([a + b, a - b], axis=-2)
    h *= 2
  return y.reshape(*lead, p) * (1.0 / math.sqrt(p))


def haar_orthogonal(key, num: int, d: int) -> jnp.ndarray:
  """``num`` independent Haar-distributed orthogonal d x d matrices, float32[num, d, d].

  QR of a Gaussian matrix with the signs of R's diagonal folded into Q (Mezzadri 2007), so the
  law is exactly Haar.
  """
  g = jax.random.normal(key, (num, d, d), jnp.float32)
  q, r = jnp.linalg.qr(g)
  s = jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))
  s = jnp.where(s == 0, 1.0, s)
  return q * s[:, None, :]


def chi_norms(key, shape, d: int) -> jnp.ndarray:
  """Samples of the chi(d) law (norms of d-dimensional standard Gaussian vectors)."""
  return jnp.linalg.norm(jax.random.normal(key, (*shape, d), jnp.float32), axis=-1)


def _rademacher(key, shape):
  return jax.random.rademacher(key, shape, jnp.float32)


def _blocks(m: int, rows_per_block: int) -> int:
  return -(-m // rows_per_block)


# ----------------------------------------------------------------------------- generators


def iid(key, num_features: int, dim: int) -> jnp.ndarray:
  """i.i.d. Gaussian frequencies, every entry N(0, 1) (alias ``gaus``).

  Unbiased: yes (the Monte-Carlo baseline). Host-side work: none. Cost O(m d).
  """
  m, d = _check_shape(num_features, dim)
  (k,) = purpose_keys(key, "iid/rows")
  return jax.random.normal(k, (m, d), jnp.float32)


def orf(key, num_features: int, dim: int, norm: str = "chi") -> jnp.ndarray:
  """Orthogonal random features (Yu et al. 2016): stacked Haar-orthogonal d x d blocks.

  Rows inside one block are exactly orthogonal; blocks are independent; ``ceil(m/d)`` blocks are
  drawn and the first m rows kept. Row norms:
    * ``norm="chi"`` (default): independent chi(d) norms. Each row is then a uniform direction
      times an independent chi(d) length, i.e. exactly N(0, I_d): **unbiased**.
    * ``norm="fixed"``: every row has norm sqrt(d). E[omega omega^T] = I still holds, but higher
      moments differ from the Gaussian: the PosRF/TrigRF estimates are **biased** (relative bias
      about -|x+y|^4 / (4 d) for PosRF); kept for comparison with the literature.
  Host-side work: none. Cost O(m d^2) (a QR per block).
  """
  m, d = _check_shape(num_features, dim)
  if norm not in ("chi", "fixed"):
    raise ValueError(f"orf: norm must be 'chi' or 'fixed', got {norm!r}.")
  nb = _blocks(m, d)
  kq, kn = purpose_keys(key, "orf/rotations", "orf/norms")
  q = haar_orthogonal(kq, nb, d).reshape(nb * d, d)[:m]
  if norm == "chi":
    scale = chi_norms(kn, (m,), d)
  else:
    scale = jnp.full((m,), math.sqrt(d), jnp.float32)
  return q * scale[:, None]


def _hd_product_rows(diags: jnp.ndarray) -> jnp.ndarray:
  """Rows of ``H diag(D1) H diag(D2) ... H diag(Dk)`` for a batch of blocks.

  ``diags``: [k, nb, p]. Returns [nb, p, p] with the matrix M = H D1 H D2 ... H Dk, computed with
  fast transforms applied to the identity (row vector times H is fwht).
  """
  k, nb, p = diags.shape
  r = jnp.broadcast_to(jnp.eye(p, dtype=diags.dtype), (nb, p, p))
  for i in range(k):
    r = fwht(r) * diags[i][:, None, :]
  return r


def sorf(key, num_features: int, dim: int, norm: str = "chi") -> jnp.ndarray:
  """Structured orthogonal random features (Yu et al. 2016): blocks ``sqrt(p) H D1 H D2 H D3``.

  H is the *normalised* p x p Hadamard matrix (p = d rounded up to a power of two), D_i diagonal
  random signs. Each block is a scaled orthogonal p x p matrix; we keep its first d columns (the
  same as padding x with zeros) and all p rows, stack ``ceil(m/p)`` independent blocks and keep m
  rows. For d a power of two the rows of a block are exactly orthogonal (with norm sqrt(d) for
  ``norm="native"``); for other d the p native rows of a block form a tight frame
  (``W_b^T W_b = p I_d``).

  Law of a row: every entry has mean 0 and variance exactly 1, entries are uncorrelated, but the
  row is not Gaussian. ``norm="native"`` is the published construction: for d = p every row has
  the fixed length sqrt(d), which makes the PosRF estimate clearly **biased** (relative bias about
  -|x+y|^4 / (4 d), e.g. -10 % at d = 32, |x| = |y| = 1, x = y). ``norm="chi"`` (default) rescales
  every row to an independent chi(d) length (block orthogonality is kept); the direction is then
  close to, but not exactly, uniform: **approximately unbiased** (no bias detectable at 4000 draws
  for d in {16, 24, 32}, m ~ 100). Host-side work: none (transforms in jnp). Cost O(m p log p).
  """
  m, d = _check_shape(num_features, dim)
  if norm not in ("native", "chi"):
    raise ValueError(f"sorf: norm must be 'native' or 'chi', got {norm!r}.")
  p = next_pow2(d)
  nb = _blocks(m, p)
  kd, kn = purpose_keys(key, "sorf/signs", "sorf/norms")
  diags = _rademacher(kd, (3, nb, p))
  w = (math.sqrt(p) * _hd_product_rows(diags)).reshape(nb * p, p)[:m, :d]
  if norm == "chi":
    w = w / jnp.linalg.norm(w, axis=-1, keepdims=True) * chi_norms(kn, (m,), d)[:, None]
  return w


def scrf(key, num_features: int, dim: int) -> jnp.ndarray:
  """Signed circulant random features (Feng et al. 2015): blocks ``diag(s) circ(g)``.

  Per block: g ~ N(0, I_d), the d x d circulant matrix with rows ``roll(g, i)``, each row multiplied
  by an independent random sign s_i. ``ceil(m/d)`` independent blocks, first m rows kept. Any d.
  Every row is a signed permutation of a Gaussian vector, hence exactly N(0, I_d): **unbiased**.
  Host-side work: none. Cost O(m d) to draw (O(n m log d) with an FFT when applied; here W is
  materialised).
  """
  m, d = _check_shape(num_features, dim)
  nb = _blocks(m, d)
  kg, ks = purpose_keys(key, "scrf/gaussian", "scrf/signs")
  g = jax.random.normal(kg, (nb, d), jnp.float32)
  idx = (jnp.arange(d)[None, :] - jnp.arange(d)[:, None]) % d  # row i = roll(g, i)
  circ = g[:, idx]  # [nb, d, d]
  s = _rademacher(ks, (nb, d, 1))
  return (circ * s).reshape(nb * d, d)[:m]


def rom(key, num_features: int, dim: int, norm: str = "chi") -> jnp.ndarray:
  """Random ortho-matrices, S-Hybrid variant (Choromanski, Rowland & Weller 2017), made real.

  What we implement: per block the complex p x p matrix ``Z = sqrt(p) H Du H D2 H D3`` (the
  S-Hybrid product ``S D^(U) S D^(R) S D^(R)``) with H the normalised Hadamard matrix, D2, D3
  random signs and Du diagonal with entries ``exp(i theta_k)``, theta_k ~ U[0, 2 pi) (uniform on
  the complex unit circle); Z / sqrt(p) is unitary. The real rows are ``sqrt(2) Re Z`` and
  ``sqrt(2) Im Z`` (interleaved: row 2j = Re of complex row j, row 2j + 1 = its Im), giving 2p real
  rows per block; we keep the first d columns (input zero-padded to p), stack ``ceil(m / 2p)``
  independent blocks and keep m rows.

  Law of a row: entries have mean 0 and variance exactly 1 and are uncorrelated; rows are not
  Gaussian. With ``norm="native"`` the squared length of a row (before truncating to d columns) is
  ``2 sum_k cos^2(theta_k)`` (or sin^2): mean p, standard deviation sqrt(p/2), i.e. less spread
  than chi(p)^2 (sd sqrt(2p)) but not fixed; after truncation to d columns it is random with mean
  d. ``norm="chi"`` (default) rescales each row to an independent chi(d) length, which removes
  the norm part of the bias; the direction is still only approximately uniform, so the kernel
  estimate is **approximately unbiased** in both cases (relative bias at most a few per cent for
  d >= 32 and |x + y| <= 3; "native" is measurably biased at d = 16).
  Host-side work: none. Cost O(m p log p) to draw.
  """
  m, d = _check_shape(num_features, dim)
  if norm not in ("native", "chi"):
    raise ValueError(f"rom: norm must be 'native' or 'chi', got {norm!r}.")
  p = next_pow2(d)
  nb = _blocks(m, 2 * p)
  kd, kt, kn = purpose_keys(key, "rom/signs", "rom/phases", "rom/norms")
  signs = _rademacher(kd, (2, nb, p))
  theta = jax.random.uniform(kt, (nb, 1, p), jnp.float32, 0.0, 2.0 * math.pi)
  h = fwht(jnp.broadcast_to(jnp.eye(p, dtype=jnp.float32), (nb, p, p)))  # rows of H
  parts = []
  for trig in (jnp.cos, jnp.sin):
    r = h * trig(theta)
    r = fwht(r) * signs[0][:, None, :]
    r = fwht(r) * signs[1][:, None, :]
    parts.append(math.sqrt(2 * p) * r)
  w = jnp.stack(parts, axis=2).reshape(nb * 2 * p, p)[:m, :d]
  if norm == "chi":
    w = w / jnp.linalg.norm(w, axis=-1, keepdims=True) * chi_norms(kn, (m,), d)[:, None]
  return w


@functools.lru_cache(maxsize=None)
def _simplex_np(d: int) -> np.ndarray:
  """d unit vectors in R^d with pairwise cosine -1/(d-1) (they span the sum-zero hyperplane)."""
  if d == 1:
    return np.ones((1, 1), np.float32)
  s = np.eye(d) - 1.0 / d
  s /= np.linalg.norm(s, axis=1, keepdims=True)
  return s.astype(np.float32)


def simrf(key, num_features: int, dim: int) -> jnp.ndarray:
  """Simplex random features (Reid et al. 2023).

  Per block of d rows: the directions are d unit vectors with pairwise cosine exactly -1/(d-1)
  (a regular simplex, spanning a (d-1)-dimensional subspace), rotated by a Haar-random orthogonal
  matrix, each row scaled by an independent chi(d) norm. ``ceil(m/d)`` independent blocks, first m
  rows kept. Each row is a uniform direction times an independent chi(d) length, i.e. exactly
  N(0, I_d): **unbiased**. (d = 1: one row per block, +-chi(1).) Host-side work: the fixed simplex
  directions (numpy, cached per d). Cost O(m d^2).
  """
  m, d = _check_shape(num_features, dim)
  nb = _blocks(m, d)
  kr, kn = purpose_keys(key, "simrf/rotations", "simrf/norms")
  rot = haar_orthogonal(kr, nb, d)  # [nb, d, d]
  s = jnp.asarray(_simplex_np(d))  # [d, d], rows = directions
  dirs = jnp.einsum("ij,bkj->bik", s, rot).reshape(nb * d, d)[:m]  # rows R s_i
  return dirs * chi_norms(kn, (m,), d)[:, None]


# --------------------------------------------------------------------------- QMC


@functools.lru_cache(maxsize=None)
def _sobol_uint32(m: int, d: int) -> np.ndarray:
  """First m points of the (unscrambled) d-dimensional Sobol sequence as 32-bit integers."""
  from scipy.stats import qmc as sqmc  # host-side only
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pts = sqmc.Sobol(d, scramble=False, bits=32).random(m)
  return np.asarray(np.round(pts * 2.0**32), dtype=np.uint64).astype(np.uint32)


@functools.lru_cache(maxsize=None)
def _first_primes(n: int) -> tuple[int, ...]:
  primes, c = [], 2
  while len(primes) < n:
    if all(c % q for q in primes if q * q <= c):
      primes.append(c)
    c += 1
  return tuple(primes)


@functools.lru_cache(maxsize=None)
def _halton_np(m: int, d: int) -> np.ndarray:
  """Points 1..m of the d-dimensional Halton sequence (radical inverses in the first d primes)."""
  out = np.zeros((m, d), np.float64)
  idx = np.arange(1, m + 1)
  for j, b in enumerate(_first_primes(d)):
    n = idx.copy()
    f = 1.0 / b
    val = np.zeros(m)
    while np.any(n > 0):
      val += f * (n % b)
      n //= b
      f /= b
    out[:, j] = val
  return out


def _bits_to_normal(r: jnp.ndarray, jitter: jnp.ndarray) -> jnp.ndarray:
  """Maps u = (r + jitter) / 2^32 (r uint32, jitter in [0,1)) to ndtri(u) accurately in float32.

  Works on the nearer tail: for u >= 1/2 uses -ndtri(1 - u) with 1 - u computed from the integer
  bits, so both tails keep full relative precision.
  """
  upper = r >= jnp.uint32(2**31)
  r2 = jnp.where(upper, jnp.uint32(2**32 - 1) - r, r)
  j2 = jnp.where(upper, 1.0 - jitter, jitter)
  v = (r2.astype(jnp.float32) + j2) * jnp.float32(2.0**-32)
  v = jnp.maximum(v, jnp.float32(2.0**-60))
  z = jax.scipy.special.ndtri(v)
  return jnp.where(upper, -z, z)


def qmc(key, num_features: int, dim: int, sequence: str = "sobol",
        scramble: str = "lms") -> jnp.ndarray:
  """Randomised quasi-Monte-Carlo frequencies: low-discrepancy points through the normal inverse CDF.

  ``sequence="sobol"`` (default): the first m points of the d-dimensional Sobol sequence (Joe-Kuo
  direction numbers via scipy), as 32-bit integers computed on the **host** from the static
  (m, d) and cached; the randomisation runs in jax from the key:
    * ``scramble="lms"`` (default): a random linear matrix scramble (Matousek 1998: per dimension a
      random lower-triangular binary 32 x 32 matrix with unit diagonal acting on the digits) followed
      by a random digital shift (XOR with a uniform 32-bit word) - the scrambling scipy uses;
    * ``scramble="shift"``: the random digital shift only.
    Then a uniform jitter inside the 2^-32 cell. The digital shift alone makes every point exactly
    uniform on [0, 1)^d, and (t, m, s)-net structure is preserved by both.
  ``sequence="halton"``: Halton points 1..m (host-side radical inverses in the first d primes),
  randomised by a uniform random shift modulo 1 (Cranley-Patterson rotation); every point is then
  exactly uniform. (Plain Halton correlates badly in high dimension; prefer Sobol.)
  The uniforms are mapped coordinate-wise through ``ndtri`` (tails kept accurate), so each row is
  marginally N(0, I_d): **unbiased** (up to float32 rounding far in the tails). Rows are
  dependent (stratified), which lowers the variance for smooth integrands. m need not be a power
  of two (the balance properties of Sobol nets are best when it is).
  Host-side work: Sobol/Halton integer points, O(m d), cached per (m, d); Sobol needs d <= 21201.
  Cost in jax: O(32 m d) bit operations for "lms", O(m d) otherwise.
  """
  m, d = _check_shape(num_features, dim)
  if sequence == "sobol":
    if scramble not in ("lms", "shift"):
      raise ValueError(f"qmc: scramble must be 'lms' or 'shift', got {scramble!r}.")
    pts = jnp.asarray(_sobol_uint32(m, d))  # [m, d] uint32
    k_lms, k_shift, k_jit = purpose_keys(key, "qmc/lms", "qmc/shift", "qmc/jitter")
    if scramble == "lms":
      # Row i of L (digit i, i=0 most significant, bit position 31-i) has ones on the diagonal and
      # random bits for more significant digits j < i.
      rnd = jax.random.bits(k_lms, (d, 32), jnp.uint32)
      i = jnp.arange(32, dtype=jnp.uint32)
      # bits for digits j <= i  <=> bit positions >= 31 - i.
      above = jnp.where(i == 31, jnp.uint32(0xFFFFFFFF),
                        ~((jnp.uint32(1) << (jnp.uint32(31) - i)) - jnp.uint32(1)))
      diag = jnp.uint32(1) << (jnp.uint32(31) - i)
      masks = (rnd & above[None, :]) | diag[None, :]  # [d, 32]
      par = jax.lax.population_count(pts[:, :, None] & masks[None, :, :]) & jnp.uint32(1)
      pts = jnp.sum(par << (jnp.uint32(31) - i)[None, None, :], axis=-1, dtype=jnp.uint32)
    shift = jax.random.bits(k_shift, (1, d), jnp.uint32)
    r = pts ^ shift
    jitter = jax.random.uniform(k_jit, (m, d), jnp.float32)
    return _bits_to_normal(r, jitter)
  if sequence == "halton":
    h = jnp.asarray(_halton_np(m, d).astype(np.float32))
    (k_shift,) = purpose_keys(key, "qmc/halton-shift")
    u = jnp.mod(h + jax.random.uniform(k_shift, (1, d), jnp.float32), 1.0)
    u = jnp.clip(u, 2.0**-60, 1.0 - 2.0**-24)
    return jax.scipy.special.ndtri(u)
  raise ValueError(f"qmc: sequence must be 'sobol' or 'halton', got {sequence!r}.")


# --------------------------------------------------------------------------- moment matching


def mm(key, num_features: int, dim: int) -> jnp.ndarray:
  """Moment matching: an i.i.d. Gaussian sample, centred and whitened.

  For m > d: ``W = (G - mean(G)) C^{-1/2}`` with ``C = (G - mean)^T (G - mean) / m``, so that
  exactly (up to float32 rounding) ``mean_i omega_i = 0`` and ``(1/m) sum_i omega_i omega_i^T = I``
  (note 1/m, not 1/(m-1)). For m <= d the sample covariance has rank < d and cannot be whitened:
  we then only centre (if m > 1) and rescale globally so that the mean squared row norm is d
  (``(1/m) sum |omega_i|^2 = d``); for m = 1 the raw Gaussian row is returned.
  **Biased** (mildly): whitening makes rows dependent *and* changes their marginal law (the
  estimate is consistent, bias O(1/m)). Host-side work: none. Cost O(m d^2 + d^3) (eigh).
  """
  m, d = _check_shape(num_features, dim)
  (k,) = purpose_keys(key, "mm/sample")
  g = jax.random.normal(k, (m, d), jnp.float32)
  if m == 1:
    return g
  c = g - jnp.mean(g, axis=0, keepdims=True)
  if m <= d:
    ms = jnp.mean(jnp.sum(c * c, axis=-1))
    return c * jnp.sqrt(d / ms)
  cov = c.T @ c / m
  evals, evecs = jnp.linalg.eigh(cov)
  inv_sqrt = (evecs * jax.lax.rsqrt(evals)[None, :]) @ evecs.T
  w = c @ inv_sqrt
  # One refinement step cleans float32 rounding of the eigendecomposition.
  w = w - jnp.mean(w, axis=0, keepdims=True)
  cov2 = w.T @ w / m
  e2, v2 = jnp.linalg.eigh(cov2)
  return w @ ((v2 * jax.lax.rsqrt(e2)[None, :]) @ v2.T)


# --------------------------------------------------------------------------- sparse grids


@functools.lru_cache(maxsize=None)
def _gh_rule(n: int) -> tuple[np.ndarray, np.ndarray]:
  """n-point Gauss-Hermite rule for the standard normal weight (probabilists')."""
  x, w = np.polynomial.hermite_e.hermegauss(n)
  return x, w / math.sqrt(2.0 * math.pi)


def _compositions(total: int, parts: int):
  """All tuples of `parts` non-negative ints summing to `total`."""
  if parts == 1:
    yield (total,)
    return
  for first in range(total + 1):
    for rest in _compositions(total - first, parts - 1):
      yield (first,) + rest


@functools.lru_cache(maxsize=None)
def sparse_grid_gauss_hermite(d: int, level: int) -> tuple[np.ndarray, np.ndarray]:
  """Smolyak sparse grid for N(0, I_d) with Gauss-Hermite 1-D rules (host-side numpy, cached).

  1-D rule of level i >= 1: Gauss-Hermite with 2i - 1 nodes (odd, so 0 is shared). Combination
  formula ``A(l, d) = sum_{l <= |i| - d + 1 ... }``: with excess e = |i| - d, the tensor rules with
  ``l - d <= e <= l - 1`` enter with coefficient ``(-1)^(l-1-e) C(d-1, l-1-e)``. Equal nodes are
  merged (weights summed, zero-weight nodes dropped). The rule is exact for polynomials of total
  degree <= 2 l - 1. Level 1 is the single node 0; level 2 is ``{0, +-sqrt(3) e_k}``
  (2d + 1 nodes); level 3 has 2 d^2 + 4 d + 1 nodes (the
  1-D rules are not nested, so the 3- and 5-point axis nodes both survive). Weights can be negative.
  Returns (nodes float64[N, d], weights float64[N]); weights sum to 1.
  """
  if level < 1:
    raise ValueError(f"sparse_grid_gauss_hermite: level must be >= 1, got {level!r}.")
  acc: dict[tuple, float] = {}
  for e in range(max(0, level - d), level):
    coef = (-1) ** (level - 1 - e) * math.comb(d - 1, level - 1 - e)
    for comp in _compositions(e, d):
      support = [k for k in range(d) if comp[k] > 0]
      rules = [_gh_rule(2 * (comp[k] + 1) - 1) for k in support]
      # Tensor product over the support (other coordinates use the 1-point rule: node 0, weight 1).
      grids = np.meshgrid(*[r[0] for r in rules], indexing="ij") if rules else []
      wgrids = np.meshgrid(*[r[1] for r in rules], indexing="ij") if rules else []
      if rules:
        xs = np.stack([g.ravel() for g in grids], axis=1)
        ws = np.prod(np.stack([g.ravel() for g in wgrids], axis=1), axis=1)
      else:
        xs, ws = np.zeros((1, 0)), np.ones(1)
      for xrow, wv in zip(xs, ws):
        keyt = tuple(sorted((support[j], round(float(xrow[j]), 12)) for j in range(len(support))
                            if abs(xrow[j]) > 1e-12))
        acc[keyt] = acc.get(keyt, 0.0) + coef * wv
  items = [(k, w) for k, w in acc.items() if abs(w) > 1e-14]
  # Deterministic order: by |weight| descending, then by key.
  items.sort(key=lambda kw: (-abs(kw[1]), kw[0]))
  nodes = np.zeros((len(items), d))
  weights = np.zeros(len(items))
  for n, (k, w) in enumerate(items):
    for j, v in k:
      nodes[n, j] = v
    weights[n] = w
  return nodes, weights


def _sgq_count(d: int, level: int) -> int:
  # Closed forms for the levels used in practice (avoid building large grids just to count).
  if level == 1:
    return 1
  if level == 2:
    return 2 * d + 1
  if level == 3:
    return 2 * d * d + 4 * d + 1
  return len(sparse_grid_gauss_hermite(d, level)[1])


@functools.lru_cache(maxsize=None)
def _sgq_plan(m: int, d: int, level: int | None) -> tuple[np.ndarray, np.ndarray, int]:
  """Host-side: (nodes float32[N, d], weights float64[N], level) for sgq(m, d)."""
  if level is None:
    level = 2
    while level < 6 and _sgq_count(d, level + 1) <= m:
      level += 1
  nodes, weights = sparse_grid_gauss_hermite(d, level)
  return nodes.astype(np.float32), weights, level


def sgq_weights(num_features: int, dim: int, level: int | None = None) -> np.ndarray:
  """Quadrature weights (host numpy float64[m]) matching the rows of ``sgq(key, m, d, level)``.

  Rows of sgq are rotated nodes, so these weights (which do not depend on the key) apply to them:
  ``sum_i w_i f(omega_i) / n_blocks`` is the sparse-grid quadrature of E f(omega) when m is a
  whole number of grids. Provided for weighted estimators; the W-only contract drops them.
  """
  m, d = _check_shape(num_features, dim)
  nodes, weights, _ = _sgq_plan(m, d, level)
  n = len(weights)
  nb = _blocks(m, n)
  return np.tile(weights, nb)[:m]


def sgq(key, num_features: int, dim: int, level: int | None = None) -> jnp.ndarray:
  """Sparse-grid (Smolyak) Gauss-Hermite quadrature nodes, randomly rotated per key.

  Host-side (numpy, cached per (m, d, level)): the Smolyak grid of
  ``sparse_grid_gauss_hermite(d, level)``; by default ``level`` is the largest level (>= 2) whose
  grid has at most m nodes (for d = 32 and m < 2177 that is level 2: the origin and +-sqrt(3) e_k).
  Fewer nodes N than m: ``ceil(m/N)`` copies of the grid, each rotated by an independent Haar
  rotation, first m rows kept (nodes are ordered by decreasing |weight|, so a partial copy keeps
  the heaviest nodes). More nodes than m (only when level is forced, or m < 2d + 1 at level 2):
  the m heaviest nodes. In jax: one Haar rotation per copy (O(d^3)).

  **Not an unbiased estimator** and not a consistent quadrature under the W-only contract: the
  components average rows with equal weights 1/m, while the Smolyak weights are unequal and partly
  negative (e.g. level 2: weight 1 - d/3 at the origin, 1/6 at each +-sqrt(3) e_k). With equal
  weights the second moment is ``(1/m) sum omega omega^T = 6/(2d+1) I`` at level 2, far from I, so
  the kernel is strongly underestimated. ``sgq_weights`` returns the matching quadrature weights
  for estimators that can use them (with those weights the rule integrates polynomials of degree
  <= 2 level - 1 exactly, for any rotation).
  """
  m, d = _check_shape(num_features, dim)
  nodes, _, _ = _sgq_plan(m, d, level)
  n = nodes.shape[0]
  nb = _blocks(m, n)
  rot = haar_orthogonal(purpose_keys(key, "sgq/rotations")[0], nb, d)  # [nb, d, d]
  x = jnp.asarray(nodes)
  return jnp.einsum("nj,bkj->bnk", x, rot).reshape(nb * n, d)[:m]


# --------------------------------------------------------------------------- fastfood


def fastfood_draw(key, num_features: int, dim: int):
  """Draws the Fastfood factors: dict(S float32[m], G float32[nb, p], B float32[nb, d],
  perm int32[nb, p]) with nb = ceil(m/p) blocks.

  ``S`` holds the row scales of the stacked blocks (truncated to m rows):
  ``S = s sqrt(p) / |G_block|`` with s ~ chi(p) independent, so each row has length exactly s
  (Le et al. 2013, with H normalised). ``B`` keeps only the d signs that meet the real
  coordinates (the zero-padded ones never matter). Shared with ``learned.fastfoodl``.
  """
  m, d = _check_shape(num_features, dim)
  p = next_pow2(d)
  nb = _blocks(m, p)
  kb, kp, kg, ks = purpose_keys(key, "fastfood/b", "fastfood/perm", "fastfood/g",
                                "fastfood/s")
  b = _rademacher(kb, (nb, d))
  perm = jax.vmap(lambda k: jax.random.permutation(k, p))(jax.random.split(kp, nb)).astype(jnp.int32)
  g = jax.random.normal(kg, (nb, p), jnp.float32)
  s = chi_norms(ks, (nb, p), p) * math.sqrt(p) / jnp.linalg.norm(g, axis=-1, keepdims=True)
  return {"S": s.reshape(nb * p)[:m], "G": g, "B": b, "perm": perm}


def fastfood_matrix(s, g, b, perm) -> jnp.ndarray:
  """Materialises Fastfood blocks ``diag(S) H diag(G) Pi H diag(B)`` -> float32[m, d].

  Shapes as returned by ``fastfood_draw``: m = len(S), d = B.shape[1]. Pi is the permutation
  matrix with ``(Pi v)_i = v[perm[i]]``. Differentiable in S, G, B. Cost O(m p log p).
  """
  nb, p = g.shape
  m, d = s.shape[0], b.shape[1]
  eye = jnp.eye(p, dtype=jnp.float32)
  # Rows of M = S H G Pi H B: start with rows of H, scale columns by G, permute the columns
  # (row-vector times Pi: (r Pi)_k = r_i with perm[i] = k), apply H, scale columns by B, rows by S.
  r = fwht(jnp.broadcast_to(eye, (nb, p, p)))  # rows of H
  r = r * g[:, None, :]
  inv = jnp.argsort(perm, axis=-1)
  r = jnp.take_along_axis(r, jnp.broadcast_to(inv[:, None, :], r.shape), axis=-1)
  r = fwht(r)[:, :, :d] * b[:, None, :]
  return r.reshape(nb * p, d)[:m] * s[:, None]


def fastfood(key, num_features: int, dim: int) -> jnp.ndarray:
  """Fastfood (Le, Sarlos & Smola 2013): stacked blocks ``S H G Pi H B``, fixed (not learned).

  Per block (p = d rounded up to a power of two; input zero-padded to p, i.e. first d columns
  kept): B random signs, Pi a uniform random permutation, G ~ N(0, I_p), H the normalised
  Hadamard matrix, and ``S_i = s_i sqrt(p) / |G|_F`` with s_i ~ chi(p). Given (B, Pi), a row of
  ``H G Pi H B`` is ``sum_j H_ij g_j r_j`` with orthonormal r_j: an isotropic Gaussian vector in
  R^p whose length is the same |G|/sqrt(p) for all rows; S replaces that length by an independent
  chi(p) draw. So each row is exactly N(0, I_p) and its first d coordinates exactly N(0, I_d):
  **unbiased**. ``ceil(m/p)`` blocks of p rows, first m rows kept.
  Host-side work: none. Cost O(m p log p) to draw; O(n m log p) to apply with fast transforms
  (``learned.fastfoodl_apply``).
  """
  m, d = _check_shape(num_features, dim)
  f = fastfood_draw(key, m, d)
  return fastfood_matrix(f["S"], f["G"], f["B"], f["perm"])
