"""ListOps with the Reformer baseline (LSH attention, 2 hashes)."""

from configs import base_baselines, base_listops


def get_config():
  return base_baselines.baseline(base_listops.get_config(), "reformer")
