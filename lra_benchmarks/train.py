r"""Trains and evaluates an LRA model with any attention.

  python -m lra_benchmarks.train --config=configs/listops_posrf_qmc.py \
      [--workdir=DIR] [--config.num_train_steps=200] [--config.data_dir=PATH]

The config is locked: overriding a field that does not exist is an error. A run in a ``workdir``
that holds checkpoints resumes from the latest one. Results go to ``DIR/results.json``.
For several hosts, pass ``--jax_distributed`` (calls ``jax.distributed.initialize()``).
"""

import os
import sys

# ``configs/<combination>.py`` files import ``configs.base_<task>``: make the repository root
# importable wherever the command runs from (the package sits next to ``configs/``).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_ROOT, "configs")) and _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file in configs/ (e.g. configs/listops_posrf_qmc.py).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory (checkpoints, logs, results.json). Default: "
    "workdirs/<config file name>.")
_DISTRIBUTED = flags.DEFINE_bool(
    "jax_distributed", False, "Call jax.distributed.initialize() first (multi-host runs).")
flags.mark_flag_as_required("config")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  from lra_benchmarks import train_lib
  config = _CONFIG.value
  workdir = _WORKDIR.value
  if workdir is None:
    name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
    workdir = os.path.join("workdirs", name)
  logging.info("Devices: %s; workdir: %s", jax.devices(), workdir)
  results = train_lib.train_and_evaluate(config, workdir)
  if results and jax.process_index() == 0:
    print(f"test accuracy {results['test_accuracy']:.4f}, train time "
          f"{results['train_wall_time_s']:.1f} s, {results['steps_per_second'] or 0:.2f} steps/s, "
          f"peak memory {results['peak_memory_bytes']} bytes ({results['peak_memory_source']}); "
          f"results in {os.path.join(os.path.abspath(workdir), 'results.json')}")


if __name__ == "__main__":
  app.run(main)
