"""ListOps with the Informer baseline (ProbSparse attention, factor 5)."""

from configs import base_baselines, base_listops


def get_config():
  return base_baselines.baseline(base_listops.get_config(), "informer")
