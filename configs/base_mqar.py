"""MQAR: multi-query associative recall (Zoology), generated; a causal decoder predicts the
value bound to each queried key.

Zoology's setting: vocabulary 8192, sequences of 256 tokens with 16 key-value pairs (sweep
``--config.task_options.num_kv_pairs``, e.g. 4 to 64), 100k training and 3k test sequences,
2 layers; here with the study's width (64, 2 heads) and m = 128 features.  Accuracy is over the
query positions (chance: 1 / (vocab_size / 2)).
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  config = base.get_base_config()
  config.task = "mqar"
  config.max_length = 256
  config.seq_len = 256
  config.task_options = ml_collections.ConfigDict(dict(
      vocab_size=8192, num_kv_pairs=16, num_train=100_000, num_test=3_000, seed=0,
      power_a=0.01))
  config.model.dropout_rate = 0.0
  config.model.attention_dropout_rate = 0.0
  config.batch_size = 64
  config.learning_rate = 1e-3
  config.weight_decay = 0.1
  config.warmup_steps = 1000
  config.num_train_steps = 20_000
  config.eval_every = 1000
  config.checkpoint_every = 1000
  config.num_eval_steps = -1
  config.patience = 0
  return config
