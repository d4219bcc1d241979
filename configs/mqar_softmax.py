"""MQAR with exact softmax attention."""

from configs import base, base_mqar


def get_config():
  return base.attention(base_mqar.get_config(), "softmax")
