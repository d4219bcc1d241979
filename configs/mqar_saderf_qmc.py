"""MQAR with Spectraformer SADERF-QMC attention (m = 128 features).

Causal attention gives SADERF's data-dependent statistics their neutral values
(PosRF's estimator), so no statistic sees a future token."""

from configs import base, base_mqar


def get_config():
  return base.attention(base_mqar.get_config(), "spectraformer", component="saderf",
                        weight="qmc")
