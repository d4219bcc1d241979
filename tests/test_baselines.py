"""The efficient-attention baselines against exact references on small inputs, padding, the
Flax layer, and training ListOps from each baseline's config."""

import functools
import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectraformer_jax import attention as A
from spectraformer_jax import baselines as B

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB, N, H, D = 2, 12, 2, 8


def _inputs(seed=0, n=N, scale=0.8):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (NB, n, H, D)) * scale
  k = jax.random.normal(ks[1], (NB, n, H, D)) * scale
  v = jax.random.normal(ks[2], (NB, n, H, D))
  mask = jnp.arange(n)[None, :] < jnp.array([[n], [n - 5]])
  return q, k, v, mask


@jax.jit
def _softmax_ref(q, k, v, mask):
  return A.softmax_attention(q, k, v, kv_mask=mask, q_mask=mask, precision="highest")


def _jit(fn, **kwargs):
  """``fn`` jitted with its keyword hyperparameters bound (one compile, not op by op)."""
  return jax.jit(functools.partial(fn, **kwargs))


def _close(a, b, tol=1e-4):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol)


def test_nystrom_with_one_landmark_per_token_is_softmax():
  q, k, v, mask = _inputs()
  out = _jit(B.nystrom_attention, num_landmarks=N, inverse="pinv")(q, k, v, mask)
  _close(out, _softmax_ref(q, k, v, mask))


def test_iterative_pinv_converges_to_pinv():
  a = jax.nn.softmax(jax.random.normal(jax.random.key(3), (2, 6, 6)) + 3 * jnp.eye(6), -1)
  _close(jax.jit(B.iterative_pinv, static_argnums=1)(a, 12), jnp.linalg.pinv(a), 1e-4)


def test_linformer_with_identity_projections_is_softmax():
  q, k, v, mask = _inputs()
  eye = jnp.eye(N)
  _close(B.linformer_attention(q, k, v, mask, e_proj=eye, f_proj=eye), _softmax_ref(q, k, v, mask))


def test_bigbird_with_one_block_is_softmax():
  q, k, v, mask = _inputs()
  rnd = jnp.zeros((1, 3), jnp.int32)
  _close(_jit(B.bigbird_attention, block_size=16)(q, k, v, mask, random_blocks=rnd),
         _softmax_ref(q, k, v, mask))


def test_bigbird_small_blocks_follow_the_sparsity_pattern():
  """Block 2, 6 blocks, one random block each: equals softmax restricted to the documented
  pattern (window |i - j| <= 1, global first/last blocks both ways, the random block)."""
  q, k, v, mask = _inputs()
  bs, nb = 2, N // 2
  rnd = jax.random.randint(jax.random.key(5), (nb, 1), 0, nb)
  blk = np.arange(N) // bs
  rows, cols = blk[:, None], blk[None, :]
  allowed = ((np.abs(rows - cols) <= 1) | (cols == 0) | (cols == nb - 1) | (rows == 0)
             | (rows == nb - 1) | (np.asarray(rnd)[rows, 0] == cols))
  allowed = jnp.asarray(allowed)[None, None] & mask[:, None, None, :]
  ref = jnp.where(mask[:, :, None, None], A.masked_softmax_attention(q, k, v, allowed), 0)
  _close(_jit(B.bigbird_attention, block_size=bs)(q, k, v, mask, random_blocks=rnd), ref)


def test_informer_with_every_query_active_is_softmax():
  q, k, v, mask = _inputs()
  samples = jax.random.randint(jax.random.key(1), (N, 4), 0, N)
  _close(_jit(B.informer_attention, factor=N)(q, k, v, mask, key_samples=samples),
         _softmax_ref(q, k, v, mask))


def test_informer_lazy_queries_output_the_mean_value():
  q, k, v, mask = _inputs(n=32)
  samples = jax.random.randint(jax.random.key(1), (32, 4), 0, 32)
  out = np.asarray(_jit(B.informer_attention, factor=1)(q, k, v, mask, key_samples=samples))
  full = np.asarray(_softmax_ref(q, k, v, mask))
  m = np.asarray(mask)
  for b in range(NB):
    mean = np.asarray(v)[b][m[b]].mean(0)  # [H, D]
    for h in range(H):
      real = np.where(m[b])[0]
      lazy = [i for i in real if not np.allclose(out[b, i, h], full[b, i, h], atol=1e-5)]
      active = len(real) - len(lazy)
      assert active <= B.informer_top(32, 1)
      for i in lazy:
        _close(out[b, i, h], mean[h], 1e-5)


def test_kernelized_matches_the_gaussian_kernel_sum():
  q, k, v, mask = _inputs()
  x, y = np.asarray(q, np.float64) * D ** -0.25, np.asarray(k, np.float64) * D ** -0.25
  m = np.asarray(mask)
  ref = np.zeros(v.shape)
  for b in range(NB):
    for h in range(H):
      for i in range(N):
        if not m[b, i]:
          continue
        for j in range(N):
          if m[b, j]:
            ref[b, i, h] += math.exp(-0.5 * np.sum((x[b, i, h] - y[b, j, h]) ** 2)) * np.asarray(
                v, np.float64)[b, j, h]
  _close(B.kernelized_attention(q, k, v, mask), ref)


