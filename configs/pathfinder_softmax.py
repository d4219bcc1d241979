"""Pathfinder with exact softmax attention (the Original Transformer baseline)."""

from configs import base, base_pathfinder


def get_config():
  return base.attention(base_pathfinder.get_config(), "softmax")
