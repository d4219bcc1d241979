"""Text with the BigBird baseline (blocks of 64, 3 random blocks)."""

from configs import base_baselines, base_text


def get_config():
  return base_baselines.baseline(base_text.get_config(), "bigbird")
