"""Image with the Nystromformer baseline (128 segment-mean landmarks)."""

from configs import base_baselines, base_image


def get_config():
  return base_baselines.baseline(base_image.get_config(), "nystrom")
