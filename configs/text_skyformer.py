"""Text with the Skyformer baseline (Nystrom-approximated Gaussian kernel, 128 landmarks)."""

from configs import base_baselines, base_text


def get_config():
  return base_baselines.baseline(base_text.get_config(), "skyformer")
