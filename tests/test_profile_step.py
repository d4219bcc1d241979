"""``profile_step`` on the CPU at a tiny size: every traced event is attributed, the parts add
up to the step's device time, and the name-stack classifier names the model's parts."""

import json

import pytest

from lra_benchmarks.benchmarks import profile_step


@pytest.mark.parametrize("op_name, part", [
    ("jit(train_step)/jvp(Classifier)/encoder/block_0/mlp/Dropout_1/jit(_bernoulli)/shift", "dropout"),
    ("jit(train_step)/jvp(Classifier)/encoder/block_1/attention/query/dot_general", "projections"),
    ("jit(train_step)/transpose(jvp(Classifier))/encoder/block_0/attention/vmap()/exp",
     "attention"),
    ("jit(train_step)/jvp(Classifier)/encoder/block_0/LayerNorm_0/rsqrt", "layernorm"),
    ("jit(train_step)/jvp(Classifier)/encoder/final_norm/mul", "layernorm"),
    ("jit(train_step)/transpose(jvp(Classifier))/encoder/block_1/mlp/Dense_0/dot_general", "mlp"),
    ("jit(train_step)/jvp(Classifier)/encoder/embed/jit(_take)/gather", "embedding"),
    ("jit(train_step)/jvp(Classifier)/head/logits/dot_general", "classifier"),
    ("jit(train_step)/jit(clip)/max", "optimizer"),
    ("jit(train_step)/sub", "optimizer"),
    ("state.params['encoder']['embed']['embedding']", "embedding"),
    ("", "other"),
    (None, "other"),
])
def test_part_of_names_the_model_part(op_name, part):
  assert profile_step.part_of(op_name) == part


def test_op_names_reads_the_metadata_of_instructions():
  text = ('%fusion.3 = f32[4]{0} fusion(%p), kind=kLoop, calls=%f, '
          'metadata={op_name="jit(train_step)/jvp(Classifier)/head/logits/add" '
          'source_file="m.py" source_line=3}\n'
          '%p = f32[4]{0} parameter(0)\n')
  assert profile_step.op_names(text) == {
      "fusion.3": "jit(train_step)/jvp(Classifier)/head/logits/add"}


def test_profile_cpu_tiny(tmp_path):
  result = profile_step.main([
      "--tasks=listops", "--attentions=posrf-qmc", "--batch=2", "--length=32", "--m=8",
      "--model=num_layers=1,emb_dim=16,qkv_dim=16,mlp_dim=32", "--warmup=1", "--steps=2",
      "--out_dir", str(tmp_path)])
  (row,) = result["rows"]
  assert "error" not in row, row
  assert row["events_per_step"] > 10
  parts = row["parts_ms_per_step"]
  assert sum(parts.values()) == pytest.approx(row["device_ms_per_step"], rel=1e-6)
  for part in ("attention", "projections", "mlp", "dropout", "optimizer"):
    assert parts.get(part, 0.0) > 0.0, (part, parts)
  assert row["bytes_accessed_mib"] > 0
  assert json.loads((tmp_path / "profile_step.json").read_text())["rows"][0]["task"] == "listops"
  assert "| listops | posrf-qmc |" in (tmp_path / "profile_step.md").read_text()
