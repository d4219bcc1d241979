"""ListOps (10 classes, generated when no data_dir is given).

Hyperparameters of the Spectraformer study: batch 32, learning rate 0.0001, warm-up 1000,
evaluation every 500 steps on 62 validation batches, 50k steps, patience 10.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  config = base.get_base_config()
  config.task = "listops"
  config.max_length = 2000
  config.seq_len = 2048
  config.batch_size = 32
  config.learning_rate = 0.0001
  config.warmup_steps = 1000
  config.eval_every = 500
  config.checkpoint_every = 500
  config.num_eval_steps = 62
  return config
