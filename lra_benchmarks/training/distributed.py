"""Several processes (hosts, or one process per GPU) as one JAX run: the arguments of
``jax.distributed.initialize`` from flags or the environment, and the call itself.

Each process then sees every device of the run (``jax.devices()``) but feeds only its own
(``jax.local_devices()``); the trainer already loads ``batch_size // jax.process_count()``
examples per process and writes logs and results on process 0 only.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

# The environment variables read when a flag is not given. JAX itself reads only the first; the
# other two let a launcher (a shell loop, a job script) set everything the same way.
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"


class DistributedError(ValueError):
  """A bad multi-process setting; the message names the value and what is valid."""


def _integer(name: str, value: Optional[str], minimum: int) -> Optional[int]:
  """``value`` as an int >= ``minimum`` (None stays None); DistributedError otherwise."""
  if value is None or value == "":
    return None
  try:
    number = int(value)
  except (TypeError, ValueError):
    number = minimum - 1
  if number < minimum:
    raise DistributedError(f"{name}={value!r}: expected an integer >= {minimum}.")
  return number


def initialize_arguments(coordinator_address: Optional[str] = None,
                         num_processes: Optional[int] = None,
                         process_id: Optional[int] = None,
                         environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
  """The keyword arguments of ``jax.distributed.initialize`` for this process.

  Each argument is the flag's value, else its environment variable (``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), else left out so that JAX detects it (Cloud TPU,
  Slurm, Open MPI, Kubernetes). Given settings must be complete enough to mean one thing:
  ``num_processes`` and ``process_id`` come together, and ``0 <= process_id < num_processes``.
  """
  address = coordinator_address or environ.get(COORDINATOR_ENV) or None
  count = (num_processes if num_processes is not None else
           _integer(NUM_PROCESSES_ENV, environ.get(NUM_PROCESSES_ENV), 1))
  index = (process_id if process_id is not None else
           _integer(PROCESS_ID_ENV, environ.get(PROCESS_ID_ENV), 0))
  if (count is None) != (index is None):
    raise DistributedError(
        f"num_processes={count} with process_id={index}: give both (--num_processes and "
        f"--process_id, or {NUM_PROCESSES_ENV} and {PROCESS_ID_ENV}) or neither (JAX detects "
        "them on Cloud TPU, Slurm, Open MPI and Kubernetes).")
  if count is not None and not 0 <= index < count:
    raise DistributedError(f"process_id={index}: must be in 0..{count - 1} for "
                           f"num_processes={count}.")
  if count is not None and count > 1 and address is None:
    raise DistributedError(
        f"num_processes={count} needs a coordinator: pass --coordinator_address=HOST:PORT (the "
        f"address of process 0) or set {COORDINATOR_ENV}.")
  arguments: dict[str, Any] = {}
  if address is not None:
    arguments["coordinator_address"] = address
  if count is not None:
    arguments.update(num_processes=count, process_id=index)
  return arguments


def requested(flag: bool, environ: Mapping[str, str] = os.environ) -> bool:
  """Whether to start the distributed system: ``--jax_distributed``, or a launcher that set
  ``JAX_COORDINATOR_ADDRESS``."""
  return flag or bool(environ.get(COORDINATOR_ENV))


def initialize(arguments: Mapping[str, Any]) -> None:
  """``jax.distributed.initialize(**arguments)``, with cross-process collectives (gloo) set
  for CPU devices first (without them a CPU computation cannot span processes; JAX 0.10's
  default is gloo already, the setting keeps it so). Must run before anything touches a device.
  """
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**arguments)
