"""Image: grayscale CIFAR-10 pixels as tokens (10 classes).

Hyperparameters of the Spectraformer study: batch 256, learning rate 0.0001, warm-up 175,
evaluation every 50 steps on 20 validation batches, 50k steps; the study's Image config
sets no patience, so early stopping is off.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  config = base.get_base_config()
  config.task = "image"
  config.max_length = 1024
  config.seq_len = 1024
  config.batch_size = 256
  config.learning_rate = 0.0001
  config.warmup_steps = 175
  config.eval_every = 50
  config.checkpoint_every = 500
  config.num_eval_steps = 20
  config.patience = 0
  return config
