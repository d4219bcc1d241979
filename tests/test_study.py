"""The study runner: argument parsing, run planning, skip/resume, reports, and one real study."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import base
from lra_benchmarks import study, study_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_attentions_expands_study_and_all():
  got = study.parse_attentions("study")
  pairs = [f"{c}-{w}" for c in base.STUDY_COMPONENTS for w in base.STUDY_WEIGHTS]
  assert got == pairs + ["softmax", "flash"] and len(got) == 20
  from spectraformer_jax import registry
  everything = study.parse_attentions("all,softmax")
  assert len(everything) == len(registry.valid_pairs()) + 2
  assert study.parse_attentions("flash,posrf-orf,flash") == ["flash", "posrf-orf"]
  assert study.parse_attentions("trigrf-iid") == ["trigrf-iid"]  # valid pair, no config file
  for bad in ("posrf", "posrf-nope", "nope-orf", "softmax-orf", ""):
    with pytest.raises(ValueError, match="attentions"):
      study.parse_attentions(bad)


def test_parse_other_flags():
  assert study.parse_tasks("all") == list(base.TASKS)
  with pytest.raises(ValueError, match="listops, text"):
    study.parse_tasks("listops,lisops")
  assert study.parse_seeds("0, 2,2") == [0, 2]
  with pytest.raises(ValueError, match="'x'"):
    study.parse_seeds("0,x")
  assert study.parse_sets(["num_train_steps=20", "model.num_features=256"]) == [
      "--config.num_train_steps=20", "--config.model.num_features=256"]
  for bad, why in (("num_train_steps", "KEY=VALUE"), ("seed=3", "--seeds"),
                   ("task=text", "--tasks")):
    with pytest.raises(ValueError, match=why):
      study.parse_sets([bad])
  assert study.parse_data_dirs(["text:/data/a:b"], base.TASKS) == {"text": "/data/a:b"}
  with pytest.raises(ValueError, match="unknown task"):
    study.parse_data_dirs(["txt:/data"], base.TASKS)


def test_runs_and_their_configs():
  runs = study.make_runs(["listops"], ["posrf-orf", "trigrf-iid", "flash"], [0, 3],
                         study.parse_sets(["num_train_steps=7", "progress_bar=True"]),
                         {"listops": "/data/lo"})
  assert [r.name for r in runs] == [
      "listops/posrf-orf/seed0", "listops/trigrf-iid/seed0", "listops/flash/seed0",
      "listops/posrf-orf/seed3", "listops/trigrf-iid/seed3", "listops/flash/seed3"]
  assert os.path.basename(runs[0].config_file) == "listops_posrf_orf.py"
  assert os.path.basename(runs[1].config_file) == "listops_softmax.py"
  assert runs[3].workdir("/w") == "/w/listops/posrf-orf/seed3"
  command = runs[3].command("/w", "py")
  assert command[:3] == ["py", "-m", "lra_benchmarks.train"]
  assert "--config.seed=3" in command and "--workdir=/w/listops/posrf-orf/seed3" in command
  for run, (attention, component, weight) in zip(
      runs[3:], [("spectraformer", "posrf", "orf"), ("spectraformer", "trigrf", "iid"),
                 ("flash", None, None)]):
    config = study.resolve_config(run)
    assert config["seed"] == 3 and config["num_train_steps"] == 7
    assert config["data_dir"] == "/data/lo" and "progress_bar" not in config
    assert config["model"]["attention"] == attention
    if component:
      assert (config["model"]["component"], config["model"]["weight"]) == (component, weight)
  bad = study.make_runs(["listops"], ["softmax"], [0], ["--config.num_trian_steps=7"], {})[0]
  with pytest.raises(ValueError, match="num_trian_steps"):
    study.resolve_config(bad)


def test_child_env_shares_memory():
  assert study.child_env(1, True, {"A": "1"}) == {"A": "1"}
  env = study.child_env(4, True, {})
  assert float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"]) * 4 == pytest.approx(0.9, abs=1e-3)
  assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"
  assert study.child_env(3, False, {})["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"


def _fake_run(root, task, attention, seed, acc=None, config=None, status=None, error=None):
  d = os.path.join(root, task, attention, f"seed{seed}")
  os.makedirs(d, exist_ok=True)
  if acc is not None:
    with open(os.path.join(d, "results.json"), "w") as f:
      json.dump({"test_accuracy": acc, "train_wall_time_s": 10.0 * (seed + 1),
                 "steps_per_second": 5.0, "peak_memory_bytes": 2**20 * (seed + 1),
                 "peak_memory_source": "memory_stats.peak_bytes_in_use", "best_step": 500,
                 "steps": 1000, "config": config or {}}, f)
  if status is not None:
    with open(os.path.join(d, "study_run.json"), "w") as f:
      json.dump({"status": status, "error": error, "config": config or {}}, f)
  return d


def test_aggregate_and_paper_difference(tmp_path):
  root = str(tmp_path)
  accs = {"posrf-qmc": [0.3705, 0.3725, 0.3645], "softmax": [0.40]}
  for attention, values in accs.items():
    for seed, acc in enumerate(values):
      _fake_run(root, "listops", attention, seed, acc)
  _fake_run(root, "text", "posrf-qmc", 0, 0.62)
  _fake_run(root, "text", "posrf-qmc", 1, status="failed", error="exit code 1\nboom")
  rows = study_report.collect_runs(root)
  assert [r["status"] for r in rows].count("done") == 5 and len(rows) == 6
  agg = study_report.aggregate(rows, "paper")
  g = {(x["task"], x["attention"]): x for x in agg["groups"]}
  lo = g[("listops", "posrf-qmc")]
  a = 100 * np.array(accs["posrf-qmc"])
  assert lo["n"] == 3 and lo["seeds"] == [0, 1, 2]
  assert lo["accuracy_mean_pct"] == pytest.approx(a.sum() / 3)
  assert lo["accuracy_std_pct"] == pytest.approx(np.sqrt(((a - a.mean()) ** 2).sum() / 2))
  assert lo["paper_mean_pct"] == 37.05 and lo["paper_std_pct"] == 0.16
  assert lo["diff_paper_std"] == pytest.approx((a.mean() - 37.05) / 0.16)
  assert lo["train_wall_time_s"] == pytest.approx(20.0) and lo["peak_memory_bytes"] == 3 * 2**20
  assert g[("listops", "softmax")]["accuracy_std_pct"] is None  # one seed
  per_attention = {e["attention"]: e for e in agg["attentions"]}
  assert per_attention["posrf-qmc"]["accuracy_mean_over_tasks_pct"] == pytest.approx(
      (a.mean() + 62.0) / 2)
  assert per_attention["posrf-qmc"]["paper_mean_over_tasks_pct"] == pytest.approx(
      (37.05 + 60.93) / 2)
  assert study_report.paper_entry("listops", "flash") is None
  with pytest.raises(ValueError, match="compare"):
    study_report.aggregate(rows, "papers")


def test_reports_and_heatmap(tmp_path, monkeypatch):
  root = str(tmp_path)
  _fake_run(root, "listops", "posrf-orf", 0, 0.30)
  _fake_run(root, "listops", "oprf-qmc", 0, 0.35)
  _fake_run(root, "listops", "flash", 0, 0.38)
  _fake_run(root, "listops", "oprf-orf", 0, status="failed", error="exit code 1\nOOM here")
  study_report.write_reports(root, compare="paper", components=base.STUDY_COMPONENTS,
                             weights=base.STUDY_WEIGHTS)
  md = open(os.path.join(root, "study.md")).read()
  assert "OOM here" in md and "n/a" in md and "38.49" not in md  # flash: no paper number
  with open(os.path.join(root, "study.csv")) as f:
    records = list(csv.DictReader(f))
  assert sum(r["row"] == "run" for r in records) == 4
  assert sum(r["row"] == "aggregate" for r in records) == 3
  data = json.load(open(os.path.join(root, "study.json")))
  assert len(data["runs"]) == 4 and data["paper_source"]
  rows, cols, mean, _ = study_report.heatmap_grid(data["groups"], "listops",
                                                  base.STUDY_COMPONENTS, base.STUDY_WEIGHTS)
  assert rows == ["posrf", "oprf"] and cols == ["orf", "qmc"]
  np.testing.assert_allclose(mean, [[30.0, np.nan], [np.nan, 35.0]])
  pytest.importorskip("matplotlib")
  assert os.path.getsize(os.path.join(root, "heatmap_listops.png")) > 0
  os.remove(os.path.join(root, "heatmap_listops.png"))
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
  said = []
  study_report.write_reports(root, say=said.append)
  assert any("matplotlib" in s for s in said)
  assert not os.path.exists(os.path.join(root, "heatmap_listops.png"))


def test_run_state(tmp_path):
  run = study.make_runs(["listops"], ["softmax"], [0], [], {})[0]
  config = study.resolve_config(run)
  d = run.workdir(str(tmp_path))
  assert study.run_state(d, config)[0] == "new"
  _fake_run(str(tmp_path), "listops", "softmax", 0, status="failed", config=config)
  os.makedirs(os.path.join(d, "checkpoints"))
  assert study.run_state(d, config)[0] == "resume"
  _fake_run(str(tmp_path), "listops", "softmax", 0, acc=0.4, config=config)
  assert study.run_state(d, config)[0] == "done"
  other = dict(config, num_train_steps=1, model=dict(config["model"], num_features=7))
  state, detail = study.run_state(d, other)
  assert state == "conflict" and detail == "model.num_features, num_train_steps"


def _mtimes(root):
  return {p: os.stat(os.path.join(root, p, "results.json")).st_mtime_ns
          for p in ("listops/posrf-orf/seed0", "listops/softmax/seed0",
                    "listops/posrf-orf/seed1", "listops/softmax/seed1")
          if os.path.exists(os.path.join(root, p, "results.json"))}


def test_study_end_to_end_kill_and_resume(tmp_path, listops_dir):
  """The documented command on CPU: killed after its first run, re-run to the end, re-run
  again without training."""
  root = str(tmp_path / "W")
  command = [sys.executable, "-m", "lra_benchmarks.study", "--tasks=listops",
             "--attentions=posrf-orf,softmax", "--seeds=0,1", f"--workdir={root}",
             "--set=num_train_steps=20", "--set=eval_every=10", f"--data_dir=listops:{listops_dir}",
             "--set=seq_len=64", "--set=max_length=64", "--set=model.num_layers=1",
             "--set=batch_size=8", "--set=warmup_steps=5", "--set=checkpoint_every=10"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  first = os.path.join(root, "listops", "posrf-orf", "seed0", "results.json")
  proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
  try:
    while not study_report.is_complete(study_report.read_json(first)) and proc.poll() is None:
      time.sleep(0.2)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its training, as a crash would
    proc.wait()
  assert os.path.exists(first)
  before = _mtimes(root)
  assert len(before) < 4

  out = subprocess.run(command + ["--concurrent=2", "--compare=paper"], cwd=ROOT, env=env,
                       capture_output=True, text=True, check=True).stdout
  assert "listops/posrf-orf/seed0: finished earlier" in out
  assert out.count("ETA") >= 3  # one progress line per run
  after = _mtimes(root)
  assert len(after) == 4
  assert all(after[p] == t for p, t in before.items())  # finished runs were not trained again
  for name in ("study.md", "study.csv", "study.json", "heatmap_listops.png"):
    assert os.path.getsize(os.path.join(root, name)) > 0
  data = json.load(open(os.path.join(root, "study.json")))
  assert {g["attention"]: g["n"] for g in data["groups"]} == {"posrf-orf": 2, "softmax": 2}
  assert "38.49" in open(os.path.join(root, "study.md")).read()  # the paper's softmax ListOps

  again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout
  assert "0 trained, 4 finished earlier" in again
  assert _mtimes(root) == after


def test_failed_runs_are_recorded_and_the_study_goes_on(tmp_path):
  """A training that exits with an error: each run is recorded as failed with the end of its
  log, every run is attempted, and the reports list them."""
  fake = tmp_path / "fake_python"
  fake.write_text("#!/bin/sh\necho 'Traceback (most recent call last):'\n"
                  "echo 'ValueError: config.model.weight=nope'\nexit 3\n")
  fake.chmod(0o755)
  runs = study.make_runs(["listops"], ["softmax", "flash"], [0], [],
                         {"listops": str(tmp_path / "data")})
  root = str(tmp_path / "W")
  said = []
  counts = study.run_study(runs, root, python=str(fake), say=said.append)
  assert counts == {"done": 0, "skipped": 0, "failed": 2, "conflict": 0}
  for run in runs:
    meta = json.load(open(os.path.join(run.workdir(root), "study_run.json")))
    assert meta["status"] == "failed" and meta["returncode"] == 3
    assert meta["error"].splitlines()[0] == "exit code 3"
    assert meta["error"].splitlines()[-1] == "ValueError: config.model.weight=nope"
  assert sum("FAILED" in s for s in said) == 2
  assert "ValueError: config.model.weight=nope" in open(os.path.join(root, "study.md")).read()


def test_main_dry_run_report_only_and_errors(tmp_path, capsys):
  root = str(tmp_path / "W")
  assert study.main(["--tasks=listops", "--attentions=softmax,posrf-qmc", "--seeds=0,1",
                     f"--workdir={root}", "--set=num_train_steps=5", "--dry_run"]) == 0
  out = capsys.readouterr().out
  assert out.count("lra_benchmarks.train") == 4 and out.count(": new") == 4
  assert "--config.num_train_steps=5" in out and not os.path.exists(root)
  _fake_run(root, "listops", "softmax", 0, 0.25)
  assert study.main([f"--workdir={root}", "--report_only", "--compare=paper"]) == 0
  assert "38.49" in open(os.path.join(root, "study.md")).read()
  assert study.main(["--tasks=listops", "--attentions=softmax", f"--workdir={root}",
                     "--set=seed=1"]) == 2
  assert "--seeds" in capsys.readouterr().err
