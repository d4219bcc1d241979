"""Byte-level LM with Spectraformer POSRF-ORF attention (m = 128 features)."""

from configs import base, base_lm


def get_config():
  return base.attention(base_lm.get_config(), "spectraformer", component="posrf",
                        weight="orf")
