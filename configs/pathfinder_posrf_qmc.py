"""Pathfinder with Spectraformer PosRF-QMC attention (m = 128 features)."""

from configs import base, base_pathfinder


def get_config():
  return base.attention(base_pathfinder.get_config(), "spectraformer", component="posrf", weight="qmc")
