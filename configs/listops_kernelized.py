"""ListOps with the kernelized baseline (exact unnormalised Gaussian-kernel attention)."""

from configs import base_baselines, base_listops


def get_config():
  return base_baselines.baseline(base_listops.get_config(), "kernelized")
