"""Text with the Reformer baseline (LSH attention, 2 hashes)."""

from configs import base_baselines, base_text


def get_config():
  return base_baselines.baseline(base_text.get_config(), "reformer")
