"""Pathfinder with the Linformer baseline (projected length k = 256)."""

from configs import base_baselines, base_pathfinder


def get_config():
  return base_baselines.baseline(base_pathfinder.get_config(), "linformer")
