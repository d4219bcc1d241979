"""Image with the Skyformer baseline (Nystrom-approximated Gaussian kernel, 128 landmarks)."""

from configs import base_baselines, base_image


def get_config():
  return base_baselines.baseline(base_image.get_config(), "skyformer")
