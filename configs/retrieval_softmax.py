"""Retrieval with exact softmax attention (the Original Transformer baseline)."""

from configs import base, base_retrieval


def get_config():
  return base.attention(base_retrieval.get_config(), "softmax")
