"""Retrieval with the Nystromformer baseline (128 segment-mean landmarks)."""

from configs import base_baselines, base_retrieval


def get_config():
  return base_baselines.baseline(base_retrieval.get_config(), "nystrom")
