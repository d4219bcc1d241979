"""The trainer: loss falls, kill-and-resume, 8 devices == 1 device, CLI, clear errors,
larger budgets continue, corrupt checkpoints fall back, stop requests save, protocols."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import truncate_checkpoint_data
from configs import base_listops
from lra_benchmarks import train_lib
from lra_benchmarks.training import interrupts
from lra_benchmarks.training import workdir as workdir_lib

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


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # no noise
def test_larger_budget_continues_past_a_corrupt_checkpoint_and_results_agree(tmp_path, capsys):
  """A finished 8-step run rerun with 16 steps trains 8 more (here from step 4: the step-8
  checkpoint is truncated, which costs one line); results.json says 16 steps and the config
  that ran. A rerun of the finished run trains nothing; another model is refused. (The rsqrt
  schedule does not depend on the budget: both budgets run one compiled train step.)"""
  workdir = str(tmp_path / "run")
  config = tiny_config(num_train_steps=8, eval_every=4, checkpoint_every=4, schedule="rsqrt")
  assert train_lib.train_and_evaluate(config, workdir, datasets=DATASETS)["steps"] == 8
  truncate_checkpoint_data(os.path.join(workdir, "checkpoints", "8"))
  capsys.readouterr()
  config.num_train_steps = 16
  results = train_lib.train_and_evaluate(config, workdir, datasets=DATASETS)
  out = capsys.readouterr().out
  unreadable = [line for line in out.splitlines() if "unreadable" in line]
  assert len(unreadable) == 1 and os.path.join(workdir, "checkpoints", "8") in unreadable[0]
  assert "Resumed from" in out and out.index("unreadable") < out.index("Resumed from")
  assert results["steps"] == 16 and results["config"]["num_train_steps"] == 16
  with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
    stored = json.load(f)
  assert stored["steps"] == stored["config"]["num_train_steps"] == 16
  assert [r["step"] for r in read_metrics(workdir)][-12:] == list(range(5, 17))
  assert train_lib.train_and_evaluate(config, workdir, datasets=DATASETS) == stored
  other = tiny_config(num_train_steps=16, schedule="rsqrt", **{"model.num_features": 8})
  with pytest.raises(workdir_lib.WorkdirError, match="model.num_features"):
    train_lib.train_and_evaluate(other, workdir, datasets=DATASETS)


class StopAfter(interrupts.StopRequest):
  """A stop request that arrives (as SIGTERM) after ``polls`` polls."""

  def __init__(self, polls):
    super().__init__(say=lambda m: None)
    self._polls = polls

  @property
  def requested(self):
    self._polls -= 1
    if self._polls < 0 and self.signum is None:
      self.signum = signal.SIGTERM
    return self.signum is not None


def test_stop_request_saves_a_resumable_checkpoint_heldout_protocol_and_eval_only(tmp_path):
  """A stop mid-run checkpoints the step it reached and raises Interrupted; the rerun continues
  from there. Under the heldout protocol validation is 10% of train; --eval_only (here
  evaluate_checkpoint) of the workdir reproduces the final test."""
  workdir = str(tmp_path / "run")
  config = tiny_config(num_train_steps=12, eval_every=4, checkpoint_every=100,
                       checkpoint_every_seconds=0.0, validation="heldout")
  with pytest.raises(interrupts.Interrupted) as stopped:
    train_lib.train_and_evaluate(config, workdir, datasets=DATASETS, stop=StopAfter(7))
  step = stopped.value.step
  assert 0 < step < 12 and stopped.value.exit_code == 128 + signal.SIGTERM
  assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(step)]
  results = train_lib.train_and_evaluate(config, workdir, datasets=DATASETS)
  assert results["steps"] == 12 and results["protocol"] == "heldout"
  assert [r["step"] for r in read_metrics(workdir)] == list(range(1, 13))
  validations = read_metrics(workdir, "validation")
  assert {r["examples"] for r in validations} == {round(0.1 * 256)}
  assert results["test_examples"] == 48
  assert results["validation_accuracy"] == max(r["accuracy"] for r in validations)
  evaluated = train_lib.evaluate_checkpoint(config, workdir, datasets=DATASETS)
  assert evaluated["step"] == results["best_step"]
  assert evaluated["test_accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-6)


def _cli_command(workdir, listops_dir, *extra):
  cmd = [sys.executable, "-m", "lra_benchmarks.train",
         f"--config={os.path.join(ROOT, 'configs', 'listops_softmax.py')}",
         f"--workdir={workdir}", f"--config.data_dir={listops_dir}"]
  return cmd + [f"--config.{k}={v}" for k, v in TINY.items()] + list(extra)


def test_two_processes_share_one_device_and_sigint_saves_a_checkpoint(tmp_path, listops_dir):
  """Two CLI runs at once on one CPU device: a short one finishes; a long one, sent SIGINT,
  checkpoints the step it reached, exits with 130 and says how to resume."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
  short, long = str(tmp_path / "short"), str(tmp_path / "long")
  procs = [subprocess.Popen(_cli_command(short, listops_dir, "--config.num_train_steps=4",
                                         "--memory_fraction=0.5"),
                            cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True),
           subprocess.Popen(_cli_command(long, listops_dir, "--config.num_train_steps=100000",
                                         "--memory_fraction=auto"),
                            cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)]
  try:
    out, err = procs[0].communicate(timeout=300)
    assert procs[0].returncode == 0, err[-3000:]
    assert os.path.exists(os.path.join(short, "results.json"))
    metrics = os.path.join(long, "metrics.jsonl")
    deadline = time.monotonic() + 300
    while not (os.path.exists(metrics) and os.path.getsize(metrics)):
      assert procs[1].poll() is None and time.monotonic() < deadline, procs[1].stderr.read()
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGINT)
    out, err = procs[1].communicate(timeout=120)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  assert procs[1].returncode == 128 + signal.SIGINT, err[-3000:]
  assert "Run the same command again to resume" in out
  saved = max(int(s) for s in os.listdir(os.path.join(long, "checkpoints")))
  assert f"stopped at step {saved}" in out
  assert saved >= max(r["step"] for r in read_metrics(long))  # nothing logged is lost
  assert train_lib.final_params(long)  # the checkpoint restores (resuming is tested above)
