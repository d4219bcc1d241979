"""Several processes as one run: the arguments of ``jax.distributed.initialize`` from flags and
the environment, and two CPU processes on localhost that train, checkpoint and resume together."""

import json
import os
import socket
import subprocess
import sys

import pytest

from lra_benchmarks import study
from lra_benchmarks.training import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny ListOps run split over two processes with one CPU device each (global batch 8, 4 per
# process); evaluation only at the end, checkpoints every 3 steps. The rsqrt schedule does not
# depend on the budget, so the resumed run's train step is the first run's (compiled once).
TINY = {
    "max_length": 32, "seq_len": 32, "batch_size": 8, "eval_every": 1000, "checkpoint_every": 3,
    "log_every": 1, "num_eval_steps": -1, "warmup_steps": 2, "schedule": "rsqrt",
    "progress_bar": False,
    "model.attention": "softmax", "model.num_layers": 1, "model.emb_dim": 16,
    "model.qkv_dim": 16, "model.mlp_dim": 32, "model.classifier_dim": 16,
    "model.num_features": 16,
}


def test_flags_win_over_the_environment_which_wins_over_detection():
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "3"}
  assert distributed.initialize_arguments(environ=env) == {
      "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
  assert distributed.initialize_arguments("h:1", 2, 0, environ=env) == {
      "coordinator_address": "h:1", "num_processes": 2, "process_id": 0}
  assert distributed.initialize_arguments(environ={}) == {}
  assert distributed.initialize_arguments(environ={"JAX_COORDINATOR_ADDRESS": "h:1"}) == {
      "coordinator_address": "h:1"}
  assert distributed.requested(False, {"JAX_COORDINATOR_ADDRESS": "h:1"})
  assert not distributed.requested(False, {})


@pytest.mark.parametrize("args, env, match", [
    ((None, 2, None), {}, "give both"),
    ((None, None, None), {"JAX_PROCESS_ID": "1"}, "give both"),
    (("h:1", 2, 2), {}, r"process_id=2: must be in 0\.\.1"),
    ((None, 2, 0), {}, "needs a coordinator"),
    ((None, None, None), {"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES='two': expected an integer >= 1"),
])
def test_incomplete_or_contradictory_settings_are_clear_errors(args, env, match):
  with pytest.raises(distributed.DistributedError, match=match):
    distributed.initialize_arguments(*args, environ=env)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_two_processes(tmp_path, workdir: str, listops_dir: str, steps: int) -> list[str]:
  """Runs the trainer as processes 0 and 1 of one distributed run; returns their stdouts after
  asserting both exit 0."""
  address = f"127.0.0.1:{_free_port()}"
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
  env.pop("XLA_FLAGS", None)  # one CPU device per process
  base = [sys.executable, "-m", "lra_benchmarks.train",
          f"--config={os.path.join(ROOT, 'configs', 'base_listops.py')}", f"--workdir={workdir}",
          f"--config.data_dir={listops_dir}", f"--config.num_train_steps={steps}"]
  base += [f"--config.{k}={v}" for k, v in TINY.items()]
  procs = [subprocess.Popen(base + ["--jax_distributed", f"--coordinator_address={address}",
                                    "--num_processes=2", f"--process_id={i}"],
                            cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      out, err = proc.communicate(timeout=300)
      assert proc.returncode == 0, (proc.args[-1], out, err[-3000:])
      outputs.append(out)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
  return outputs


def _train_steps(workdir: str) -> list[int]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [row["step"] for row in map(json.loads, f) if row["split"] == "train"]


def test_two_processes_train_write_once_and_resume_together(tmp_path, listops_dir):
  """Two CPU processes form one 2-device run: both exit 0, only process 0 reports and logs
  (each step once), results cover both devices; a larger budget resumes from the step-6
  checkpoint and continues to step 9."""
  workdir = str(tmp_path / "run")
  first = _run_two_processes(tmp_path, workdir, listops_dir, steps=6)
  assert "results in" in first[0] and "results in" not in first[1]
  with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
    results = json.load(f)
  assert (results["steps"], results["devices"]) == (6, 2)
  assert _train_steps(workdir) == list(range(1, 7))
  assert "6" in os.listdir(os.path.join(workdir, "checkpoints"))

  second = _run_two_processes(tmp_path, workdir, listops_dir, steps=9)
  assert "Resumed from" in second[0] and "checkpoints/6" in second[0]
  assert "Resumed from" not in second[1]
  with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
    results = json.load(f)
  assert (results["steps"], results["devices"]) == (9, 2)
  assert _train_steps(workdir) == list(range(1, 10))


def test_device_slots_start_round_robin():
  assert study.device_slots(["0", "1", "2"], 2) == ["0", "1", "2", "0", "1", "2"]
  with pytest.raises(ValueError, match="no devices"):
    study.device_slots([], 1)


def test_per_device_placement_gives_each_run_a_device_of_its_own(tmp_path):
  """Five runs on two "GPUs", one at a time on each: a fake trainer that holds its device
  (a lock directory) while it runs fails if it finds the device taken; every run finishes,
  both devices are used, and each run saw exactly one device."""
  fake = tmp_path / "fake_python"
  locks = tmp_path / "locks"
  locks.mkdir()
  fake.write_text(
      "#!/bin/sh\n"
      f"mkdir {locks}/gpu$CUDA_VISIBLE_DEVICES || exit 7\n"
      "for a in \"$@\"; do case $a in --workdir=*) w=${a#--workdir=};; esac; done\n"
      "sleep 0.3\n"
      "printf '{\"test_accuracy\": 0.5, \"device\": \"%s\"}' \"$CUDA_VISIBLE_DEVICES\" "
      "> $w/results.json\n"
      f"rmdir {locks}/gpu$CUDA_VISIBLE_DEVICES\n")
  fake.chmod(0o755)
  runs = study.make_runs(["listops"], ["softmax", "flash", "posrf-orf"], [0, 1], [],
                         {"listops": str(tmp_path / "data")})[:5]
  root = str(tmp_path / "W")
  counts = study.run_study(runs, root, python=str(fake), placement=("CUDA_VISIBLE_DEVICES",
                                                                    ["0", "1"]),
                           say=lambda _: None)
  assert counts == {"done": 5, "skipped": 0, "failed": 0, "conflict": 0}
  devices = []
  for run in runs:
    with open(os.path.join(run.workdir(root), "results.json"), encoding="utf-8") as f:
      devices.append(json.load(f)["device"])
  assert sorted(set(devices)) == ["0", "1"]


def test_per_device_placement_refuses_a_machine_without_gpus(tmp_path):
  with pytest.raises(ValueError, match="needs GPUs.*devices are cpu: use --placement=shared"):
    study.detect_devices(sys.executable, {**os.environ, "JAX_PLATFORMS": "cpu"})
