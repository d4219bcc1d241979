"""MQAR with Spectraformer POSRF-ORF attention (m = 128 features)."""

from configs import base, base_mqar


def get_config():
  return base.attention(base_mqar.get_config(), "spectraformer", component="posrf",
                        weight="orf")
