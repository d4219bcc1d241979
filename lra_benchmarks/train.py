r"""Trains and evaluates an LRA model with any attention.

  python -m lra_benchmarks.train --config=configs/listops_posrf_qmc.py \
      [--workdir=DIR] [--config.num_train_steps=200] [--config.data_dir=PATH]
  python -m lra_benchmarks.train --checkpoint=DIR     # evaluate a saved model (or --eval_only)

The config is locked: overriding a field that does not exist is an error. A run in a ``workdir``
that holds checkpoints of the same config resumes from the newest readable one; Ctrl-C or
SIGTERM saves a checkpoint first. Results go to ``DIR/results.json``. ``--help`` lists the
config fields. For several processes (hosts, or one per GPU), pass ``--jax_distributed``
(and ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` where JAX cannot
detect them); process 0 writes the logs and results.
"""

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from lra_benchmarks import config_lib
from lra_benchmarks import data as lra_data
from lra_benchmarks import train_lib
from lra_benchmarks.training import checkpoints
from lra_benchmarks.training import cli
from lra_benchmarks.training import distributed
from lra_benchmarks.training import interrupts
from lra_benchmarks.training import progress
from lra_benchmarks.training import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file in configs/ (e.g. configs/listops_posrf_qmc.py).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory (checkpoints, logs, results.json). Default: "
    "workdirs/<config file name>.")
_EVAL_ONLY = flags.DEFINE_bool(
    "eval_only", False, "Evaluate the saved model of --workdir (validation and test splits) "
    "instead of training.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Evaluate this saved model: a workdir, its checkpoints/ or best/ "
    "directory, or one step's directory. The config is the workdir's config.json unless "
    "--config is given.")
_MEMORY = flags.DEFINE_string(
    "memory_fraction", None, "Device memory for this process: 'auto' (allocate on demand, for "
    "several runs on one GPU) or a fraction such as 0.3. Default: config.memory_fraction.")
_DISTRIBUTED = flags.DEFINE_bool(
    "jax_distributed", False, "Run as one of several processes (hosts, or one process per GPU): "
    "call jax.distributed.initialize() first. Implied when JAX_COORDINATOR_ADDRESS is set.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0 (with --jax_distributed). Default: "
    "JAX_COORDINATOR_ADDRESS, else detected by JAX (Cloud TPU, Slurm, Open MPI, Kubernetes).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes (with --jax_distributed). Default: "
    "JAX_NUM_PROCESSES, else detected by JAX.", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in 0..num_processes-1 (with --jax_distributed). "
    "Default: JAX_PROCESS_ID, else detected by JAX.", lower_bound=0)
_OWN_FLAGS = ("config", "workdir", "eval_only", "checkpoint", "memory_fraction",
              "jax_distributed", "coordinator_address", "num_processes", "process_id")


def fail(message: str, code: int = 2) -> None:
  """Prints ``error: message`` to stderr and exits with ``code``."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing with a ``--help`` that exits 0 and lists the config fields, and a one- or
  two-line message (exit 2) for every flag or config mistake."""
  path = cli.config_path(argv)
  file_config, source = None, None
  if path is not None:
    try:
      file_config, source = cli.load_config_file(path), path
    except cli.UsageError as e:
      if not any(a in cli.HELP_FLAGS for a in argv):
        fail(str(e))
  if any(a in cli.HELP_FLAGS for a in argv):
    if file_config is None:
      file_config, source = (config_lib.base_config(), "lra_benchmarks.config_lib.base_config "
                             "(pass --config for a task's)")
    print(cli.help_text("lra_benchmarks.train", _OWN_FLAGS, file_config, source))
    sys.exit(0)
  try:
    rest = flags.FLAGS(argv)
    _ = _CONFIG.value
  except Exception as e:  # pylint: disable=broad-except
    fail(cli.explain_flag_error(e, argv, file_config))
  if len(rest) > 1:
    fail(f"unexpected arguments {rest[1:]}: flags take the form --name=value.")
  return rest


