"""A small ListOps run for a laptop: about two minutes on a 2-core CPU, data generation included.

Same task, data and trainer as the study's ``listops_*`` configs, at a size a CPU trains in a
minute: the first 512 tokens of each expression, a one-layer model of width 32 with PosRF-QMC
attention, 300 steps at a higher learning rate, in float32 (a CPU gains nothing from bfloat16).
"""

import ml_collections

from lra_benchmarks import config_lib


def get_config() -> ml_collections.ConfigDict:
  config = config_lib.get_config("listops,posrf,qmc")
  config.max_length = 512
  config.seq_len = 512
  config.model.num_layers = 1
  config.model.emb_dim = 32
  config.model.qkv_dim = 32
  config.model.mlp_dim = 64
  config.model.classifier_dim = 64
  config.model.num_features = 32
  config.model.dtype = "float32"
  config.learning_rate = 1e-3
  config.warmup_steps = 30
  config.num_train_steps = 300
  config.eval_every = 100
  config.num_eval_steps = 16
  config.checkpoint_every = 300
  config.log_every = 50
  config.patience = 0
  return config
