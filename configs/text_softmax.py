"""Text with exact softmax attention (the Original Transformer baseline)."""

from configs import base, base_text


def get_config():
  return base.attention(base_text.get_config(), "softmax")
