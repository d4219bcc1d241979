"""Image with the Linformer baseline (projected length k = 256)."""

from configs import base_baselines, base_image


def get_config():
  return base_baselines.baseline(base_image.get_config(), "linformer")
