"""Image with Spectraformer OPRF-QMC attention (m = 128 features)."""

from configs import base, base_image


def get_config():
  return base.attention(base_image.get_config(), "spectraformer", component="oprf", weight="qmc")
