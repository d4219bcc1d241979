"""Byte-level causal language modelling on a folder of .txt files (``--config.data_dir``;
unset: the small built-in corpus).  Metric: bits per byte (``test_bits_per_byte``).

Windows of 512 bytes, 10% / 10% of them for validation / test (``config.task_options``); the
study's model (2 layers, width 64, 2 heads, m = 128 features) as a causal decoder.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  config = base.get_base_config()
  config.task = "lm"
  config.max_length = 512
  config.seq_len = 512
  config.task_options = ml_collections.ConfigDict(dict(
      seed=0, validation_fraction=0.1, test_fraction=0.1))
  config.batch_size = 32
  config.learning_rate = 1e-3
  config.weight_decay = 0.1
  config.warmup_steps = 1000
  config.num_train_steps = 20_000
  config.eval_every = 1000
  config.checkpoint_every = 1000
  config.num_eval_steps = -1
  config.patience = 0
  return config
