"""Byte-level LM: the corpus reader, its windows and seeded splits, one-line errors, and a tiny
causal decoder that trains through the trainer and reports bits per byte."""

import math

import numpy as np
import pytest

from configs import base_lm
from lra_benchmarks import train_lib
from lra_benchmarks.data import DataNotFoundError, get_task
from lra_benchmarks.data import lm


@pytest.fixture
def corpus(tmp_path):
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "two.txt").write_bytes(b"second file \xc3\xa9")
  (tmp_path / "a.txt").write_bytes(b"first file. " * 20)
  (tmp_path / "skip.md").write_bytes(b"not text")
  return tmp_path


def test_reads_every_txt_file_recursively_in_sorted_order_as_bytes(corpus):
  tokens = lm.corpus_tokens(str(corpus))
  expected = b"first file. " * 20 + b"\n" + b"second file \xc3\xa9"
  np.testing.assert_array_equal(tokens, np.frombuffer(expected, np.uint8) + 1)


def test_splits_partition_the_windows_and_targets_are_the_next_bytes(corpus):
  task = get_task("lm")
  splits = {s: task.load(s, data_dir=str(corpus), max_length=8, seed=1)
            for s in ("train", "validation", "test")}
  tokens = lm.corpus_tokens(str(corpus))
  windows = lm.windows(tokens, 8)
  count = (len(tokens) - 1) // 8
  assert sum(len(s["inputs"]) for s in splits.values()) == len(windows["inputs"]) == count
  rows = {tuple(r) for s in splits.values() for r in s["inputs"]}
  assert rows == {tuple(r) for r in windows["inputs"]}  # a partition of the windows
  for split in splits.values():
    np.testing.assert_array_equal(split["inputs"][:, 1:], split["targets"][:, :-1])
  # Consecutive windows overlap by one token: every byte but the first is a target once.
  np.testing.assert_array_equal(windows["targets"].reshape(-1), tokens[1:1 + count * 8])
  again = task.load("test", data_dir=str(corpus), max_length=8, seed=1)
  np.testing.assert_array_equal(again["inputs"], splits["test"]["inputs"])


def test_missing_folder_and_folder_without_txt_are_one_line_errors(tmp_path):
  with pytest.raises(DataNotFoundError, match="is not a folder") as missing:
    get_task("lm").load("train", data_dir=str(tmp_path / "nowhere"))
  (tmp_path / "notes.md").write_text("no text files here")
  with pytest.raises(DataNotFoundError, match="holds no .txt file") as empty:
    get_task("lm").load("train", data_dir=str(tmp_path))
  for error in (missing, empty):
    assert "\n" not in str(error.value) and str(tmp_path) in str(error.value)
  with pytest.raises(ValueError, match="too few for"):
    get_task("lm").load("train", max_length=4000)


def test_tiny_decoder_trains_on_the_built_in_corpus_and_reports_bits_per_byte(tmp_path):
  config = base_lm.get_config()
  config.max_length = config.seq_len = 32
  # Softmax: the cheapest causal attention to compile (MQAR's test trains random features).
  config.model.update(num_layers=1, emb_dim=32, qkv_dim=32, mlp_dim=64, attention="softmax")
  config.update(batch_size=16, num_train_steps=40, warmup_steps=5, learning_rate=1e-2,
                eval_every=40, checkpoint_every=40, log_every=20, progress_bar=False)
  results = train_lib.train_and_evaluate(config, str(tmp_path))
  assert results["test_bits_per_byte"] == pytest.approx(results["test_loss"] / math.log(2))
  # Uniform over the 257 ids costs log2(257) = 8.006 bits; the bytes of English text are far
  # from uniform (the built-in corpus's unigram entropy is about 4.3 bits).
  assert results["test_bits_per_byte"] < 6.0
  assert results["test_examples"] == get_task("lm").load("test", max_length=32)["targets"].size
