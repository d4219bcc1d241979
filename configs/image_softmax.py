"""Image with exact softmax attention (the Original Transformer baseline)."""

from configs import base, base_image


def get_config():
  return base.attention(base_image.get_config(), "softmax")
