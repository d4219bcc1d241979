"""Pathfinder with the Skyformer baseline (Nystrom-approximated Gaussian kernel, 128 landmarks)."""

from configs import base_baselines, base_pathfinder


def get_config():
  return base_baselines.baseline(base_pathfinder.get_config(), "skyformer")
