"""Retrieval with the Reformer baseline (LSH attention, 2 hashes)."""

from configs import base_baselines, base_retrieval


def get_config():
  return base_baselines.baseline(base_retrieval.get_config(), "reformer")
