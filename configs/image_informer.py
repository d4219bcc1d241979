"""Image with the Informer baseline (ProbSparse attention, factor 5)."""

from configs import base_baselines, base_image


def get_config():
  return base_baselines.baseline(base_image.get_config(), "informer")
