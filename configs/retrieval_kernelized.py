"""Retrieval with the kernelized baseline (exact unnormalised Gaussian-kernel attention)."""

from configs import base_baselines, base_retrieval


def get_config():
  return base_baselines.baseline(base_retrieval.get_config(), "kernelized")
