"""The trainer's units without training: checkpoint fallback, workdir guard, stop requests,
progress, held-out protocol, memory settings, and the CLI's --help and one-line errors."""

import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import truncate_checkpoint_data
from configs import base_listops
from lra_benchmarks.training import checkpoints, cli, evaluate, interrupts, progress, workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------
# Checkpoint store.


def _weights(step):
  """Random (incompressible) data, so a truncated data file loses part of it."""
  return jax.random.normal(jax.random.key(step), (256,))


def _save_steps(directory, steps):
  with checkpoints.CheckpointStore(directory, max_to_keep=5, say=lambda m: None) as store:
    for step in steps:
      store.save(step, {"w": _weights(step)}, {"step": step})


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # no noise
@pytest.mark.parametrize("damage", ["truncate_data", "empty_metadata"])
def test_unreadable_latest_checkpoint_falls_back_with_one_line(tmp_path, damage):
  directory = str(tmp_path / "checkpoints")
  _save_steps(directory, [8, 16])
  latest = os.path.join(directory, "16")
  if damage == "truncate_data":
    truncate_checkpoint_data(latest)
  else:
    open(os.path.join(latest, "state", "_METADATA"), "w").close()
  lines = []
  abstract = {"w": jax.ShapeDtypeStruct((256,), jnp.float32)}
  with checkpoints.CheckpointStore(directory, max_to_keep=5, say=lines.append) as store:
    step, state, meta = store.restore_latest(abstract)
    assert store.steps() == [8]
  assert step == 8 and meta == {"step": 8}
  np.testing.assert_array_equal(state["w"], _weights(8))
  assert len(lines) == 1 and "\n" not in lines[0]
  assert latest in lines[0] and "unreadable" in lines[0]
  assert os.path.isdir(tmp_path / "unreadable" / "checkpoints-16")  # kept, out of the way


def test_no_readable_checkpoint_says_what_to_do(tmp_path):
  directory = str(tmp_path / "checkpoints")
  _save_steps(directory, [4])
  open(os.path.join(directory, "4", "state", "_METADATA"), "w").close()
  with checkpoints.CheckpointStore(directory, max_to_keep=5, say=lambda m: None) as store:
    with pytest.raises(checkpoints.CheckpointError, match="No readable checkpoint in .*"
                       "new --workdir"):
      store.restore_latest({"w": jax.ShapeDtypeStruct((256,), jnp.float32)},
                           hint="Start afresh with a new --workdir.")


def test_checkpoint_of_other_shapes_is_an_error_and_stays(tmp_path):
  directory = str(tmp_path / "checkpoints")
  _save_steps(directory, [2])
  with checkpoints.CheckpointStore(directory, max_to_keep=5, say=lambda m: None) as store:
    with pytest.raises(checkpoints.CheckpointError, match="does not fit this config"):
      store.restore_latest({"w": jax.ShapeDtypeStruct((128,), jnp.float32)})
    assert store.steps() == [2]


def test_verify_rejects_a_checkpoint_that_restores_but_is_inconsistent(tmp_path):
  directory = str(tmp_path / "checkpoints")
  _save_steps(directory, [3, 6])

  def verify(step, state, meta):
    if step == 6:
      raise ValueError("inconsistent")
  with checkpoints.CheckpointStore(directory, max_to_keep=5, say=lambda m: None) as store:
    assert store.restore_latest(verify=verify)[0] == 3


# --------------------------------------------------------------------------------------------
# Workdir guard.


def _config(**fields):
  config = base_listops.get_config()
  for key, value in fields.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _used_workdir(tmp_path, config):
  path = str(tmp_path / "run")
  os.makedirs(os.path.join(path, "checkpoints", "8"))
  workdir.store_config(path, config)
  return path


def test_workdir_of_another_model_is_an_error_naming_the_keys(tmp_path):
  path = _used_workdir(tmp_path, _config(**{"model.weight": "qmc"}))
  with pytest.raises(workdir.WorkdirError) as error:
    workdir.prepare(path, _config(**{"model.weight": "orf", "model.num_features": 64}))
  message = str(error.value)
  assert "model.weight ('qmc' -> 'orf')" in message and "model.num_features" in message
  assert "new --workdir" in message and "--config.resume=force" in message
  assert "num_train_steps" not in message


def test_config_differences_ignore_free_and_new_keys():
  old = {"model": {"weight": "qmc"}, "num_train_steps": 8}
  new = {"model": {"weight": "qmc", "added": 1}, "num_train_steps": 16}
  assert workdir.config_differences(old, new) == {}
  assert workdir.config_differences(old, {"model": {"weight": "orf"}}) == {
      "model.weight": ("qmc", "orf")}


def test_workdir_allows_budget_changes_and_force(tmp_path):
  path = _used_workdir(tmp_path, _config())
  assert workdir.prepare(path, _config(num_train_steps=99, eval_every=7, data_dir="/x")) == path
  assert workdir.prepare(path, _config(seed=3, resume="force")) == path


def test_workdir_that_is_a_file_is_a_clear_error(tmp_path):
  path = tmp_path / "file"
  path.write_text("")
  with pytest.raises(workdir.WorkdirError, match="is a file"):
    workdir.prepare(str(path), _config())


# --------------------------------------------------------------------------------------------
# Stop requests.


