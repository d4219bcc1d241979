"""Pathfinder-32, hard split (2 classes).

Hyperparameters of the Spectraformer study: batch 128, learning rate 0.0002, warm-up 312,
evaluation every 500 steps on 156 validation batches, 50k steps, patience 10.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  config = base.get_base_config()
  config.task = "pathfinder"
  config.max_length = 1024
  config.seq_len = 1024
  config.batch_size = 128
  config.learning_rate = 0.0002
  config.warmup_steps = 312
  config.eval_every = 500
  config.checkpoint_every = 500
  config.num_eval_steps = 156
  return config
