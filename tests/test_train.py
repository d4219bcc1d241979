"""The trainer: loss falls, kill-and-resume, 8 devices == 1 device, CLI, clear errors."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import base_listops
from lra_benchmarks import train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A few steps of a tiny model: fields set on top of configs/base_listops.py.
TINY = {
    "max_length": 64, "seq_len": 64, "batch_size": 16, "num_train_steps": 24,
    "eval_every": 8, "checkpoint_every": 8, "log_every": 1, "num_eval_steps": -1,
    "learning_rate": 3e-3, "warmup_steps": 4, "progress_bar": False,
    "model.num_layers": 1, "model.emb_dim": 16, "model.qkv_dim": 16, "model.mlp_dim": 32,
    "model.classifier_dim": 16, "model.num_features": 16,
}


def tiny_config(**overrides):
  config = base_listops.get_config()
  for key, value in {**TINY, **overrides}.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def learnable_arrays(n, seed, length=64):
  """A task a tiny model learns in a few steps: the label is the token that fills the even
  positions (minus one), with noise tokens and padding elsewhere."""
  rng = np.random.default_rng(seed)
  targets = rng.integers(0, 10, n).astype(np.int32)
  inputs = rng.integers(11, 17, (n, length)).astype(np.int32)
  inputs[:, ::2] = targets[:, None] + 1
  lengths = rng.integers(length // 2, length + 1, n)
  inputs[np.arange(length)[None] >= lengths[:, None]] = 0
  return {"inputs": inputs, "targets": targets}


DATASETS = {"train": learnable_arrays(256, 0), "validation": learnable_arrays(48, 1),
            "test": learnable_arrays(48, 2)}


def read_metrics(workdir, split="train"):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if r["split"] == split]


def test_trains_loss_falls_and_kill_and_resume_equals_uninterrupted_run(tmp_path):
  """A tiny Spectraformer model learns; a run "killed" after its step-12 checkpoint and resumed
  ends with the same parameters (and losses) as an uninterrupted run. W is redrawn every 5
  steps, so the random-feature state must resume too."""
  config = tiny_config(**{"model.attention": "spectraformer", "model.component": "posrf",
                          "model.weight": "qmc", "model.redraw_every": 5})
  straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
  results = train_lib.train_and_evaluate(config, straight, datasets=DATASETS)
  losses = [r["loss"] for r in read_metrics(straight)]
  assert len(losses) == 24
  assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])
  for key in ("test_accuracy", "train_wall_time_s", "steps_per_second", "peak_memory_bytes",
              "peak_memory_source", "param_count", "config"):
    assert results[key] is not None, key
  assert results["config"]["model"]["weight"] == "qmc" and results["steps"] == 24
  with open(os.path.join(straight, "results.json"), encoding="utf-8") as f:
    assert json.load(f)["test_accuracy"] == results["test_accuracy"]
  assert os.listdir(os.path.join(straight, "tensorboard"))

  partial = train_lib.train_and_evaluate(config, interrupted, datasets=DATASETS, stop_at_step=12)
  assert partial == {}  # "killed" after the step-12 checkpoint: no test yet
  assert not os.path.exists(os.path.join(interrupted, "results.json"))
  resumed = train_lib.train_and_evaluate(config, interrupted, datasets=DATASETS)
  assert resumed["steps"] == 24
  a, b = train_lib.final_params(straight), train_lib.final_params(interrupted)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  # The resumed run continued at step 13: its log holds steps 13..24 after 1..12.
  assert [r["step"] for r in read_metrics(interrupted)] == list(range(1, 25))
  assert [r["loss"] for r in read_metrics(interrupted)] == losses
  assert resumed["test_accuracy"] == results["test_accuracy"]


def test_resume_after_kill_between_best_and_latest_checkpoint(tmp_path):
  """A run killed after saving a best checkpoint but before the latest checkpoint of that step
  re-evaluates the step on resume: the best checkpoint is replaced, not a StepAlreadyExists."""
  config = tiny_config(eval_every=4, checkpoint_every=8)
  workdir = str(tmp_path / "run")
  train_lib.train_and_evaluate(config, workdir, datasets=DATASETS, stop_at_step=12)
  (best,) = os.listdir(os.path.join(workdir, "best"))
  for step in os.listdir(os.path.join(workdir, "checkpoints")):  # the kill: latest < best
    if int(step) >= int(best):
      shutil.rmtree(os.path.join(workdir, "checkpoints", step))
  resumed = train_lib.train_and_evaluate(config, workdir, datasets=DATASETS)
  assert resumed["steps"] == 24
  assert os.listdir(os.path.join(workdir, "best")) == [str(resumed["best_step"])]


def test_cli_on_eight_devices_matches_one_device(tmp_path, listops_dir):
  """The CLI in a subprocess with 8 fake CPU devices writes results.json, and its losses equal
  an in-process run's (one device in CI) within float tolerance."""
  overrides = {**TINY, "num_train_steps": 6, "eval_every": 3, "checkpoint_every": 3}
  workdir = str(tmp_path / "cli")
  cmd = [sys.executable, "-m", "lra_benchmarks.train",
         f"--config={os.path.join(ROOT, 'configs', 'listops_softmax.py')}",
         f"--workdir={workdir}", f"--config.data_dir={listops_dir}"]
  cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
  pythonpath = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": pythonpath,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
    results = json.load(f)
  assert results["devices"] == 8
  assert 0.0 <= results["test_accuracy"] <= 1.0 and results["test_examples"] == 40

  reference = str(tmp_path / "reference")
  config = tiny_config(**{"data_dir": listops_dir, "model.attention": "softmax",
                          "num_train_steps": 6, "eval_every": 3, "checkpoint_every": 3})
  expected = train_lib.train_and_evaluate(config, reference)
  np.testing.assert_allclose([r["loss"] for r in read_metrics(workdir)],
                             [r["loss"] for r in read_metrics(reference)], rtol=2e-5, atol=2e-5)
  assert results["test_accuracy"] == pytest.approx(expected["test_accuracy"], abs=1e-6)


