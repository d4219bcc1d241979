"""The CPU paths of the benchmark programs at tiny sizes: well-formed JSON, markdown and PNG."""

import json
import math
import os

import numpy as np
import pytest

from lra_benchmarks.benchmarks import approximation, common, kernel_speed, speed

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
  with open(path, "rb") as f:
    return f.read(8) == PNG_MAGIC and os.path.getsize(path) > 1000


def _load(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)  # strict: NaN/inf would have been written as null


def test_speed_cpu_tiny(tmp_path):
  out = tmp_path / "speed"
  result = speed.main([
      "--tasks=listops", "--pairs=posrf:orf", "--baselines=flash",
      "--batch=2", "--length=32", "--model=num_layers=1,emb_dim=16,qkv_dim=16,mlp_dim=32",
      "--m=8", "--dtype=float32", "--warmup=1", "--reps=2", "--compile_workers=2",
      "--sweep_lengths=32,64", "--sweep_tokens=128", "--sweep_dim=16",
      "--out_dir", str(out),
      "--quiet"])
  data = _load(out / "speed.json")
  names = [r["attention"] for r in data["steps"]]
  assert names == ["flash", "posrf-orf"]
  for row in data["steps"]:
    assert "error" not in row, row
    assert row["median_ms"] > 0 and row["finite_loss"]
    assert row["static_memory"]["total_bytes"] > 0
    assert row["batch"] == 2 and row["length"] == 32
  sweep = {(r["attention"], r["length"]): r for r in data["sweep"]}
  assert set(sweep) == {(a, n) for a in ("flash", "posrf-orf") for n in (32, 64)}
  assert sweep[("posrf-orf", 64)]["batch"] == 2 and sweep[("posrf-orf", 32)]["batch"] == 4
  fits = data["fits"]
  assert math.isfinite(fits["posrf-orf"]["slope"])
  assert "crossover_vs_flash" in fits["posrf-orf"]
  assert data["environment"]["platform"] == "cpu"
  text = (out / "speed.md").read_text()
  assert "| posrf-orf |" in text and "## Attention layer alone" in text
  assert _is_png(out / "speed_steps.png") and _is_png(out / "speed_sweep.png")
  assert result["steps"][0]["task"] == "listops"


def test_approximation_cpu_tiny(tmp_path):
  out = tmp_path / "approx"
  approximation.main(["--pairs=posrf:orf,trigrf:iid,oprf:fastfoodl", "--m=8,16",
                      "--scales=0.5", "--n=16", "--batch=1", "--heads=1", "--head_dim=8",
                      "--seeds=2", "--out_dir", str(out), "--quiet"])
  data = _load(out / "approximation.json")
  rows = data["results"]
  assert len(rows) == 3 * 2
  for r in rows:
    assert "error" not in r, r
    assert r["matrix_err"] > 0 and r["output_err"] > 0 and r["draws"] == 2
  text = (out / "approximation.md").read_text()
  assert "| posrf | orf |" in text and "m=16" in text
  assert _is_png(out / "approximation_heatmap.png")


def test_approximation_error_falls_with_m_and_is_zero_for_exact_kernel():
  """The measured error is the estimator's: it falls as m grows (PosRF, small logits)."""
  inputs = approximation.gaussian_inputs(0, 0.5, 3, 1, 32, 1, 8)
  small = approximation.evaluate("posrf", "iid", 4, inputs, seed=0)
  large = approximation.evaluate("posrf", "iid", 256, inputs, seed=0)
  assert large["matrix_err"] < 0.5 * small["matrix_err"]
  assert large["output_err"] < 0.5 * small["output_err"]
  q, k, v, _ = inputs[0]
  attn, out = approximation._exact(q, k, v, None)  # pylint: disable=protected-access
  np.testing.assert_allclose(np.asarray(attn).sum(-1), 1.0, rtol=1e-5)
  assert float(approximation._rel_err(out, out)) == 0.0  # pylint: disable=protected-access


