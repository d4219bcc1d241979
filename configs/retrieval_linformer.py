"""Retrieval with the Linformer baseline (projected length k = 256)."""

from configs import base_baselines, base_retrieval


def get_config():
  return base_baselines.baseline(base_retrieval.get_config(), "linformer")
