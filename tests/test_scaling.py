"""The data-parallel scaling benchmark: points, efficiency, device restriction, one tiny run."""

import json
import os

import pytest

from lra_benchmarks.benchmarks import scaling

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(REPO, "configs", "listops_quick.py")


def test_points_grow_the_batch_only_in_weak_scaling():
  points = scaling.make_points(["a.py"], [1, 2, 4], ["weak", "strong"], {"a.py": 8})
  assert [(p.mode, p.devices, p.global_batch) for p in points] == [
      ("weak", 1, 8), ("weak", 2, 16), ("weak", 4, 32),
      ("strong", 1, 32), ("strong", 2, 32), ("strong", 4, 32)]


def test_efficiency_is_one_for_perfect_scaling_and_halves_without_speed_up():
  base = {"steps_per_second": 10.0, "global_batch": 8}
  weak4 = scaling.Point("a.py", "weak", 4, 32)
  assert scaling.efficiency(weak4, 10.0, base) == pytest.approx(1.0)  # 4x the examples/s
  assert scaling.efficiency(weak4, 5.0, base) == pytest.approx(0.5)
  strong2 = scaling.Point("a.py", "strong", 2, 16)
  strong_base = {"steps_per_second": 10.0, "global_batch": 16}
  assert scaling.efficiency(strong2, 20.0, strong_base) == pytest.approx(1.0)
  assert scaling.efficiency(strong2, 10.0, strong_base) == pytest.approx(0.5)
  assert scaling.efficiency(strong2, 10.0, None) is None


def test_child_env_limits_the_devices():
  gpu = scaling.child_env("gpu", 4, {})
  assert gpu["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
  cpu = scaling.child_env("cpu", 2, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --x=1"})
  assert cpu["XLA_FLAGS"].split() == ["--x=1", "--xla_force_host_platform_device_count=2"]
  assert cpu["JAX_PLATFORMS"] == "cpu"


@pytest.mark.parametrize("argv, message", [
    (["--devices=2,4"], "must include 1"),
    (["--modes=weak,fast"], "unknown ['fast']"),
    (["--steps=0"], "--steps must be >= 1"),
])
def test_bad_flags_say_what_is_wrong(argv, message, capsys):
  with pytest.raises(SystemExit):
    scaling.parse_args(["--configs=x.py", "--out_dir=o"] + argv)
  assert message in capsys.readouterr().err


def test_missing_config_is_named(tmp_path):
  with pytest.raises(SystemExit, match="no config file 'nope.py'"):
    scaling.main(["--configs=nope.py", "--devices=1", f"--out_dir={tmp_path}"])


def test_two_fake_devices_run_through_the_trainer_and_resume(tmp_path, monkeypatch, listops_dir):
  monkeypatch.chdir(REPO)
  # The trainings compile their own programs: the suite's shared compilation cache, filled by
  # other processes at the same time, stays out of the device-count comparison.
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  argv = [f"--configs={QUICK}", "--devices=1,2", "--modes=weak", "--steps=2", "--platform=cpu",
          f"--out_dir={tmp_path}", f"--data_dir={listops_dir}", "--set=num_eval_steps=1",
          "--set=model.num_layers=1", "--set=max_length=128", "--set=seq_len=128"]
  rows = scaling.main(argv)
  assert [r.get("error") for r in rows] == [None, None]
  assert [r["global_batch"] for r in rows] == [32, 64]
  assert rows[0]["efficiency"] == pytest.approx(1.0)
  assert rows[1]["efficiency"] > 0
  saved = json.load(open(tmp_path / "scaling.json"))
  assert [r["devices"] for r in saved["rows"]] == [1, 2]
  # A second call reuses the finished points: same figures, no new training.
  again = scaling.main(argv)
  assert [r["steps_per_second"] for r in again] == [r["steps_per_second"] for r in rows]


def test_failure_summary_keeps_the_cause_of_a_long_crash():
  output = "start\nF1202 12:00 Check failed: devices == 2\n" + "noise line\n" * 500
  summary = scaling.failure_summary(output, limit=100)
  assert "Check failed: devices == 2" in summary
  assert summary.endswith("noise line\n") and len(summary) < 300
