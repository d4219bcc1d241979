"""Text: IMDB byte-level classification (2 classes).

Hyperparameters of the Spectraformer study: batch 32, learning rate 0.0001, warm-up 80,
evaluation every 500 steps on 200 validation batches, 50k steps, patience 10.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  config = base.get_base_config()
  config.task = "text"
  config.max_length = 4000
  config.seq_len = 4096
  config.batch_size = 32
  config.learning_rate = 0.0001
  config.warmup_steps = 80
  config.eval_every = 500
  config.checkpoint_every = 500
  config.num_eval_steps = 200
  return config
