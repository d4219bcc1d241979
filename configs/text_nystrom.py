"""Text with the Nystromformer baseline (128 segment-mean landmarks)."""

from configs import base_baselines, base_text


def get_config():
  return base_baselines.baseline(base_text.get_config(), "nystrom")
