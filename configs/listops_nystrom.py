"""ListOps with the Nystromformer baseline (128 segment-mean landmarks)."""

from configs import base_baselines, base_listops


def get_config():
  return base_baselines.baseline(base_listops.get_config(), "nystrom")
