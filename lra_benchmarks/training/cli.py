"""The command line's own jobs: one-line errors for flag and config mistakes, a ``--help`` that
lists the config fields with their defaults, and the device-memory setting (which must happen
before JAX starts its backend)."""

from __future__ import annotations

import difflib
import glob
import os
import re
import runpy
from typing import Any, MutableMapping, Optional, Sequence

from absl import flags
import ml_collections

from lra_benchmarks.training import workdir as workdir_lib

HELP_FLAGS = ("-h", "--help", "-?", "--helpshort", "--helpfull")


class UsageError(ValueError):
  """A command-line mistake; the message names the bad value and the valid choices."""


def config_path(argv: Sequence[str]) -> Optional[str]:
  """The value of ``--config=PATH`` (or ``--config PATH``) in ``argv``, or None."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """``get_config()`` of the config file ``path`` (``PATH:ARG`` calls ``get_config(ARG)``).

  Raises UsageError naming the path (and the config files with similar names) when the file is
  missing, does not run, or has no ``get_config``.
  """
  arg = None
  if not os.path.exists(path) and ":" in os.path.basename(path):
    path, arg = path.rsplit(":", 1)
  if not os.path.isfile(path):
    folder = os.path.dirname(path) or "."
    names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.py")))
    close = difflib.get_close_matches(os.path.basename(path), names, n=3, cutoff=0.6)
    hint = (f" Did you mean {', '.join(os.path.join(folder, n) for n in close)}?" if close else
            " Config files live in configs/, e.g. configs/listops_posrf_qmc.py.")
    raise UsageError(f"--config={path}: no such file.{hint}")
  try:
    module = runpy.run_path(path)
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError(f"--config={path} does not load: {type(e).__name__}: {e}") from None
  if "get_config" not in module:
    raise UsageError(f"--config={path} defines no get_config(): pass a file from configs/.")
  return module["get_config"](arg) if arg is not None else module["get_config"]()


def _overrides(argv: Sequence[str]) -> list[tuple[str, str]]:
  """``[(key, value)]`` of the ``--config.KEY=VALUE`` arguments."""
  return [tuple(a[len("--config."):].split("=", 1)) if "=" in a else (a[len("--config."):], "")
          for a in argv if a.startswith("--config.")]


def explain_flag_error(error: Exception, argv: Sequence[str],
                       config: Optional[ml_collections.ConfigDict]) -> str:
  """One or two lines for a flag-parsing ``error`` of ``argv`` (``config``: the file's config,
  for the valid keys and types)."""
  fields = workdir_lib.flatten(config.to_dict()) if config is not None else {}
  for key, value in _overrides(argv):
    if config is not None and key not in fields and not _is_group(config, key):
      close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.5)
      hint = f" Did you mean {', '.join('--config.' + c for c in close)}?" if close else ""
      return (f"--config.{key}: no such config field.{hint} See the fields and their defaults "
              "with --help.")
  match = re.match(r"flag --config\.(\S+?)=(.*?): (.*)", str(error))
  if match and match.group(1) in fields:
    key, value = match.group(1), match.group(2)
    default = fields[key]
    return (f"--config.{key}={value}: expected {type(default).__name__} (default {default!r}); "
            f"{match.group(3)}.")
  match = re.match(r"Unknown command line flag '(\S+)'", str(error))
  if match:
    known = sorted(n for n in flags.FLAGS if not n.startswith("config."))
    close = difflib.get_close_matches(match.group(1), known, n=3, cutoff=0.6)
    hint = (f" Did you mean {', '.join('--' + c for c in close)}?" if close else
            " See --help.")
    return f"--{match.group(1)}: no such flag.{hint}"
  return f"{type(error).__name__}: {error}"


def _is_group(config: ml_collections.ConfigDict, key: str) -> bool:
  node: Any = config
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return isinstance(node, ml_collections.ConfigDict)


def help_text(program: str, flag_names: Sequence[str], config: Optional[ml_collections.ConfigDict],
              config_source: str) -> str:
  """The ``--help`` text: usage, the given flags with their help, and every config field with
  its value in ``config`` (from ``config_source``)."""
  lines = [f"usage: python -m {program} --config=configs/<task>_<attention>.py "
           "[--workdir=DIR] [--config.FIELD=VALUE ...]", "", "flags:"]
  for name in flag_names:
    flag = flags.FLAGS[name]
    default = "" if flag.default is None else f" (default {flag.default!r})"
    lines.append(f"  --{name}: {flag.help}{default}")
  if config is not None:
    lines += ["", f"config fields (--config.FIELD=VALUE), values from {config_source}:"]
    lines += [f"  {key} = {value!r}" for key, value in workdir_lib.flatten(
        config.to_dict()).items()]
  return "\n".join(lines)


def memory_environment(value: str) -> dict[str, str]:
  """The environment variables that give this process ``value`` of the device memory.

  ``""``: none (JAX's default: preallocate 75%, unless the environment says otherwise);
  ``"auto"``: ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (allocate on demand, so several runs
  share a device); a number in (0, 1]: ``XLA_PYTHON_CLIENT_MEM_FRACTION`` (preallocate that
  fraction).
  """
  value = (value or "").strip()
  if not value:
    return {}
  if value == "auto":
    return {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  try:
    fraction = float(value)
  except ValueError:
    fraction = -1.0
  if not 0 < fraction <= 1:
    raise UsageError(f"memory fraction {value!r}: must be \"auto\" or a number in (0, 1], e.g. "
                     "0.3 for three runs on one device.")
  return {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{fraction:g}"}


def apply_memory_fraction(value: str, environ: MutableMapping[str, str] = os.environ) -> None:
  """Sets ``memory_environment(value)`` in ``environ``; call before JAX's first device use."""
  environ.update(memory_environment(value))
