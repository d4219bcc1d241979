"""Text with the Linformer baseline (projected length k = 256)."""

from configs import base_baselines, base_text


def get_config():
  return base_baselines.baseline(base_text.get_config(), "linformer")
