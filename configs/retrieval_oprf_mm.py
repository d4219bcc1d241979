"""Retrieval with Spectraformer OPRF-MM attention (m = 128 features)."""

from configs import base, base_retrieval


def get_config():
  return base.attention(base_retrieval.get_config(), "spectraformer", component="oprf", weight="mm")
