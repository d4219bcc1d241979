"""Image with the BigBird baseline (blocks of 64, 3 random blocks)."""

from configs import base_baselines, base_image


def get_config():
  return base_baselines.baseline(base_image.get_config(), "bigbird")
