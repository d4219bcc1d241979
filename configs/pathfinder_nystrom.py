"""Pathfinder with the Nystromformer baseline (128 segment-mean landmarks)."""

from configs import base_baselines, base_pathfinder


def get_config():
  return base_baselines.baseline(base_pathfinder.get_config(), "nystrom")