def test_first_signal_sets_the_flag_second_exits_at_once():
  exits, lines = [], []
  previous = signal.getsignal(signal.SIGTERM)
  with interrupts.StopRequest(say=lines.append, exit_now=exits.append) as stop:
    assert signal.getsignal(signal.SIGTERM) == stop.handle
    assert not stop.requested
    stop.handle(signal.SIGINT)
    assert stop.requested and stop.signum == signal.SIGINT and not exits
    stop.handle(signal.SIGINT)
    assert exits == [128 + signal.SIGINT]
  assert signal.getsignal(signal.SIGTERM) == previous
  assert len(lines) == 2


# --------------------------------------------------------------------------------------------
# Progress.


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_progress_rate_and_eta_come_from_completed_steps():
  clock = FakeClock()
  reporter = progress.ProgressReporter("listops", 100, clock=clock)
  reporter.start(20)
  clock.now = 8.0
  assert reporter.rate(20) is None
  assert reporter.rate(60) == pytest.approx(5.0)
  line = reporter.train_line(60, loss=1.5)
  assert "60/100" in line and "5.00 steps/s" in line and "ETA 8.0 s" in line


def test_one_step_run_has_a_rate():
  clock = FakeClock()
  reporter = progress.ProgressReporter("text", 1, clock=clock)
  reporter.start(0)
  clock.now = 4.0
  assert "4.0 s/step" in reporter.train_line(1)


def test_human_units():
  assert progress.format_bytes(3 * 2**30) == "3.0 GiB"
  assert progress.format_bytes(1536 * 2**20) == "1.5 GiB"
  assert progress.format_bytes(5 * 2**20) == "5.0 MiB"
  assert progress.format_bytes(None) == "n/a"
  assert progress.format_duration(42) == "42 s"
  assert progress.format_duration(150) == "2.5 min"
  assert progress.format_duration(5400) == "1 h 30 min"
  assert progress.format_rate(0.5) == "2.0 s/step" and progress.format_rate(None) == "rate n/a"


# --------------------------------------------------------------------------------------------
# Protocols.


def test_heldout_split_is_disjoint_complete_and_deterministic():
  n = 1000
  train = {"inputs": np.arange(n)[:, None] * np.ones((1, 3), int), "targets": np.arange(n)}
  rest, heldout = evaluate.heldout_split(train, 0.1)
  again_rest, again_heldout = evaluate.heldout_split(train, 0.1)
  assert len(heldout["targets"]) == 100 and len(rest["targets"]) == 900
  assert not set(heldout["targets"]) & set(rest["targets"])
  assert sorted([*heldout["targets"], *rest["targets"]]) == list(range(n))
  np.testing.assert_array_equal(heldout["targets"], again_heldout["targets"])
  np.testing.assert_array_equal(heldout["inputs"][:, 0], heldout["targets"])  # rows kept whole
  # A random subset, not a block: it reaches across the ordered source.
  assert heldout["targets"].min() < n // 10 and heldout["targets"].max() > n - n // 10
  with pytest.raises(ValueError, match="heldout_fraction"):
    evaluate.heldout_split(train, 1.0)


def test_protocols_pick_the_validation_split():
  data = {s: {"targets": np.arange(k)} for s, k in (("train", 50), ("validation", 7),
                                                     ("test", 9))}
  assert evaluate.protocol_splits(data, "test", 0.1)["validation"] is data["validation"]
  heldout = evaluate.protocol_splits(data, "heldout", 0.2)
  assert len(heldout["validation"]["targets"]) == 10 and heldout["test"] is data["test"]
  with pytest.raises(ValueError, match="config.validation='cv'"):
    evaluate.protocol_splits(data, "cv", 0.1)


# --------------------------------------------------------------------------------------------
# Memory and the command line.


def test_memory_settings():
  assert cli.memory_environment("") == {}
  assert cli.memory_environment("auto") == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  assert cli.memory_environment("0.3") == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.3"}
  for bad in ("1.5", "0", "half"):
    with pytest.raises(cli.UsageError, match="auto"):
      cli.memory_environment(bad)


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "lra_benchmarks.train", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120, check=False,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_help_exits_zero_and_lists_config_fields_with_defaults():
  proc = _cli("--config=configs/listops_posrf_qmc.py", "--help")
  assert proc.returncode == 0, proc.stderr
  assert "model.num_features = 128" in proc.stdout and "num_train_steps = 50000" in proc.stdout
  assert "--memory_fraction" in proc.stdout and "--eval_only" in proc.stdout


@pytest.mark.parametrize("args,expected", [
    (["--config=configs/listops_posrf_qcm.py"], "configs/listops_posrf_qmc.py"),
    (["--config=configs/listops_softmax.py", "--config.model.num_heds=4"],
     "--config.model.num_heds: no such config field. Did you mean --config.model.num_heads"),
    (["--config=configs/listops_softmax.py", "--config.batch_size=abc"],
     "--config.batch_size=abc: expected int (default 32)"),
    (["--config=configs/listops_softmax.py", "--config.schedule=cosine"],
     "config.schedule='cosine'"),
])
def test_user_mistakes_are_one_or_two_lines(args, expected):
  proc = _cli(*args)
  assert proc.returncode == 2
  assert expected in proc.stderr
  assert len(proc.stderr.strip().splitlines()) <= 2, proc.stderr


def test_missing_data_dir_prints_the_loaders_message_without_a_traceback(tmp_path):
  proc = _cli("--config=configs/listops_softmax.py", f"--workdir={tmp_path / 'run'}",
              f"--config.data_dir={tmp_path / 'nonexistent'}")
  assert proc.returncode == 1
  assert proc.stderr.startswith("error: listops: data not found. Looked for:")
  assert str(tmp_path / "nonexistent") in proc.stderr and "Traceback" not in proc.stderr
