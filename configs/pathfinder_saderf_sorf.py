"""Pathfinder with Spectraformer SADERF-SORF attention (m = 128 features)."""

from configs import base, base_pathfinder


def get_config():
  return base.attention(base_pathfinder.get_config(), "spectraformer", component="saderf", weight="sorf")
