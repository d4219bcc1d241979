"""Byte-level LM with softmax attention through jax.nn.dot_product_attention."""

from configs import base, base_lm


def get_config():
  config = base.attention(base_lm.get_config(), "flash")
  config.model.dtype = "bfloat16"  # cuDNN flash attention runs on bf16/fp16 inputs only
  return config
