"""Image with the kernelized baseline (exact unnormalised Gaussian-kernel attention)."""

from configs import base_baselines, base_image


def get_config():
  return base_baselines.baseline(base_image.get_config(), "kernelized")
