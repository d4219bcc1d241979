"""Text with the kernelized baseline (exact unnormalised Gaussian-kernel attention)."""

from configs import base_baselines, base_text


def get_config():
  return base_baselines.baseline(base_text.get_config(), "kernelized")
