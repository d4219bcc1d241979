"""The efficient-attention baselines of the study as ``config.model.attention`` kinds.

``configs/<task>_<kind>.py`` (kind in ``BASELINES``) call ``baseline(task_config, kind)``, which
sets the attention and adds the kind's hyperparameters to ``config.model`` with the study's
values (``spectraformer_jax.baselines.study_hyperparameters``), so they can be overridden on
the command line, e.g. ``--config.model.num_landmarks=64``.
"""

import ml_collections

from configs import base
from spectraformer_jax import baselines

BASELINES = tuple(baselines.KINDS)


def baseline(config: ml_collections.ConfigDict, kind: str) -> ml_collections.ConfigDict:
  """Sets ``config``'s attention to the baseline ``kind`` with the study's hyperparameters."""
  config = base.attention(config, kind)
  for field, value in baselines.study_hyperparameters(kind).items():
    config.model[field] = value
  return config