def test_skyformer_with_every_token_a_landmark_is_kernelized():
  q, k, v, _ = _inputs(scale=0.5)
  u = (jnp.arange(N) + 0.5) / N
  out = _jit(B.skyformer_attention, ridge=0.0, inverse="pinv")(
      q, k, v, None, landmark_u=jnp.concatenate([u, u]))
  _close(out, B.kernelized_attention(q, k, v, None), 2e-3)


def test_reformer_with_one_chunk_is_softmax_within_buckets():
  q, _, v, mask = _inputs()
  rot = jax.random.normal(jax.random.key(2), (1, D, 2))
  out = _jit(B.reformer_attention, chunk_size=N)(q, None, v, mask, rotations=rot)
  keys = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
  bucket = B.lsh_buckets(A.to_heads(q), rot[0])  # [b, h, n]
  same = (bucket[..., :, None] == bucket[..., None, :]) & mask[:, None, None, :]
  others = same & ~jnp.eye(N, dtype=bool)
  allowed = jnp.where(others.any(-1, keepdims=True), others, same)
  ref = jnp.where(mask[:, :, None, None],
                  jax.jit(A.masked_softmax_attention)(q, keys, v, allowed), 0)
  _close(out, ref)


def _layer_fns():
  """(name, fn(q, k, v, mask)) for every baseline with small hyperparameters."""
  key = jax.random.key(7)
  return {
      "nystrom": lambda q, k, v, m: B.nystrom_attention(q, k, v, m, num_landmarks=4),
      "skyformer": lambda q, k, v, m: B.skyformer_attention(
          q, k, v, m, landmark_u=jax.random.uniform(key, (6,))),
      "kernelized": B.kernelized_attention,
      "bigbird": lambda q, k, v, m: B.bigbird_attention(
          q, k, v, m, block_size=4, random_blocks=jax.random.randint(key, (4, 1), 0, 4)),
      "reformer": lambda q, k, v, m: B.reformer_attention(
          q, k, v, m, rotations=jax.random.normal(key, (2, D, 2)), chunk_size=4),
      "informer": lambda q, k, v, m: B.informer_attention(
          q, k, v, m, key_samples=jax.random.randint(key, (16, 6), 0, 16), factor=2),
  }


@pytest.mark.parametrize("kind", sorted(_layer_fns()))
def test_padded_positions_have_no_influence(kind):
  """Outputs at real positions ignore the values at padded positions (Linformer: covered by
  the identity test, since its projections mix positions by design)."""
  fn = jax.jit(_layer_fns()[kind])
  q, k, v, mask = _inputs(n=16)
  noise = jax.random.normal(jax.random.key(9), q.shape) * 3
  pad = ~mask[:, :, None, None]
  out1 = fn(q, k, v, mask)
  out2 = fn(jnp.where(pad, noise, q), jnp.where(pad, noise, k), jnp.where(pad, -noise, v), mask)
  assert np.all(np.isfinite(np.asarray(out1)))
  _close(out1, out2, 1e-5)
  assert np.all(np.asarray(out1)[~np.asarray(mask)] == 0)


def _load_config(name):
  path = os.path.join(ROOT, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


STUDY = {"nystrom": {"num_landmarks": 128}, "skyformer": {"num_landmarks": 128},
         "linformer": {"linformer_k": 256}, "bigbird": {"block_size": 64, "num_random_blocks": 3},
         "reformer": {"num_hashes": 2}, "informer": {"informer_factor": 5}, "kernelized": {}}


@pytest.mark.parametrize("task", ["listops", "text", "retrieval", "image", "pathfinder"])
def test_configs_carry_the_study_hyperparameters(task):
  for kind, hyper in STUDY.items():
    config = _load_config(f"{task}_{kind}")
    assert config.task == task and config.model.attention == kind
    for field, value in hyper.items():
      assert config.model[field] == value, (task, kind, field)


@pytest.mark.parametrize("kind", sorted(STUDY))
def test_baseline_trains_listops_from_its_config(tmp_path, listops_dir, kind):
  """10 steps of the baseline from configs/listops_<kind>.py (sizes reduced): finite training
  losses, a checkpoint and a test accuracy (compiling dominates, so more steps add nothing)."""
  from lra_benchmarks import train_lib  # pylint: disable=import-outside-toplevel
  config = _load_config(f"listops_{kind}")
  for field, value in {"seq_len": 64, "max_length": 64, "data_dir": listops_dir,
                       "batch_size": 8, "num_train_steps": 10, "eval_every": 10,
                       "checkpoint_every": 10, "log_every": 1, "num_eval_steps": 1,
                       "warmup_steps": 5, "progress_bar": False}.items():
    config[field] = value
  for field, value in {"num_layers": 1, "emb_dim": 16, "qkv_dim": 16, "mlp_dim": 32,
                       "classifier_dim": 16}.items():
    config.model[field] = value
  workdir = tmp_path / kind
  results = train_lib.train_and_evaluate(config, str(workdir))
  assert results["steps"] == 10
  assert results["test_accuracy"] is not None and 0.0 <= results["test_accuracy"] <= 1.0
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    losses = [row["loss"] for row in map(json.loads, f) if row["split"] == "train"]
  assert len(losses) == 10 and np.all(np.isfinite(losses)), losses
  assert os.listdir(workdir / "checkpoints") == ["10"]
