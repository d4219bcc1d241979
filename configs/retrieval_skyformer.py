"""Retrieval with the Skyformer baseline (Nystrom-approximated Gaussian kernel, 128 landmarks)."""

from configs import base_baselines, base_retrieval


def get_config():
  return base_baselines.baseline(base_retrieval.get_config(), "skyformer")
