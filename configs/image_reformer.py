"""Image with the Reformer baseline (LSH attention, 2 hashes)."""

from configs import base_baselines, base_image


def get_config():
  return base_baselines.baseline(base_image.get_config(), "reformer")