def _config_and_workdir() -> tuple[ml_collections.ConfigDict, str]:
  """The run's config and workdir from the flags (eval-only runs may take the stored config)."""
  config, workdir = _CONFIG.value, _WORKDIR.value
  source = _CHECKPOINT.value or workdir
  if config is None and (_EVAL_ONLY.value or _CHECKPOINT.value) and source:
    stored = _stored_config(source)
    if stored is None:
      fail(f"no config.json in or above {os.path.abspath(source)}: pass --config.")
    config = ml_collections.ConfigDict(stored)
  if config is None:
    fail("--config is required, e.g. --config=configs/listops_posrf_qmc.py (see --help).")
  if workdir is None:
    if flags.FLAGS["config"].present:
      name = os.path.splitext(os.path.basename(
          flags.FLAGS["config"].config_filename.split(":")[0]))[0]
    else:
      name = "eval"
    workdir = os.path.join("workdirs", name)
  return config, workdir


def _stored_config(path: str):
  """The ``config.json`` in ``path`` or up to two directories above, or None."""
  path = os.path.abspath(path)
  for _ in range(3):
    stored = workdir_lib.load_json(os.path.join(path, workdir_lib.CONFIG_FILE))
    if stored is not None:
      return stored
    path = os.path.dirname(path)
  return None


def _start_distributed() -> None:
  """``jax.distributed.initialize`` when asked (flag or environment); a usage error (exit 2)
  for incomplete or contradictory settings, and for process flags without ``--jax_distributed``."""
  given = [f"--{name}" for name in ("coordinator_address", "num_processes", "process_id")
           if flags.FLAGS[name].present]
  if not distributed.requested(_DISTRIBUTED.value):
    if given:
      fail(f"{', '.join(given)} apply only to a run of several processes: add "
           "--jax_distributed.")
    return
  try:
    arguments = distributed.initialize_arguments(_COORDINATOR.value, _NUM_PROCESSES.value,
                                                 _PROCESS_ID.value)
  except distributed.DistributedError as e:
    fail(str(e))
  distributed.initialize(arguments)


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  config, workdir = _config_and_workdir()
  try:
    cli.apply_memory_fraction(_MEMORY.value if _MEMORY.value is not None
                              else config.get("memory_fraction", ""))
  except cli.UsageError as e:
    fail(str(e))
  _start_distributed()
  try:
    task = lra_data.get_task(config.task)
    train_lib.validate_config(config, task)
  except ValueError as e:
    fail(str(e))
  logging.info("Devices: %s; workdir: %s", jax.devices(), workdir)
  try:
    if _EVAL_ONLY.value or _CHECKPOINT.value:
      found = train_lib.evaluate_checkpoint(config, _CHECKPOINT.value or workdir)
      if jax.process_index() == 0:
        print(json.dumps(found, indent=2))
      return
    results = train_lib.train_and_evaluate(config, workdir)
  except interrupts.Interrupted as e:
    print(e, flush=True)
    sys.exit(e.exit_code)
  except KeyboardInterrupt:
    print("Interrupted before training started (loading data or compiling): nothing to save.",
          flush=True)
    sys.exit(130)
  except (lra_data.DataNotFoundError, lra_data.MalformedDataError, workdir_lib.WorkdirError,
          checkpoints.CheckpointError) as e:
    fail(str(e), code=1)
  if results and jax.process_index() == 0:
    print(_summary(results, os.path.join(os.path.abspath(workdir), "results.json")))


def _summary(results: dict, path: str) -> str:
  """The closing line: test accuracy, steps, time, rate and memory in human units."""
  return (f"test accuracy {results['test_accuracy']:.4f} (step "
          f"{results.get('tested_step', results['best_step'])}, protocol "
          f"{results.get('protocol', 'test')}), {results['steps']} steps, train time "
          f"{progress.format_duration(results['train_wall_time_s'])}, "
          f"{progress.format_rate(results['steps_per_second'])}, peak memory "
          f"{progress.format_bytes(results['peak_memory_bytes'])} "
          f"({results['peak_memory_source']}); results in {path}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
