"""The quickstart notebook's code runs (cells tagged `slow` or `install` are left out)."""

import json
import pathlib

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_cells_run(capsys):
  cells = json.loads(NOTEBOOK.read_text())["cells"]
  code = [c for c in cells if c["cell_type"] == "code"]
  run = [c for c in code if not {"slow", "install"} & set(c["metadata"].get("tags", []))]
  assert len(code) - len(run) == 2  # the install and the training cell
  namespace = {}
  for cell in run:
    exec(compile("".join(cell["source"]), str(NOTEBOOK), "exec"), namespace)  # pylint: disable=exec-used
  out = capsys.readouterr().out
  assert "relative RMS error" in out and "finite: True" in out
  errors = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if "relative RMS error" in line]
  assert errors[1] < errors[0]  # m = 256 beats m = 16
