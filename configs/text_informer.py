"""Text with the Informer baseline (ProbSparse attention, factor 5)."""

from configs import base_baselines, base_text


def get_config():
  return base_baselines.baseline(base_text.get_config(), "informer")
