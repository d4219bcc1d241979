"""Retrieval with the Informer baseline (ProbSparse attention, factor 5)."""

from configs import base_baselines, base_retrieval


def get_config():
  return base_baselines.baseline(base_retrieval.get_config(), "informer")
