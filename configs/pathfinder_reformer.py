"""Pathfinder with the Reformer baseline (LSH attention, 2 hashes)."""

from configs import base_baselines, base_pathfinder


def get_config():
  return base_baselines.baseline(base_pathfinder.get_config(), "reformer")
