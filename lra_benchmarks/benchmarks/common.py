"""Helpers shared by the benchmark programs: timing, memory, pair selection, output files."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import numpy as np

from spectraformer_jax import registry


# ----------------------------------------------------------------------------- timing

def block(tree: Any) -> Any:
  """Waits for every array in ``tree``."""
  return jax.block_until_ready(tree)


def time_calls(call: Callable[[], Any], *, warmup: int = 2, reps: int = 10) -> dict[str, float]:
  """Times ``call()`` (which must return device arrays) ``reps`` times after ``warmup`` calls.

  Each call is timed on its own with a host clock after ``block_until_ready``, so the
  numbers include dispatch; the median is the figure to report.
  """
  for _ in range(warmup):
    block(call())
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    block(call())
    times.append(time.perf_counter() - start)
  times_ms = np.asarray(times) * 1e3
  return {"median_ms": float(np.median(times_ms)), "min_ms": float(times_ms.min()),
          "max_ms": float(times_ms.max()), "reps": int(reps)}


def time_pipelined(call: Callable[[], Any], *, warmup: int = 2, reps: int = 10) -> float:
  """Milliseconds per ``call()`` when ``reps`` calls are dispatched back to back and waited for
  once at the end, as a training loop runs them: the device's time per call, with the host's
  dispatch hidden behind it (unlike ``time_calls``, which waits for every call)."""
  for _ in range(warmup):
    block(call())
  start = time.perf_counter()
  out = None
  for _ in range(reps):
    out = call()
  block(out)
  return (time.perf_counter() - start) * 1e3 / reps


# ----------------------------------------------------------------------------- memory

MIB = 2**20


def device_peak_bytes() -> Optional[int]:
  """The process-lifetime ``peak_bytes_in_use`` of device 0 (None on CPU: no stats)."""
  stats = jax.devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return int(stats["peak_bytes_in_use"])


def is_out_of_memory(err: BaseException) -> bool:
  text = f"{type(err).__name__}: {err}"
  return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM"))


# ----------------------------------------------------------------------------- selection

def parse_list(text: Optional[str], cast: Callable[[str], Any] = str) -> Optional[list[Any]]:
  """``"a,b,c"`` -> ``[cast(a), ...]``; ``None``/``""``/``"all"`` -> None (meaning all)."""
  if text is None or text.strip() in ("", "all"):
    return None
  return [cast(item.strip()) for item in text.split(",") if item.strip()]


def parse_length(text: str) -> int:
  """``"4096"``, ``"4k"`` or ``"64K"`` -> an int (k = 1024)."""
  text = text.strip().lower()
  if text.endswith("k"):
    return int(float(text[:-1]) * 1024)
  return int(text)


def select_pairs(spec: Optional[str], components: Optional[Sequence[str]] = None,
                 weights: Optional[Sequence[str]] = None) -> list[tuple[str, str]]:
  """The (component, weight) pairs to run.

  ``spec``: None/"all" for every ``registry.valid_pairs()``, or a comma list of
  ``component:weight`` (each validated by the registry). ``components``/``weights``
  filter the result.
  """
  names = parse_list(spec)
  if names is None:
    pairs = list(registry.valid_pairs())
  else:
    pairs = []
    for item in names:
      if ":" not in item:
        raise ValueError(f"Pair {item!r} must be written component:weight, e.g. posrf:orf.")
      comp, weight = item.split(":", 1)
      comp_spec, weight_spec = registry.check_pair(comp, weight)
      pairs.append((comp_spec.name, weight_spec.name))
  if components:
    pairs = [p for p in pairs if p[0] in components]
  if weights:
    pairs = [p for p in pairs if p[1] in weights]
  return pairs


def pair_name(component: str, weight: str) -> str:
  return f"{component}-{weight}"


# ----------------------------------------------------------------------------- environment

def git_commit() -> Optional[str]:
  try:
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                         text=True, check=True, timeout=10)
    return out.stdout.strip() or None
  except Exception:  # pylint: disable=broad-except
    return None


def environment() -> dict[str, Any]:
  """What the numbers were measured on."""
  dev = jax.devices()[0]
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "commit": git_commit(),
      "platform": dev.platform,
      "device_kind": getattr(dev, "device_kind", str(dev)),
      "device_count": jax.device_count(),
      "jax": jax.__version__,
      "python": platform.python_version(),
  }


# ----------------------------------------------------------------------------- output

def _finite_or_none(value: Any) -> Any:
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def _clean(obj: Any) -> Any:
  if isinstance(obj, dict):
    return {str(k): _clean(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_clean(v) for v in obj]
  if isinstance(obj, (np.floating,)):
    return _finite_or_none(float(obj))
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, float):
    return _finite_or_none(obj)
  return obj


def write_json(path: str, data: Any) -> None:
  """Writes strict JSON (non-finite floats become null)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(_clean(data), f, indent=1, allow_nan=False)
    f.write("\n")


def fmt(value: Any, digits: int = 3) -> str:
  """A table cell: numbers to ``digits`` significant figures, None as an en dash."""
  if value is None:
    return "-"
  if isinstance(value, bool):
    return "yes" if value else "no"
  if isinstance(value, (int, np.integer)):
    return str(int(value))
  if isinstance(value, (float, np.floating)):
    if not math.isfinite(value):
      return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if value == 0:
      return "0"
    if abs(value) >= 10**digits or abs(value) < 10**-(digits + 1):
      return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"
  return str(value)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
  """A GitHub markdown table; cells go through ``fmt``."""
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
  for row in rows:
    lines.append("| " + " | ".join(fmt(cell) for cell in row) + " |")
  return "\n".join(lines) + "\n"


def environment_markdown(env: dict[str, Any]) -> str:
  return (f"Device: {env['device_kind']} ({env['platform']}, {env['device_count']} device(s)); "
          f"jax {env['jax']}; Python {env['python']}; {env['date']}; commit {env['commit']}.\n")


def write_text(path: str, text: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def pyplot():
  """matplotlib.pyplot with a non-interactive backend (install the ``bench`` extra)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt
