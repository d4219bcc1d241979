"""ListOps with the Skyformer baseline (Nystrom-approximated Gaussian kernel, 128 landmarks)."""

from configs import base_baselines, base_listops


def get_config():
  return base_baselines.baseline(base_listops.get_config(), "skyformer")
