"""The efficient-attention baselines of the LRA study, as pure functions and one Flax layer.

Every function takes Flax-layout self-attention inputs ``q, k, v [batch, n, heads, head_dim]``
and one padding mask ``mask bool[batch, n]`` (True = real token, None = all real) and returns
float32 ``[batch, n, heads, v_dim]``.  Padded keys get no weight and padded queries give zeros
(for every method: its landmarks, projections, buckets and samples see real tokens only).
``s_ij = q_i . k_j / sqrt(d)`` is the softmax logit, ``x = q d^(-1/4)``, ``y = k d^(-1/4)``.

* ``nystrom`` (Xiong et al., 2021): landmarks ``q~, k~`` are the means of ``num_landmarks``
  contiguous segments; ``out = softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T) V``, the
  pseudo-inverse by 6 iterations of ``Z <- Z (13 I - AZ (15 I - AZ (7 I - AZ))) / 4`` from
  ``Z0 = A^T / (|A|_1 |A|_inf)``.  With one landmark per token and an exact pseudo-inverse it
  is softmax attention (``S S^+ S = S``).
* ``kernelized`` (the Gaussian-kernel attention of Skyformer, Chen et al., 2021):
  ``out_i = sum_j exp(-|x_i - y_j|^2 / 2) v_j``, unnormalised, O(n^2).
* ``skyformer``: the Nystrom approximation of that Gaussian kernel on the joint, positive
  semi-definite kernel matrix of ``[x; y]``: with landmarks ``z`` (half sampled from the real
  queries, half from the real keys), ``kappa(x, y) ~ kappa(x, z) (kappa(z, z) + r I)^+
  kappa(z, y)``, ridge ``r = 0.1`` and the iterative pseudo-inverse after a symmetric
  ``D^(-1/2) . D^(-1/2)`` row-sum preconditioning (as the authors' code).  With every token a
  landmark, ``r = 0`` and an exact pseudo-inverse it equals ``kernelized``.
* ``linformer`` (Wang et al., 2020): learned projections ``E, F [k, n]`` of the sequence axis,
  ``out = softmax(Q (E K)^T / sqrt(d)) F V``; padded keys and values are zeroed before the
  projection and a projected slot no real key feeds (``|E| mask = 0``) is masked, so identity
  projections give softmax attention exactly.
* ``bigbird`` (Zaheer et al., 2020): blocks of ``block_size`` tokens; query block ``i`` sees key
  blocks ``i - 1, i, i + 1`` (window), the first and last block (global) and
  ``num_random_blocks`` random blocks (each key block counted once); the global blocks' queries
  see every key.  One block covering the sequence is softmax attention.
* ``reformer`` (Kitaev et al., 2020): shared-QK LSH attention: keys are ``k_j = q_j / |q_j|``;
  per hash round, angular LSH ``h(q) = argmax [q R, -q R]`` with a random rotation
  ``R [d, n_buckets / 2]``, tokens sorted by (bucket, position) and cut into chunks of
  ``chunk_size``; a chunk attends to itself and the previous chunk, within its bucket, a token
  to itself only when nothing else is allowed (and that round's log-normaliser then gets the
  Reformer's ``-1e5``); rounds are combined with weights ``softmax_r(logsumexp_r)``.  ``n_buckets = 2 n / chunk_size`` (at least 2).
* ``informer`` (Zhou et al., 2021), ProbSparse self-attention: a query's sparsity
  ``M_i = max_j s_ij - mean_j s_ij`` is estimated on ``U = factor ceil(ln n)`` sampled keys;
  the top ``u = factor ceil(ln n)`` queries attend every key by softmax, the others output the
  mean of the real values.  ``u >= n`` is softmax attention.

Random parts (BigBird's random blocks, Reformer's rotations, Informer's key samples and
Skyformer's landmark positions) are drawn from a key; ``BaselineSelfAttention`` draws them at
init into the ``"random_features"`` collection, so the trainer's ``redraw_every`` redraws them.
``BaselineSelfAttention`` is a linen layer; in nnx use ``nnx.bridge.ToNNX(layer, rngs=...)``
(then ``nnx.bridge.lazy_init(model, x)``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from spectraformer_jax import attention as attn
from spectraformer_jax import layers
from spectraformer_jax._dtypes import f32 as _f32

KINDS: dict[str, str] = {
    "nystrom": "Nystromformer: segment-mean landmarks, iterative pseudo-inverse.",
    "skyformer": "Skyformer: Nystrom approximation of Gaussian-kernel attention.",
    "linformer": "Linformer: learned low-rank projections of keys and values.",
    "bigbird": "BigBird: block-sparse window + global + random attention.",
    "reformer": "Reformer: shared-QK locality-sensitive-hashing attention.",
    "informer": "Informer: ProbSparse attention on the top queries.",
    "kernelized": "Exact (quadratic) unnormalised Gaussian-kernel attention.",
}
# The layer fields (hyperparameters) each kind uses; their defaults are the study's values
# (Skyformer / Spectraformer LRA setup: 128 landmarks, Linformer k = 256, BigBird blocks of 64
# with 3 random blocks, Reformer 2 hashes with chunks of 64, Informer factor 5).
HYPERPARAMETERS: dict[str, tuple[str, ...]] = {
    "nystrom": ("num_landmarks",),
    "skyformer": ("num_landmarks", "ridge"),
    "linformer": ("linformer_k",),
    "bigbird": ("block_size", "num_random_blocks"),
    "reformer": ("num_hashes", "lsh_chunk_size"),
    "informer": ("informer_factor",),
    "kernelized": (),
}
INVERSES = ("iterative", "pinv")
SELF_PENALTY = 1e5  # Reformer: the logit penalty of a token attending to itself


# ----------------------------------------------------------------------------- helpers


def _check(q, k, v, mask):
  """Validates self-attention inputs; returns head-major float32 q, k, v and a bool mask."""
  if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
    raise ValueError("Baselines are self-attention on q, k, v [batch, n, heads, head_dim] of one "
                     f"length, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}.")
  b, n = q.shape[:2]
  mask = jnp.ones((b, n), bool) if mask is None else attn.broadcast_mask(mask, (b,), n, "mask")
  h = lambda t: attn.to_heads(_f32(t))  # pylint: disable=protected-access
  return h(q), h(k), h(v), mask


def _out(out, mask):
  """Head-major ``[b, h, n, dv]`` -> Flax layout, padded queries zeroed."""
  out = attn.to_heads(out)  # pylint: disable=protected-access
  return jnp.where(mask[:, :, None, None], out, 0.0)


def _softmax(logits, allowed):
  """Row softmax over ``allowed`` entries (max-stabilised); rows with none allowed are 0."""
  logits = jnp.where(allowed, logits, -jnp.inf)
  top = jnp.max(logits, axis=-1, keepdims=True)
  top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
  w = jnp.where(allowed, jnp.exp(logits - top), 0.0)
  s = w.sum(-1, keepdims=True)
  return w / jnp.where(s > 0, s, 1.0)


def _mm(eq, *ts):
  return jnp.einsum(eq, *ts, precision=jax.lax.Precision.HIGHEST)


def iterative_pinv(a, num_iterations: int = 6):
  """Moore-Penrose pseudo-inverse of ``a [..., L, L]`` by the third-order Newton iteration of
  Razavi et al. (2014): ``Z0 = a^T / (|a|_1 |a|_inf)``,
  ``Z <- Z (13 I - aZ (15 I - aZ (7 I - aZ))) / 4``.  Converges to ``pinv(a)`` for any ``a``;
  the Nystromformer uses 6 iterations."""
  eye = jnp.eye(a.shape[-1], dtype=a.dtype)
  norm1 = jnp.max(jnp.sum(jnp.abs(a), axis=-2), axis=-1)[..., None, None]
  norm_inf = jnp.max(jnp.sum(jnp.abs(a), axis=-1), axis=-1)[..., None, None]
  z = jnp.swapaxes(a, -1, -2) / jnp.maximum(norm1 * norm_inf, 1e-30)
  for _ in range(num_iterations):
    az = _mm("...ij,...jk->...ik", a, z)
    inner = 7 * eye - az
    inner = 15 * eye - _mm("...ij,...jk->...ik", az, inner)
    inner = 13 * eye - _mm("...ij,...jk->...ik", az, inner)
    z = 0.25 * _mm("...ij,...jk->...ik", z, inner)
  return z


def _pinv(a, inverse: str, num_iterations: int):
  if inverse not in INVERSES:
    raise ValueError(f"inverse={inverse!r} is unknown; choose one of {INVERSES}.")
  if inverse == "pinv":
    return jnp.linalg.pinv(a, hermitian=False)
  return iterative_pinv(a, num_iterations)


def _pad_to(t, length, axis, value=0):
  pad = length - t.shape[axis]
  if pad == 0:
    return t
  widths = [(0, 0)] * t.ndim
  widths[axis] = (0, pad)
  return jnp.pad(t, widths, constant_values=value)


# ----------------------------------------------------------------------------- Nystromformer


def segment_means(x, mask, num_segments: int):
  """Means of ``num_segments`` contiguous segments of ``x [b, h, n, d]`` over real tokens.

  ``n`` is padded (with masked tokens) to a multiple of the segment length ``ceil(n / L)``.
  Returns ``(means [b, h, L, d], real bool[b, L])``; a segment without real tokens is masked.
  """
  b, h, n, d = x.shape
  seg = -(-n // num_segments)
  total = seg * num_segments
  x = _pad_to(jnp.where(mask[:, None, :, None], x, 0.0), total, 2)
  m = _pad_to(mask, total, 1, False).astype(jnp.float32)
  sums = x.reshape(b, h, num_segments, seg, d).sum(-2)
  counts = m.reshape(b, num_segments, seg).sum(-1)
  return sums / jnp.maximum(counts, 1.0)[:, None, :, None], counts > 0


def nystrom_attention(q, k, v, mask=None, *, num_landmarks: int = 128,
                      inverse: str = "iterative", num_iterations: int = 6):
  """Nystromformer attention (module doc); ``num_landmarks`` is capped at ``n``."""
  q, k, v, mask = _check(q, k, v, mask)
  n, d = q.shape[-2], q.shape[-1]
  num = min(num_landmarks, n)
  ql, lm = segment_means(q, mask, num)
  kl, _ = segment_means(k, mask, num)
  scale = 1.0 / math.sqrt(d)
  kernel1 = _softmax(_mm("bhnd,bhld->bhnl", q, kl) * scale, lm[:, None, None, :])
  kernel2 = _softmax(_mm("bhld,bhmd->bhlm", ql, kl) * scale,
                     lm[:, None, :, None] & lm[:, None, None, :])
  kernel3 = _softmax(_mm("bhld,bhnd->bhln", ql, k) * scale,
                     lm[:, None, :, None] & mask[:, None, None, :])
  context = _mm("bhln,bhne->bhle", kernel3, v)
  context = _mm("bhlm,bhme->bhle", _pinv(kernel2, inverse, num_iterations), context)
  return _out(_mm("bhnl,bhle->bhne", kernel1, context), mask)


# ----------------------------------------------------------------------------- Gaussian kernel


def _gaussian(a, b):
  """``exp(a . b - |a|^2/2 - |b|^2/2) = exp(-|a - b|^2 / 2)``: ``[..., n, d] x [..., l, d] ->
  [..., n, l]``."""
  sq_a = 0.5 * jnp.sum(a * a, -1)[..., :, None]
  sq_b = 0.5 * jnp.sum(b * b, -1)[..., None, :]
  return jnp.exp(_mm("...nd,...ld->...nl", a, b) - sq_a - sq_b)


def kernelized_attention(q, k, v, mask=None):
  """Unnormalised Gaussian-kernel attention ``sum_j exp(-|x_i - y_j|^2/2) v_j`` (module doc)."""
  q, k, v, mask = _check(q, k, v, mask)
  scale = q.shape[-1] ** -0.25
  weights = _gaussian(q * scale, k * scale) * mask[:, None, None, :]
  return _out(_mm("bhnl,bhle->bhne", weights, v), mask)


def _real_positions(mask, u):
  """Positions of real tokens picked by ``u [L]`` in [0, 1): the ``floor(u count)``-th real
  token of each row of ``mask [b, n]``; ``int32[b, L]``."""
  order = jnp.argsort(~mask, axis=-1, stable=True)  # real tokens first, in order
  count = mask.sum(-1, keepdims=True)
  rank = jnp.clip(jnp.floor(u[None, :] * count).astype(jnp.int32), 0, jnp.maximum(count - 1, 0))
  return jnp.take_along_axis(order, rank, axis=-1)


def skyformer_attention(q, k, v, mask=None, *, landmark_u=None, num_landmarks: int = 128,
                        ridge: float = 0.1, inverse: str = "iterative",
                        num_iterations: int = 6):
  """Skyformer attention (module doc).

  ``landmark_u float[L]`` in [0, 1) picks the landmarks: its first half real queries, its
  second half real keys (``_real_positions``); None uses ``num_landmarks`` evenly spaced ones.
  """
  q, k, v, mask = _check(q, k, v, mask)
  if landmark_u is None:
    half = max(1, num_landmarks // 2)
    grid = (jnp.arange(half, dtype=jnp.float32) + 0.5) / half
    landmark_u = jnp.concatenate([grid, grid])
  landmark_u = _f32(landmark_u)
  half = landmark_u.shape[0] // 2
  scale = q.shape[-1] ** -0.25
  x, y = q * scale, k * scale
  take = lambda t, pos: jnp.take_along_axis(t, pos[:, None, :, None], axis=2)
  z = jnp.concatenate([take(x, _real_positions(mask, landmark_u[:half])),
                       take(y, _real_positions(mask, landmark_u[half:]))], axis=2)
  core = _gaussian(z, z) + ridge * jnp.eye(z.shape[2], dtype=jnp.float32)
  # symmetric row-sum preconditioning: pinv(C) = D^-1/2 pinv(D^-1/2 C D^-1/2) D^-1/2
  dinv = jax.lax.rsqrt(jnp.maximum(core.sum(-1), 1e-30))
  inv = _pinv(core * dinv[..., :, None] * dinv[..., None, :], inverse, num_iterations)
  inv = inv * dinv[..., :, None] * dinv[..., None, :]
  ky = _gaussian(y, z) * mask[:, None, :, None]  # [b, h, n, L]
  context = _mm("bhlm,bhme->bhle", inv, _mm("bhnm,bhne->bhme", ky, v))
  return _out(_mm("bhnl,bhle->bhne", _gaussian(x, z), context), mask)


# ----------------------------------------------------------------------------- Linformer


def linformer_attention(q, k, v, mask=None, *, e_proj, f_proj):
  """Linformer attention (module doc) with projections ``e_proj, f_proj [k_proj, n]``."""
  q, k, v, mask = _check(q, k, v, mask)
  n = q.shape[-2]
  if e_proj.shape != f_proj.shape or e_proj.ndim != 2 or e_proj.shape[1] != n:
    raise ValueError(f"e_proj and f_proj must both be [k_proj, n={n}], got "
                     f"{tuple(e_proj.shape)} and {tuple(f_proj.shape)}.")
  real = mask[:, None, :, None]
  kp = _mm("rn,bhnd->bhrd", _f32(e_proj), jnp.where(real, k, 0.0))
  vp = _mm("rn,bhnd->bhrd", _f32(f_proj), jnp.where(real, v, 0.0))
  slots = _mm("rn,bn->br", jnp.abs(_f32(e_proj)), mask.astype(jnp.float32)) > 0
  w = _softmax(_mm("bhnd,bhrd->bhnr", q, kp) / math.sqrt(q.shape[-1]), slots[:, None, None, :])
  return _out(_mm("bhnr,bhre->bhne", w, vp), mask)


# ----------------------------------------------------------------------------- BigBird


def bigbird_block_ids(num_blocks: int, random_blocks):
  """Key-block ids seen by each query block, ``int32[nb, 5 + r]``: window ``i-1, i, i+1``
  (clipped), global ``0, nb-1``, then ``random_blocks [nb, r]``; and a bool ``[nb, 5 + r]``
  marking the first occurrence of each id (duplicates are not attended twice)."""
  i = jnp.arange(num_blocks)[:, None]
  ids = jnp.concatenate([jnp.clip(i + jnp.arange(-1, 2)[None], 0, num_blocks - 1),
                         jnp.broadcast_to(jnp.array([0, num_blocks - 1]), (num_blocks, 2)),
                         jnp.asarray(random_blocks, jnp.int32) % num_blocks], axis=1)
  same = ids[:, :, None] == ids[:, None, :]
  earlier = jnp.tril(jnp.ones((ids.shape[1],) * 2, bool), -1)
  first = ~jnp.any(same & earlier[None], axis=-1)
  return ids.astype(jnp.int32), first


def bigbird_attention(q, k, v, mask=None, *, block_size: int = 64, random_blocks=None):
  """BigBird attention (module doc).  ``random_blocks int[nb, r]`` (``nb = ceil(n / b)``) are
  the random key blocks of each query block (None: no random blocks)."""
  q, k, v, mask = _check(q, k, v, mask)
  b, h, n, d = q.shape
  nb = -(-n // block_size)
  if random_blocks is None:
    random_blocks = jnp.zeros((nb, 0), jnp.int32)
  if random_blocks.shape[0] != nb:
    raise ValueError(f"random_blocks must be int[num_blocks={nb}, r], got "
                     f"{tuple(random_blocks.shape)}.")
  total = nb * block_size
  qp, kp, vp = (_pad_to(t, total, 2) for t in (q, k, v))
  mp = _pad_to(mask, total, 1, False)
  ids, first = bigbird_block_ids(nb, random_blocks)
  width = ids.shape[1] * block_size
  kb = kp.reshape(b, h, nb, block_size, d)[:, :, ids].reshape(b, h, nb, width, d)
  vb = vp.reshape(b, h, nb, block_size, -1)[:, :, ids].reshape(b, h, nb, width, vp.shape[-1])
  allowed = (mp.reshape(b, nb, block_size)[:, ids]
             & first[None, :, :, None]).reshape(b, nb, width)
  qb = qp.reshape(b, h, nb, block_size, d)
  scale = 1.0 / math.sqrt(d)
  w = _softmax(_mm("bhiqd,bhikd->bhiqk", qb, kb) * scale, allowed[:, None, :, None, :])
  out = _mm("bhiqk,bhike->bhiqe", w, vb).reshape(b, h, total, -1)
  # the global query blocks (first and last) attend to every key
  glob = jnp.concatenate([qb[:, :, 0], qb[:, :, nb - 1]], axis=2)
  wg = _softmax(_mm("bhqd,bhkd->bhqk", glob, kp) * scale, mp[:, None, None, :])
  outg = _mm("bhqk,bhke->bhqe", wg, vp)
  out = out.at[:, :, :block_size].set(outg[:, :, :block_size])
  out = out.at[:, :, total - block_size:].set(outg[:, :, block_size:])
  return _out(out[:, :, :n], mask)


# ----------------------------------------------------------------------------- Reformer


def reformer_num_buckets(n: int, chunk_size: int) -> int:
  """``2 ceil(n / chunk_size)`` buckets (even, at least 2), as the Reformer's default."""
  return 2 * max(1, -(-n // chunk_size))


def lsh_buckets(x, rotations):
  """Angular LSH ``argmax [x R, -x R]`` of ``x [b, h, n, d]`` for ``rotations [d, nbk/2]``:
  ``int32[b, h, n]`` in ``[0, nbk)``."""
  proj = _mm("bhnd,dr->bhnr", x, _f32(rotations))
  return jnp.argmax(jnp.concatenate([proj, -proj], -1), axis=-1).astype(jnp.int32)


def _lsh_round(q, keys, v, mask, rotations, chunk_size):
  """One hash round: ``(out [b, h, n, dv], logsumexp [b, h, n])`` in original order."""
  b, h, n, d = q.shape
  nbk = 2 * rotations.shape[-1]
  bucket = jnp.where(mask[:, None, :], lsh_buckets(q, rotations), nbk)  # padding sorts last
  pos = jnp.arange(n)
  perm = jnp.argsort(bucket * n + pos[None, None], axis=-1)
  take = lambda t: jnp.take_along_axis(t, perm[..., None], axis=2)
  sq, sk, sv = take(q), take(keys), take(v)
  sb = jnp.take_along_axis(bucket, perm, axis=-1)
  nc = n // chunk_size
  chunk = lambda t: t.reshape((b, h, nc, chunk_size) + t.shape[3:])
  look = lambda t: jnp.concatenate([t, jnp.roll(t, 1, axis=2)], axis=3)  # self + previous chunk
  cq, cb, cp = chunk(sq), chunk(sb), chunk(perm)
  kk, kv, kb, kp = look(chunk(sk)), look(chunk(sv)), look(cb), look(cp)
  logits = _mm("bhcid,bhcjd->bhcij", cq, kk) / math.sqrt(d)
  allowed = (cb[..., :, None] == kb[..., None, :]) & (kb[..., None, :] < nbk)
  others = allowed & (cp[..., :, None] != kp[..., None, :])
  alone = ~jnp.any(others, axis=-1)
  allowed = jnp.where(alone[..., None], allowed, others)
  logits = jnp.where(allowed, logits, -jnp.inf)
  lse = jax.nn.logsumexp(logits, axis=-1)
  w = jnp.where(allowed, jnp.exp(logits - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
  lse = lse - SELF_PENALTY * alone  # a round that found only the token itself barely counts
  out = _mm("bhcij,bhcje->bhcie", w, kv).reshape(b, h, n, -1)
  inv = jnp.argsort(perm, axis=-1)
  return (jnp.take_along_axis(out, inv[..., None], axis=2),
          jnp.take_along_axis(lse.reshape(b, h, n), inv, axis=-1))


def reformer_attention(q, k, v, mask=None, *, rotations, chunk_size: int = 64):
  """Reformer LSH attention (module doc), shared QK: ``k`` is ignored (keys are the
  normalised queries).  ``rotations [n_hashes, d, n_buckets / 2]``."""
  del k
  q, _, v, mask = _check(q, q, v, mask)
  n = q.shape[-2]
  c = min(chunk_size, n)
  total = -(-n // c) * c
  qp, vp = _pad_to(q, total, 2), _pad_to(v, total, 2)
  mp = _pad_to(mask, total, 1, False)
  keys = qp * jax.lax.rsqrt(jnp.maximum(jnp.sum(qp * qp, -1, keepdims=True), 1e-12))
  outs, lses = zip(*[_lsh_round(qp, keys, vp, mp, rotations[r], c)
                     for r in range(rotations.shape[0])])
  lse = jnp.stack(lses)  # [R, b, h, n]
  top = jnp.max(lse, axis=0)
  top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
  wr = jnp.where(jnp.isfinite(lse), jnp.exp(lse - top), 0.0)
  wr = wr / jnp.maximum(wr.sum(0), 1e-30)
  out = jnp.einsum("rbhn,rbhne->bhne", wr, jnp.stack(outs))
  return _out(out[:, :, :n], mask)


# ----------------------------------------------------------------------------- Informer


def informer_top(n: int, factor: int) -> int:
  """``factor * ceil(ln n)`` capped at ``n``: Informer's number of active queries and of
  sampled keys per query."""
  return min(n, factor * max(1, math.ceil(math.log(max(n, 2)))))


def informer_attention(q, k, v, mask=None, *, key_samples, factor: int = 5):
  """Informer ProbSparse attention (module doc); ``key_samples int[n, U]`` are the sampled
  key positions of each query."""
  q, k, v, mask = _check(q, k, v, mask)
  b, h, n, d = q.shape
  scale = 1.0 / math.sqrt(d)
  ks = k[:, :, key_samples]  # [b, h, n, U, d]
  sampled = _mm("bhnd,bhnud->bhnu", q, ks) * scale
  real = mask[:, key_samples][:, None]  # [b, 1, n, U]
  cnt = real.sum(-1)
  top = jnp.max(jnp.where(real, sampled, -jnp.inf), axis=-1)
  mean = jnp.where(real, sampled, 0.0).sum(-1) / jnp.maximum(cnt, 1)
  sparsity = jnp.where(mask[:, None, :] & (cnt > 0), top - mean, -jnp.inf)
  _, idx = jax.lax.top_k(jax.lax.stop_gradient(sparsity), informer_top(n, factor))
  qa = jnp.take_along_axis(q, idx[..., None], axis=2)
  w = _softmax(_mm("bhud,bhnd->bhun", qa, k) * scale, mask[:, None, None, :])
  active = _mm("bhun,bhne->bhue", w, v)
  real_v = mask[:, None, :, None]
  lazy = jnp.where(real_v, v, 0.0).sum(2, keepdims=True) / jnp.maximum(
      real_v.sum(2, keepdims=True), 1)
  out = jnp.broadcast_to(lazy, (b, h, n, v.shape[-1]))
  bi, hi = jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None]
  return _out(out.at[bi, hi, idx].set(active), mask)


# ----------------------------------------------------------------------------- Flax layer


def _draw_random_state(kind: str, key, n: int, head_dim: int, *, num_landmarks: int,
                       block_size: int, num_random_blocks: int, num_hashes: int,
                       chunk_size: int, factor: int) -> dict[str, Any]:
  """The random state of a baseline for length ``n`` (empty for deterministic ones)."""
  if kind == "skyformer":
    half = max(1, num_landmarks // 2)
    return {"landmark_u": jax.random.uniform(key, (2 * half,))}
  if kind == "bigbird":
    nb = -(-n // block_size)
    return {"random_blocks": jax.random.randint(key, (nb, num_random_blocks), 0, nb)}
  if kind == "reformer":
    nbk = reformer_num_buckets(n, min(chunk_size, n))
    return {"rotations": jax.random.normal(key, (num_hashes, head_dim, nbk // 2))}
  if kind == "informer":
    return {"key_samples": jax.random.randint(key, (n, informer_top(n, factor)), 0, n)}
  return {}


class BaselineSelfAttention(nn.Module):
  """Multi-head self-attention with one of the baselines (``kind`` in ``KINDS``).

  The same ``query/key/value/out`` projections (names and shapes) as
  ``layers.RFMultiHeadDotProductAttention``, the same key dropout on the values, and the same
  call with a padding mask ``kv_mask [batch, n]`` (used for keys and queries).  Linformer's
  ``E, F [k, n]`` are parameters (``linformer_e``, ``linformer_f``, initialised
  ``N(0, 1/k)``); random parts live in the ``"random_features"`` collection (drawn at init from
  the ``"features"`` stream, else ``"params"``).  Reformer has no key projection (shared QK).
  """
  kind: str
  num_heads: int
  qkv_features: Optional[int] = None
  out_features: Optional[int] = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  dropout_rate: float = 0.0
  broadcast_dropout: bool = True
  deterministic: Optional[bool] = None
  kernel_init: Callable = layers.default_kernel_init
  bias_init: Callable = nn.initializers.zeros_init()
  use_bias: bool = True
  num_landmarks: int = 128
  linformer_k: int = 256
  block_size: int = 64
  num_random_blocks: int = 3
  num_hashes: int = 2
  lsh_chunk_size: int = 64
  informer_factor: int = 5
  ridge: float = 0.1

  def _random_state(self, n, head_dim):
    def init():
      key = (self.make_rng(layers.FEATURES_STREAM) if self.has_rng(layers.FEATURES_STREAM)
             else self.make_rng("params"))
      return _draw_random_state(self.kind, key, n, head_dim, num_landmarks=self.num_landmarks,
                                block_size=self.block_size,
                                num_random_blocks=self.num_random_blocks,
                                num_hashes=self.num_hashes, chunk_size=self.lsh_chunk_size,
                                factor=self.informer_factor)
    return self.variable(layers.RF_COLLECTION, "state", init).value

  def _attend(self, q, k, v, mask, state):
    n = q.shape[1]
    if self.kind == "nystrom":
      return nystrom_attention(q, k, v, mask, num_landmarks=self.num_landmarks)
    if self.kind == "skyformer":
      return skyformer_attention(q, k, v, mask, landmark_u=state["landmark_u"], ridge=self.ridge)
    if self.kind == "kernelized":
      return kernelized_attention(q, k, v, mask)
    if self.kind == "linformer":
      kp = min(self.linformer_k, n)
      init = nn.initializers.normal(stddev=1.0 / math.sqrt(kp))
      e = self.param("linformer_e", init, (kp, n), self.param_dtype)
      f = self.param("linformer_f", init, (kp, n), self.param_dtype)
      return linformer_attention(q, k, v, mask, e_proj=e, f_proj=f)
    if self.kind == "bigbird":
      return bigbird_attention(q, k, v, mask, block_size=self.block_size,
                               random_blocks=state["random_blocks"])
    if self.kind == "reformer":
      return reformer_attention(q, None, v, mask, rotations=state["rotations"],
                                chunk_size=self.lsh_chunk_size)
    return informer_attention(q, k, v, mask, key_samples=state["key_samples"],
                              factor=self.informer_factor)

  @nn.compact
  def __call__(self, inputs, *, kv_mask=None, deterministic=None, dropout_rng=None):
    """``inputs [batch, n, features]``, ``kv_mask bool[batch, n]`` -> ``[batch, n, out]``."""
    if self.kind not in KINDS:
      raise ValueError(f"kind={self.kind!r} is unknown; choose one of {tuple(KINDS)}.")
    features = self.out_features or inputs.shape[-1]
    qkv_features = self.qkv_features or inputs.shape[-1]
    if qkv_features % self.num_heads:
      raise ValueError(f"qkv_features ({qkv_features}) must be divisible by num_heads "
                       f"({self.num_heads}).")
    head_dim = qkv_features // self.num_heads
    dense = lambda name: nn.DenseGeneral(
        features=(self.num_heads, head_dim), axis=-1, dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=self.kernel_init, bias_init=self.bias_init,
        use_bias=self.use_bias, name=name)
    query, value = dense("query")(inputs), dense("value")(inputs)
    key = query if self.kind == "reformer" else dense("key")(inputs)
    if self.dropout_rate > 0.0:
      det = nn.merge_param("deterministic", self.deterministic, deterministic)
      if not det:
        rng = dropout_rng if dropout_rng is not None else self.make_rng("dropout")
        value = attn.key_dropout(value, rng, self.dropout_rate, self.broadcast_dropout)
    state = self._random_state(inputs.shape[1], head_dim)
    out = self._attend(query, key, value, kv_mask, state)
    out = out.astype(self.dtype or query.dtype)
    return nn.DenseGeneral(features=features, axis=(-2, -1), kernel_init=self.kernel_init,
                           bias_init=self.bias_init, use_bias=self.use_bias, dtype=self.dtype,
                           param_dtype=self.param_dtype, name="out")(out)


def study_hyperparameters(kind: str) -> dict[str, Any]:
  """``{field: study value}`` of the ``BaselineSelfAttention`` fields that ``kind`` uses."""
  if kind not in KINDS:
    raise ValueError(f"Unknown baseline {kind!r}. Valid baselines: {', '.join(sorted(KINDS))}.")
  return {f: getattr(BaselineSelfAttention, f) for f in HYPERPARAMETERS[kind]}
