"""Every notebook runs at tiny size, as Jupyter would run it after its install cell.

The code cells except the one tagged ``install`` (it clones, changes directory and
pip-installs) run in order in one namespace, with ``SFJ_NOTEBOOK_SIZE=tiny``, in a scratch
directory that holds the repository's ``configs/`` and ``docs/`` as the clone would.
"""

import ast
import json
import os
import pathlib
import re

import matplotlib
import numpy as np
import pytest

from test_download import cifar_files

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MAGIC = re.compile(r"^\s*[%!]", re.M)


def _repository() -> str:
  """``REPOSITORY`` as assigned in setup.py (read, not executed: setup.py runs setup())."""
  for node in ast.parse((ROOT / "setup.py").read_text()).body:
    if isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["REPOSITORY"]:
      return node.value.value
  raise AssertionError("setup.py assigns no REPOSITORY")


def _cells(path: pathlib.Path) -> list[dict]:
  return json.loads(path.read_text())["cells"]


def _source(cell: dict) -> str:
  return "".join(cell["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_badge_install_and_runtime_cells(path):
  repository = _repository()
  cells = _cells(path)
  colab = repository.replace("https://github.com/", "https://colab.research.google.com/github/")
  assert f"({colab}/blob/main/notebooks/{path.name})" in _source(cells[0])
  code = [c for c in cells if c["cell_type"] == "code"]
  install, runtime = code[0], code[1]
  assert "install" in install["metadata"]["tags"]
  assert f'REPOSITORY = "{repository}"' in _source(install)
  assert "git clone" in _source(install) and "%cd" in _source(install)
  assert "SFJ_NOTEBOOK_SIZE" in _source(runtime) and "default_backend" in _source(runtime)
  assert not [c for c in code[1:] if MAGIC.search(_source(c))]  # runnable as plain Python


def test_readme_clones_the_same_repository():
  assert f"git clone {_repository()}" in (ROOT / "README.md").read_text()


def _run(name, tmp_path, monkeypatch, capsys, **env):
  """Runs the notebook's code cells (install cell excepted); returns (namespace, stdout)."""
  for key, value in {"SFJ_NOTEBOOK_SIZE": "tiny", **env}.items():
    monkeypatch.setenv(key, value)
  monkeypatch.setenv("SPECTRAFORMER_JAX_CACHE", str(tmp_path / "cache"))
  for folder in ("configs", "docs"):
    (tmp_path / folder).symlink_to(ROOT / folder)
  monkeypatch.chdir(tmp_path)
  path = ROOT / "notebooks" / f"{name}.ipynb"
  namespace = {}
  for cell in _cells(path):
    if cell["cell_type"] == "code" and "install" not in cell["metadata"].get("tags", []):
      exec(compile(_source(cell), str(path), "exec"), namespace)  # pylint: disable=exec-used
  plt.close("all")
  return namespace, capsys.readouterr().out


def test_quickstart(tmp_path, monkeypatch, capsys):
  namespace, out = _run("quickstart", tmp_path, monkeypatch, capsys)
  errors = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines()
            if "relative RMS error" in line]
  assert len(errors) == 2 and errors[1] < errors[0]  # m = 256 beats m = 16
  assert "finite: True" in out
  assert namespace["results"]["steps"] == 4 and 0 <= namespace["results"]["test_accuracy"] <= 1


def test_layers_in_your_model(tmp_path, monkeypatch, capsys):
  namespace, _ = _run("layers_in_your_model", tmp_path, monkeypatch, capsys)
  for losses in (namespace["losses"], namespace["nnx_losses"]):
    assert len(losses) == namespace["STEPS"] and np.isfinite(losses).all()


def test_lra_task_downloads_nothing_when_the_data_is_there(tmp_path, monkeypatch, capsys):
  data = tmp_path / "lra_data"
  for name, content in cifar_files().items():
    (data / name).parent.mkdir(parents=True, exist_ok=True)
    (data / name).write_bytes(content)
  namespace, _ = _run("lra_task", tmp_path, monkeypatch, capsys, SFJ_NOTEBOOK_TASK="image",
                      SFJ_DATA_DIR=str(data))
  assert not (data / "downloads").exists()
  assert namespace["results"]["task"] == "image" and namespace["results"]["steps"] == 3


def test_kernel_explorer(tmp_path, monkeypatch, capsys):
  namespace, _ = _run("kernel_explorer", tmp_path, monkeypatch, capsys)
  for errors in namespace["rel_mse"].values():
    assert errors[-1] < errors[0]  # more features, smaller error
  assert len(namespace["best"]) == len(namespace["components"])


def test_study(tmp_path, monkeypatch, capsys):
  """Two ListOps attentions through the study runner (its trainings are subprocesses, which
  find the package as the install cell leaves it), then the table and the heatmap."""
  namespace, out = _run("study", tmp_path, monkeypatch, capsys, PYTHONPATH=str(ROOT))
  assert namespace["status"] == 0, out
  runs = namespace["report"]["runs"]
  assert sorted(r["attention"] for r in runs) == ["posrf-qmc", "softmax"]
  assert all(r["status"] == "done" and 0 <= r["test_accuracy_pct"] <= 100 and r["steps"] == 3
             for r in runs), runs
  assert "posrf-qmc" in out and os.path.getsize(namespace["heatmap"]) > 0


def test_choose_combination(tmp_path, monkeypatch, capsys):
  namespace, out = _run("choose_combination", tmp_path, monkeypatch, capsys)
  ranked = namespace["recommendation"]["ranking"]
  assert [r["rank"] for r in ranked] == list(range(1, len(ranked) + 1))
  assert [r["error"] for r in ranked] == sorted(r["error"] for r in ranked)
  assert [r["combination"] for r in namespace["trained"]] == [r["combination"]
                                                              for r in ranked[:3]]
  assert all(0 <= r["test_accuracy"] <= 1 for r in namespace["trained"])
  assert "Measured" in out
