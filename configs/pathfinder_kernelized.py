"""Pathfinder with the kernelized baseline (exact unnormalised Gaussian-kernel attention)."""

from configs import base_baselines, base_pathfinder


def get_config():
  return base_baselines.baseline(base_pathfinder.get_config(), "kernelized")
