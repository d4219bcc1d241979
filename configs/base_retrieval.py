"""Retrieval: AAN document matching, dual encoder (2 classes).

Hyperparameters of the Spectraformer study: batch 16, learning rate 0.0002, warm-up 800,
evaluation every 1000 steps on 300 validation batches, 50k steps, patience 10.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  config = base.get_base_config()
  config.task = "retrieval"
  config.max_length = 4000
  config.seq_len = 4096
  config.batch_size = 16
  config.learning_rate = 0.0002
  config.warmup_steps = 800
  config.eval_every = 1000
  config.checkpoint_every = 1000
  config.num_eval_steps = 300
  return config
