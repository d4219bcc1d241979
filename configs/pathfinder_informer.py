"""Pathfinder with the Informer baseline (ProbSparse attention, factor 5)."""

from configs import base_baselines, base_pathfinder


def get_config():
  return base_baselines.baseline(base_pathfinder.get_config(), "informer")
