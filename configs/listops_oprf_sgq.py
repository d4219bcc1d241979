"""ListOps with Spectraformer OPRF-SGQ attention (m = 128 features)."""

from configs import base, base_listops


def get_config():
  return base.attention(base_listops.get_config(), "spectraformer", component="oprf", weight="sgq")
