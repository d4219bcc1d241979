"""Retrieval with Spectraformer SADERF-SORF attention (m = 128 features)."""

from configs import base, base_retrieval


def get_config():
  return base.attention(base_retrieval.get_config(), "spectraformer", component="saderf", weight="sorf")
