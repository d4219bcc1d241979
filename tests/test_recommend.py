"""lra_benchmarks.recommend: deterministic ranking, error ordering, rank correlation, CLI errors.

The whole command (warm-up run, ranking, files) runs in the choose_combination notebook test.
"""

import json

import numpy as np
import pytest

from lra_benchmarks import recommend
from lra_benchmarks.benchmarks import approximation

PAIRS = [("posrf", "orf"), ("posrf", "iid")]


@pytest.fixture(scope="module")
def layers():
  """Two 'layers' of Gaussian q/k/v [1, 32, 1, 8] (logit std 0.25)."""
  return {f"layer{i}": approximation.gaussian_inputs(i, 0.5, 1, 1, 32, 1, 8) for i in range(2)}


def test_ranking_is_deterministic_per_seed(layers):
  first = recommend.rank(recommend.approximation_errors(layers, PAIRS, m=8, draws=3, seed=0))
  again = recommend.rank(recommend.approximation_errors(layers, PAIRS, m=8, draws=3, seed=0))
  other = recommend.rank(recommend.approximation_errors(layers, PAIRS, m=8, draws=3, seed=1))
  assert first == again
  assert [r["rank"] for r in first] == [1, 2]
  assert first[0]["error"] <= first[1]["error"]
  assert all(r["error"] > 0 and r["error_std"] > 0 for r in first)
  assert {r["combination"]: r["error"] for r in first} != {r["combination"]: r["error"]
                                                          for r in other}


def test_many_features_rank_before_few(layers):
  """PosRF's error falls like 1/sqrt(m): m = 512 has a far smaller error than m = 8, by much
  more than the spread over draws."""
  few = recommend.approximation_errors(layers, [("posrf", "iid")], m=8, draws=3, seed=0)[0]
  many = recommend.approximation_errors(layers, [("posrf", "iid")], m=512, draws=3, seed=0)[0]
  assert many["error"] + 3 * many["error_std"] < few["error"] - 3 * few["error_std"]
  ranked = recommend.rank([dict(few, combination="m=8"), dict(many, combination="m=512")])
  assert [r["combination"] for r in ranked] == ["m=512", "m=8"]


def test_rank_puts_failures_and_non_finite_last():
  rows = [{"combination": "a", "error": None}, {"combination": "b", "error": float("nan")},
          {"combination": "c", "error": 2.0}, {"combination": "d", "error": 1.0}]
  assert [r["combination"] for r in recommend.rank(rows)] == ["d", "c", "a", "b"]


def test_spearman_matches_the_textbook_formula():
  """Without ties rho = 1 - 6 sum d_i^2 / (n (n^2 - 1)), d_i the rank differences."""
  x = [3.1, 0.2, 5.0, 1.7, 4.4, 2.9, 0.9]
  y = [10.0, 30.0, 50.0, 20.0, 70.0, 60.0, 40.0]
  d = np.argsort(np.argsort(x)) - np.argsort(np.argsort(y))
  n = len(x)
  result = recommend.spearman(x, y)
  assert result["rho"] == pytest.approx(1 - 6 * np.sum(d**2) / (n * (n**2 - 1)))
  assert result["n"] == n and 0 < result["p_value"] < 1
  assert recommend.spearman([1, 2, 3, 4], [8, 6, 4, 2])["rho"] == pytest.approx(-1.0)
  assert recommend.spearman([1, 1, 2, 3], [1, 1, 2, 3])["rho"] == pytest.approx(1.0)  # ties
  with pytest.raises(ValueError, match="length"):
    recommend.spearman([1, 2], [1, 2])


def test_validate_correlates_the_score_with_accuracy():
  ranked = recommend.rank([{"combination": c, "error": e}
                           for c, e in (("a", 0.1), ("b", 0.2), ("c", 0.3), ("d", None))])
  accuracies = {"a": 40.0, "b": 30.0, "c": 20.0, "d": 50.0, "e": 10.0}
  result = recommend.validate(ranked, accuracies, "study.json")
  assert result["rho"] == pytest.approx(1.0) and result["n"] == 3
  assert [r["accuracy_pct"] for r in ranked] == [40.0, 30.0, 20.0, 50.0]
  assert "rho = +1.000" in recommend.table(ranked, result)
  with pytest.raises(ValueError, match="at least 3"):
    recommend.validate(ranked, {"a": 1.0}, "study.json")


def _speed_json(path):
  path.write_text(json.dumps({"steps": [
      {"task": "listops", "attention": "posrf-orf", "median_ms": 3.0,
       "static_memory": {"total_bytes": 2**20}},
      {"task": "listops", "attention": "posrf-iid", "median_ms": 5.0, "process_peak_bytes": 2**21},
      {"task": "text", "attention": "posrf-iid", "median_ms": 1.0}]}))
  return str(path)


def test_speed_json_and_budget(tmp_path):
  speeds = recommend.speed_from_json(_speed_json(tmp_path / "speed.json"), "listops")
  assert speeds["posrf-orf"]["memory_mib"] == 1.0 and speeds["posrf-iid"]["memory_mib"] == 2.0
  kept, excluded = recommend.within_budget(PAIRS + [("saderf", "mm")], speeds, 4.0)
  assert kept == [("posrf", "orf")]
  assert [e["combination"] for e in excluded] == ["posrf-iid", "saderf-mm"]
  with pytest.raises(ValueError, match="fastest is posrf-orf at 3 ms"):
    recommend.within_budget(PAIRS, speeds, 1.0)


def test_measure_speed_times_a_train_step():
  speeds = recommend.measure_speed("listops", [("posrf", "orf")], m=4, batch=2, length=16)
  assert speeds["posrf-orf"]["ms_per_step"] > 0
  assert speeds["posrf-orf"]["memory_mib"] > 0
  assert speeds["posrf-orf"]["memory_source"] == "static"


def test_cli_errors(tmp_path):
  speed_json = _speed_json(tmp_path / "speed.json")
  with pytest.raises(ValueError, match="unknown task 'sudoku'.*listops"):
    recommend.main(["--task=sudoku"])
  with pytest.raises(FileNotFoundError, match="no such directory"):
    recommend.main(["--task=listops", f"--checkpoint={tmp_path / 'missing'}"])
  with pytest.raises(FileNotFoundError, match="no config.json"):
    recommend.main(["--task=listops", f"--checkpoint={tmp_path}"])
  (tmp_path / "text_run").mkdir()
  (tmp_path / "text_run" / "config.json").write_text(json.dumps({"task": "text"}))
  with pytest.raises(ValueError, match="trained on task 'text'"):
    recommend.main(["--task=listops", f"--checkpoint={tmp_path / 'text_run'}"])
  with pytest.raises(ValueError, match="excludes every one of the 2 combinations"):
    recommend.main(["--task=listops", "--pairs=posrf:orf,posrf:iid", f"--speed_json={speed_json}",
                    "--budget=0.5", f"--out={tmp_path / 'out'}"])
  with pytest.raises(ValueError, match="--budget needs speed figures"):
    recommend.main(["--task=listops", "--budget=5", "--no-measure_speed"])
  with pytest.raises(FileNotFoundError, match="--validate"):
    recommend.main(["--task=listops", f"--validate={tmp_path / 'study.json'}"])
  with pytest.raises(ValueError, match="Valid"):
    recommend.main(["--task=listops", "--pairs=posrf:nope", "--no-measure_speed"])
  assert recommend.select_pairs("study")[0] == ("posrf", "orf")
  assert len(recommend.select_pairs("study")) == 18
