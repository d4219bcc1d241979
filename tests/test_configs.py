"""Every config file loads, names a valid combination, and files and registry agree."""

import glob
import importlib.util
import os
import re

import pytest

from configs import base
from configs import base_baselines
from spectraformer_jax import registry

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
_NOT_RUNNABLE = {"__init__.py", "base.py"}
_NOT_STUDY = {"listops_quick.py"}  # laptop-sized ListOps (README Quickstart)


def _runnable_files():
  return sorted(p for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
                if os.path.basename(p) not in _NOT_RUNNABLE
                and os.path.basename(p) not in _NOT_STUDY
                and not os.path.basename(p).startswith("base_"))


def _load(path):
  """Loads a config file by path, as ``--config=PATH`` does."""
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_files_match_study_combinations_for_every_task():
  names = {os.path.basename(p)[:-3] for p in _runnable_files()}
  expected = set()
  for task in base.TASKS:
    expected |= {f"{task}_softmax", f"{task}_flash"}
    expected |= {f"{task}_{kind}" for kind in base_baselines.BASELINES}
    expected |= {f"{task}_{c}_{w}" for c in base.STUDY_COMPONENTS for w in base.STUDY_WEIGHTS}
  assert names == expected
  assert len(names) == 5 * (3 * 6 + 2 + len(base_baselines.BASELINES))


def test_study_combinations_are_registry_pairs():
  valid = set(registry.valid_pairs())
  for component in base.STUDY_COMPONENTS:
    for weight in base.STUDY_WEIGHTS:
      assert (component, weight) in valid, (component, weight)


@pytest.mark.parametrize("path", _runnable_files(), ids=lambda p: os.path.basename(p)[:-3])
def test_config_file_names_its_combination(path):
  config = _load(path)
  name = os.path.basename(path)[:-3]
  task, rest = name.split("_", 1)
  assert config.task == task
  if rest in ("softmax", "flash") + base_baselines.BASELINES:
    assert config.model.attention == rest
  else:
    component, weight = rest.split("_")
    assert (config.model.attention, config.model.component, config.model.weight) == (
        "spectraformer", component, weight)
    registry.check_pair(component, weight)
  assert config.model.num_features == 128


# The study's hyperparameters (issue 5; Spectraformer/Skyformer configs).
STUDY = {  # task: (seq_len, batch, lr, warmup, eval_every)
    "listops": (2048, 32, 1e-4, 1000, 500),
    "text": (4096, 32, 1e-4, 80, 500),
    "retrieval": (4096, 16, 2e-4, 800, 1000),
    "image": (1024, 256, 1e-4, 175, 50),
    "pathfinder": (1024, 128, 2e-4, 312, 500),
}


@pytest.mark.parametrize("task", sorted(STUDY))
def test_base_configs_carry_study_hyperparameters(task):
  config = _load(os.path.join(CONFIG_DIR, f"base_{task}.py"))
  seq_len, batch, lr, warmup, eval_every = STUDY[task]
  assert (config.seq_len, config.batch_size, config.learning_rate, config.warmup_steps,
          config.eval_every) == (seq_len, batch, lr, warmup, eval_every)
  assert config.seq_len == 2 ** (config.max_length - 1).bit_length()  # next power of two
  m = config.model
  assert (m.num_layers, m.emb_dim, m.num_heads, m.qkv_dim, m.mlp_dim, m.dropout_rate,
          m.pooling, m.num_features) == (2, 64, 2, 64, 128, 0.1, "mean", 128)
  assert config.num_train_steps == 50_000 and config.schedule == "linear"


def test_config_is_locked_against_typos():
  config = _load(os.path.join(CONFIG_DIR, "listops_posrf_qmc.py"))
  config.lock()
  with pytest.raises(AttributeError, match="num_features"):
    config.model.num_featurs = 64  # pylint: disable=attribute-defined-outside-init
  assert re.match(r"\w+", config.task)
