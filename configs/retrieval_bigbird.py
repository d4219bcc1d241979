"""Retrieval with the BigBird baseline (blocks of 64, 3 random blocks)."""

from configs import base_baselines, base_retrieval


def get_config():
  return base_baselines.baseline(base_retrieval.get_config(), "bigbird")
