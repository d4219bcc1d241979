"""Every LRA config by name: ``--config=configs/lra.py:SPEC``.

SPEC is ``TASK`` (the task's base), ``TASK,KIND`` (``softmax``, ``flash`` or a baseline such as
``nystrom``) or ``TASK,COMPONENT,WEIGHT`` (Spectraformer attention), e.g.
``--config=configs/lra.py:text,posrf,qmc``; ``lra_benchmarks.config_lib`` says more.
"""

from lra_benchmarks import config_lib


def get_config(spec: str = "listops"):
  return config_lib.get_config(spec)
