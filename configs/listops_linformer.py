"""ListOps with the Linformer baseline (projected length k = 256)."""

from configs import base_baselines, base_listops


def get_config():
  return base_baselines.baseline(base_listops.get_config(), "linformer")
