"""Byte-level LM with exact softmax attention."""

from configs import base, base_lm


def get_config():
  return base.attention(base_lm.get_config(), "softmax")
