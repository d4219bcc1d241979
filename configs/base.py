"""Defaults shared by every LRA task: the Spectraformer / Skyformer setup.

Task bases (``base_<task>.py``) override the per-task fields; combination files
(``<task>_<component>_<weight>.py``, ``<task>_softmax.py``, ``<task>_flash.py``) set the
attention. Every field can be overridden on the command line, e.g.
``--config.model.num_features=256`` (the config is locked: a typo is an error).
"""

import ml_collections
from ml_collections import config_dict

from spectraformer_jax import pallas_attention

# The combinations the Spectraformer study evaluated on all five LRA tasks (the results table
# of the official repository, cruiseresearchgroup/spectraformer): 3 components x 6 weights.
STUDY_COMPONENTS = ("posrf", "oprf", "saderf")
STUDY_WEIGHTS = ("orf", "sorf", "qmc", "mm", "sgq", "fastfoodl")
TASKS = ("listops", "text", "retrieval", "image", "pathfinder")


def get_base_config() -> ml_collections.ConfigDict:
  """Task-independent defaults. Task bases fill in the ``None``-free task fields."""
  config = ml_collections.ConfigDict()
  config.task = "listops"
  # Data directory of the task (None: the task's default; ListOps generates its data).
  config.data_dir = config_dict.placeholder(str)
  config.max_length = 2000  # tokens kept per example (as LRA)
  config.seq_len = 2048     # model length: max_length rounded up to a power of two (as the study)
  config.seed = 0

  model = ml_collections.ConfigDict()
  model.num_layers = 2
  model.emb_dim = 64
  model.num_heads = 2
  model.qkv_dim = 64        # 2 heads of 32
  model.mlp_dim = 128
  model.classifier_dim = 128
  model.dropout_rate = 0.1
  model.attention_dropout_rate = 0.1
  model.pooling = "mean"    # "mean" (over real tokens) or "cls"
  model.attention = "softmax"  # "softmax" | "flash" | "spectraformer"
  model.component = "posrf"    # spectraformer only: component function f
  model.weight = "iid"         # spectraformer only: weight matrix W
  model.num_features = 128     # spectraformer only: m
  model.redraw = "never"       # "never" | "always" (fresh W every call)
  model.redraw_every = 0       # > 0: the trainer redraws fixed W every this many steps
  model.fused = True           # positive components: recompute feature maps in the backward pass
  model.implementation = pallas_attention.DEFAULT_IMPLEMENTATION  # "auto" | "pallas" | "xla"
  model.dtype = "float32"      # compute dtype ("float32" | "bfloat16"); params stay float32
  config.model = model

  # Optimisation (study: AdamW, betas (0.9, 0.999), eps 1e-6, no weight decay, OneCycle-linear
  # schedule, gradients clipped by value at 1).
  config.batch_size = 32     # global batch, split over all devices and hosts
  config.eval_batch_size = 0  # 0: same as batch_size
  config.learning_rate = 1e-4
  config.schedule = "linear"  # "linear" (warm-up then linear decay) | "rsqrt" (LRA) | "constant"
  config.warmup_steps = 1000
  config.warmup_div_factor = 25.0  # linear: start at learning_rate / this (OneCycleLR as the study)
  config.final_div_factor = 1e4    # linear: end at learning_rate / (warmup_div_factor * this)
  config.weight_decay = 0.0
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.adam_eps = 1e-6
  config.grad_clip_value = 1.0  # clip each gradient entry to [-v, v]; 0 disables
  config.grad_clip_norm = 0.0   # clip by global norm; 0 disables

  config.num_train_steps = 50_000
  config.eval_every = 500
  config.num_eval_steps = -1     # batches per validation; -1: the whole validation split
  config.patience = 10           # stop after this many evaluations without improvement; 0: never
  config.checkpoint_every = 500
  config.checkpoint_every_seconds = 300.0  # also checkpoint when this long since the last; 0: off
  config.keep_checkpoints = 2
  # Model selection: "test" validates on the loader's validation split (as LRA and the study);
  # "heldout" validates on a fixed fraction of train and touches the test split once, at the end.
  config.validation = "test"
  config.heldout_fraction = 0.1
  # Reusing a workdir whose config.json differs in what is trained is an error; "force" resumes.
  config.resume = "auto"
  # Device memory per process: "" (JAX's default), "auto" (allocate on demand, for several
  # runs on one device) or a fraction such as "0.3" (set before JAX starts; CLI only).
  config.memory_fraction = ""
  config.log_every = 100
  config.progress_bar = True
  return config


def attention(config: ml_collections.ConfigDict, kind: str, component: str = "posrf",
              weight: str = "iid") -> ml_collections.ConfigDict:
  """Sets the attention of ``config`` (used by the combination files)."""
  config.model.attention = kind
  config.model.component = component
  config.model.weight = weight
  return config
