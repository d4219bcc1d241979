"""ListOps with exact softmax attention (the Original Transformer baseline)."""

from configs import base, base_listops


def get_config():
  return base.attention(base_listops.get_config(), "softmax")
