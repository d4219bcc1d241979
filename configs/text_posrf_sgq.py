"""Text with Spectraformer PosRF-SGQ attention (m = 128 features)."""

from configs import base, base_text


def get_config():
  return base.attention(base_text.get_config(), "spectraformer", component="posrf", weight="sgq")
