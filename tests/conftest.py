"""Shared pytest set-up: one compilation cache for the whole run, a tiny ListOps data_dir, a
checkpoint corrupter."""

import os
import random
import shutil
import sys
import tempfile

import pytest

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_CACHE_OWNER = "SPECTRAFORMER_TEST_CACHE_OWNER"


def pytest_configure(config: pytest.Config) -> None:
  """Points JAX at one persistent compilation cache for the run: the main pytest process
  makes it (unless ``JAX_COMPILATION_CACHE_DIR`` names one already) before xdist starts its
  workers, and the workers and every subprocess a test starts inherit it through the
  environment. Identical programs (the same model trained again, resumed, or in another
  process) then compile once. Compiles of 0.2 s or more are stored."""
  if _CACHE_ENV not in os.environ:
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="spectraformer-jax-compilations-")
    os.environ[_CACHE_OWNER] = str(os.getpid())
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  if "jax" in sys.modules:  # imported by a plugin: its configuration was read already
    jax = sys.modules["jax"]
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
  del config


def pytest_unconfigure(config: pytest.Config) -> None:
  """Removes the compilation cache in the process that made it."""
  if os.environ.get(_CACHE_OWNER) == str(os.getpid()):
    shutil.rmtree(os.environ[_CACHE_ENV], ignore_errors=True)
  del config


_OPS = {"MIN": min, "MAX": max, "MED": lambda xs: int(sorted(xs)[(len(xs) - 1) // 2] +
                                                     sorted(xs)[len(xs) // 2]) // 2,
        "SM": lambda xs: sum(xs) % 10}


def _listops_expression(rng: random.Random, depth: int, root: bool = False) -> tuple[str, int]:
  """A small ListOps expression in LRA's text form and its value."""
  if depth == 0 or (not root and rng.random() < 0.4):
    value = rng.randrange(10)
    return str(value), value
  op = rng.choice(sorted(_OPS))
  args = [_listops_expression(rng, depth - 1) for _ in range(rng.randint(2, 4))]
  text = f"( [{op} " + " ".join(a for a, _ in args) + " ] )"
  return text, _OPS[op]([v for _, v in args])


@pytest.fixture(scope="session")
def listops_dir(tmp_path_factory) -> str:
  """A tiny ListOps data_dir in the LRA format: basic_{train,val,test}.tsv, header Source\\tTarget."""
  root = tmp_path_factory.mktemp("listops")
  rng = random.Random(0)
  for split, n in (("train", 96), ("val", 40), ("test", 40)):
    rows = ["Source\tTarget"]
    for _ in range(n):
      text, value = _listops_expression(rng, 3, root=True)
      rows.append(f"{text}\t{value}")
    (root / f"basic_{split}.tsv").write_text("\n".join(rows) + "\n")
  return str(root)


def truncate_checkpoint_data(step_dir: str) -> None:
  """Cuts every data file of an orbax checkpoint's state (``.../d/<hash>``) to a third."""
  for folder, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files if os.path.basename(folder) == "d" else ():
      path = os.path.join(folder, name)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)
