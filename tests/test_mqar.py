"""MQAR: the generator is seeded and correct, the registry and configs name it, a tiny causal
decoder trains on it through the trainer and beats chance, and non-causal attention is refused."""

import numpy as np
import pytest

from configs import base_mqar
from lra_benchmarks import train_lib
from lra_benchmarks.data import IGNORE, get_task
from lra_benchmarks.data import mqar

OPTIONS = dict(vocab_size=64, num_kv_pairs=4, num_train=64, num_test=32)


def test_generator_is_a_function_of_the_seed_and_splits_differ():
  task = get_task("mqar")
  a = task.load("train", max_length=48, seed=3, **OPTIONS)
  b = task.load("train", max_length=48, seed=3, **OPTIONS)
  c = task.load("train", max_length=48, seed=4, **OPTIONS)
  test = task.load("test", max_length=48, seed=3, **OPTIONS)
  np.testing.assert_array_equal(a["inputs"], b["inputs"])
  np.testing.assert_array_equal(a["targets"], b["targets"])
  assert not np.array_equal(a["inputs"], c["inputs"])
  assert not np.array_equal(a["inputs"][:32], test["inputs"])
  assert a["inputs"].shape == a["targets"].shape == (64, 48)
  assert a["inputs"].dtype == a["targets"].dtype == np.int32


def test_every_query_is_a_key_and_its_target_the_value_bound_to_it():
  k, vocab = 6, 40
  data = mqar.generate(200, 64, vocab, k, rng=np.random.default_rng(0))
  for row, target in zip(data["inputs"], data["targets"]):
    keys, values = row[0:2 * k:2], row[1:2 * k:2]
    assert len(set(keys)) == k and len(set(values)) == k
    assert keys.min() >= 1 and keys.max() < vocab // 2 <= values.min() and values.max() < vocab
    bound = dict(zip(keys, values))
    queries = np.flatnonzero(target != IGNORE)
    assert len(queries) == k and queries.min() >= 2 * k
    assert sorted(row[queries]) == sorted(keys)  # every key queried exactly once
    assert all(target[q] == bound[row[q]] for q in queries)
    assert row.min() >= 1  # token 0 is never used


def test_early_gaps_are_more_likely_and_bad_sizes_are_clear_errors():
  data = mqar.generate(2000, 128, 64, 2, rng=np.random.default_rng(1))
  first = np.argmax(data["targets"] != IGNORE, axis=1) - 4
  assert np.mean(first < 16) > 0.5  # power law: most first queries within 8 slots of 60
  with pytest.raises(ValueError, match="max_length=12 is too short"):
    mqar.generate(1, 12, 64, 4, rng=np.random.default_rng(0))
  with pytest.raises(ValueError, match="vocab_size=8 is too small"):
    mqar.generate(1, 64, 8, 4, rng=np.random.default_rng(0))
  with pytest.raises(ValueError, match="data_dir"):
    get_task("mqar").load("train", data_dir="/somewhere", **OPTIONS)


def _tiny(**model):
  config = base_mqar.get_config()
  config.max_length = config.seq_len = 24
  config.task_options.update(vocab_size=16, num_kv_pairs=2, num_train=512, num_test=128)
  config.model.update(num_layers=1, emb_dim=32, qkv_dim=32, mlp_dim=64, num_features=32,
                      **model)
  config.update(batch_size=32, num_train_steps=60, warmup_steps=10, learning_rate=1e-2,
                weight_decay=0.0, eval_every=60, checkpoint_every=60, log_every=20,
                progress_bar=False)
  return config


def test_tiny_decoder_trains_through_the_trainer_and_beats_chance(tmp_path):
  config = _tiny(attention="spectraformer", component="posrf", weight="orf")
  results = train_lib.train_and_evaluate(config, str(tmp_path))
  chance = 1 / (16 // 2)  # the values are the upper half of the vocabulary
  assert results["test_examples"] == 128 * 2  # accuracy over the query positions only
  # 256 binomial query outcomes: 3 standard deviations above chance is 0.21.
  assert results["test_accuracy"] > chance + 3 * np.sqrt(chance * (1 - chance) / 256)


@pytest.mark.parametrize("attention,component,match", [
    ("nystrom", "posrf", "baselines are bidirectional"),
    ("spectraformer", "hrf", "has no causal form"),
])
def test_non_causal_attention_is_refused(tmp_path, attention, component, match):
  config = _tiny(attention=attention, component=component, weight="iid")
  with pytest.raises(ValueError, match=match):
    train_lib.train_and_evaluate(config, str(tmp_path))
