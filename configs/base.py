"""Defaults shared by every LRA task (the Spectraformer / Skyformer setup), for config files
built on them: ``get_base_config()`` and ``attention(config, kind, component, weight)``.

The defaults live in ``lra_benchmarks.config_lib`` (model fields: ``models.ModelConfig``).
"""

from lra_benchmarks.config_lib import STUDY_COMPONENTS, STUDY_WEIGHTS, TASKS
from lra_benchmarks.config_lib import base_config as get_base_config
from lra_benchmarks.config_lib import set_attention as attention

__all__ = ["STUDY_COMPONENTS", "STUDY_WEIGHTS", "TASKS", "attention", "get_base_config"]