def test_crossover_and_fit():
  rows = [{"attention": "flash", "length": n, "median_ms": 1e-3 * n} for n in (1024, 2048, 4096)]
  rows += [{"attention": "posrf-orf", "length": n, "median_ms": 2.0} for n in (1024, 2048, 4096)]
  fits = speed.fit_sweep(rows)
  assert fits["flash"]["slope"] == pytest.approx(1.0)
  assert fits["posrf-orf"]["slope"] == pytest.approx(0.0, abs=1e-9)
  cross = fits["posrf-orf"]["crossover_vs_flash"]
  assert cross["length"] == pytest.approx(2000.0, rel=1e-6) and cross["note"] == "interpolated"


def test_common_helpers():
  assert common.parse_length("4k") == 4096 and common.parse_length("100") == 100
  assert common.parse_list("all") is None and common.parse_list("1,2", int) == [1, 2]
  assert common.select_pairs("posrf:gaus") == [("posrf", "iid")]
  with pytest.raises(ValueError, match="component:weight"):
    common.select_pairs("posrf")
  with pytest.raises(ValueError, match="Valid"):
    common.select_pairs("nope:orf")
  table = common.markdown_table(["a", "b"], [[1.23456, None], [float("nan"), 2]])
  assert table.splitlines()[2] == "| 1.23 | - |" and "nan" in table


def test_attention_table_is_the_output_error_of_rf_attention():
  """attention_table (a thin CLI over approximation) reports |rf - exact| / |exact| of the
  attention output, with W drawn from fold_in(key(seed + 1), draw) as its recorded tables."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from lra_benchmarks.benchmarks import attention_table  # pylint: disable=import-outside-toplevel
  from spectraformer_jax import attention, registry  # pylint: disable=import-outside-toplevel
  n, dim, seeds = 16, 8, 2
  with jax.default_matmul_precision("highest"):
    got = attention_table.relative_errors("posrf", "orf", [8, 16], n=n, dim=dim, scale=0.5,
                                          seeds=seeds)
    keys = jax.random.split(jax.random.key(0), 3)
    q, k = (0.5 * jax.random.normal(keys[i], (2, n, 2, dim)) for i in (0, 1))
    v = jax.random.normal(keys[2], (2, n, 2, dim))
    exact = attention.softmax_attention(q, k, v)
    comp, spec = registry.check_pair("posrf", "orf")
    for m in (8, 16):
      errs = []
      for s in range(seeds):
        wkey, _ = jax.random.split(jax.random.fold_in(jax.random.key(1), s))
        w = spec.matrix(*spec.init(wkey, m, dim))
        out = attention.rf_attention(q, k, v, w, component=comp)
        errs.append(float(jnp.linalg.norm(out - exact) / jnp.linalg.norm(exact)))
      assert got[m] == pytest.approx(np.mean(errs), rel=1e-4)


def test_kernel_speed_cpu_tiny(tmp_path):
  """Both modes on the CPU (Pallas in interpret mode): every row timed, errors small."""
  out = str(tmp_path)
  args = ["--tokens=128", "--heads=1", "--head_dim=16", "--m=16", "--warmup=1", "--reps=1",
          "--out_dir", out]
  result = kernel_speed.main(args + ["--lengths=64", "--implementations=pallas,xla",
                                     "--pallas_configs=16:32:4"])
  for row in result["rows"]:
    assert "error" not in row, row
    assert row["median_ms"] > 0 and row["pipelined_ms"] > 0
  for errors in result["accuracy"].values():
    assert max(errors.values()) < 0.05, result["accuracy"]
  result = kernel_speed.main(args + ["--mode=causal", "--lengths=64", "--chunks=32",
                                     "--chunk_lengths=64", "--causal_pallas_configs=32:4"])
  for row in result["rows"] + result["pallas"] + result["chunks"]:
    assert "error" not in row, row
  assert set(result["accuracy"]) == {"parallel", "recurrent", "pallas"}
  for errors in result["accuracy"].values():
    assert "error" not in errors and max(errors.values()) < 0.05, result["accuracy"]
  text = (tmp_path / "kernel_causal.md").read_text()
  assert "Pallas kernels" in text and "| 64 | 32:4 |" in text