@pytest.mark.parametrize("field,value,match", [
    ("schedule", "cosine", "config.schedule"),
    ("batch_size", 0, "config.batch_size"),
    ("num_eval_steps", 0, "config.num_eval_steps"),
    ("seq_len", 32, "config.seq_len"),
    ("model.pooling", "max", "config.model.pooling"),
    ("model.weight", "nope", "nope"),
])
def test_bad_config_values_are_clear_errors(tmp_path, field, value, match):
  config = tiny_config(**{field: value, "model.attention": "spectraformer"})
  with pytest.raises(ValueError, match=match):
    train_lib.train_and_evaluate(config, str(tmp_path), datasets=DATASETS)


def test_batch_not_divisible_by_devices_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "device_count", lambda: 8)
  with pytest.raises(ValueError, match=r"config.batch_size=12 does not divide by the number "
                     r"of devices \(8\)"):
    train_lib.train_and_evaluate(tiny_config(batch_size=12), str(tmp_path), datasets=DATASETS)


def test_learning_rate_schedules():
  config = tiny_config(learning_rate=1e-3, warmup_steps=10, num_train_steps=110)
  linear = train_lib.learning_rate_schedule(config)
  assert float(linear(0)) == pytest.approx(1e-3 / 25, rel=1e-5)
  assert float(linear(10)) == pytest.approx(1e-3, rel=1e-5)
  assert float(linear(60)) == pytest.approx((1e-3 + 1e-3 / 25 / 1e4) / 2, rel=1e-4)
  assert float(linear(110)) == pytest.approx(1e-3 / 25 / 1e4, rel=1e-4)
  config.schedule = "rsqrt"
  rsqrt = train_lib.learning_rate_schedule(config)
  assert float(rsqrt(5)) == pytest.approx(1e-3 * 0.5 / np.sqrt(10), rel=1e-5)
  assert float(rsqrt(40)) == pytest.approx(1e-3 / np.sqrt(40), rel=1e-5)
