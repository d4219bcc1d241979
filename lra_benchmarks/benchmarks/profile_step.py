r"""Where a train step's device time goes: kernels per step, time by part of the model.

For every task of ``--tasks`` and attention of ``--attentions`` (``flash``, ``softmax``, a
baseline, or a ``component-weight`` pair), builds the same compiled train step as
``speed`` (``speed.build_step``: the study's model at the task's shapes, random tokens,
dropout on, AdamW), runs ``--steps`` steps under ``jax.profiler.trace`` and reads the trace
back (``jax.profiler.ProfileData``).  Every device event (a kernel on GPU, a thunk on CPU)
carries the HLO instruction it runs (``hlo_op``); the compiled module's text maps that
instruction to the JAX name stack it came from (``metadata op_name``), which names the part of
the model:

* ``attention``: the attention module's core (feature maps, kernels, flash), not its
  projections;
* ``projections``: the q/k/v/output projections of the attention layer;
* ``mlp``, ``layernorm``, ``embedding``, ``classifier`` (pooling, the head, the loss);
* ``dropout``: the random bits and masks of every dropout;
* ``optimizer``: what runs outside the differentiated function: gradient clipping, AdamW, the
  step's metrics;
* ``other``: whatever matches none of these (copies XLA adds, for one).

Kernels run one by one while profiling (XLA's command buffers off: ``main`` sets the flag
before JAX starts), so the step is slightly slower than in training.  Per configuration:
device milliseconds per step (the sum of event durations: streams that
overlap count twice, so this is an upper bound of the busy time), device events per step, the
split by part, the ten longest instructions, and the compiled step's ``bytes accessed`` from
``cost_analysis()`` (XLA's estimate of the bytes every instruction reads and writes; custom
kernels such as Pallas' count as their operands and results only).

    python -m lra_benchmarks.benchmarks.profile_step --tasks=text \
        --attentions=flash,posrf-qmc --dtype=bfloat16 --out_dir=docs/benchmarks

Writes ``profile_step.json`` and ``profile_step.md``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import tempfile
from typing import Any, Optional, Sequence

import jax
from jax.profiler import ProfileData

from lra_benchmarks.benchmarks import common, speed

# First match wins: (part, pattern over the JAX name stack of an instruction).
PARTS = (
    ("dropout", re.compile(r"[Dd]ropout|random_bits|threefry|bernoulli|key_dropout")),
    ("projections", re.compile(r"(query|key|value|out)(/|_|\))|DenseGeneral")),
    ("attention", re.compile(r"[Aa]ttention|pallas|flash|dot_product_attention|cudnn|rf_")),
    ("layernorm", re.compile(r"LayerNorm|layer_norm|_norm/")),
    ("mlp", re.compile(r"[Mm]lp|Dense_|gelu")),
    ("embedding", re.compile(r"[Ee]mbed")),
    ("classifier", re.compile(r"/head/|pool|logits|cross_entropy|log_softmax|_loss")),
)
# Instructions outside the differentiated function (no ``jvp(``/``transpose(`` in the name
# stack) are the update: gradient clipping, AdamW, the metrics.
_DIFFERENTIATED = re.compile(r"jvp\(|transpose\(")
_META = re.compile(r"%?([\w.\-]+) = .*metadata=\{[^}]*op_name=\"([^\"]*)\"")


def op_names(hlo_text: str) -> dict[str, str]:
  """``{instruction name: JAX name stack}`` from a compiled module's text (instructions
  without metadata are left out)."""
  return {m.group(1): m.group(2) for m in _META.finditer(hlo_text)}


def part_of(op_name: Optional[str]) -> str:
  """The part of the model (``PARTS``) a name stack belongs to, ``"optimizer"`` for the
  update outside the differentiated function, ``"other"`` if none."""
  if op_name:
    if op_name.startswith("jit(") and not _DIFFERENTIATED.search(op_name):
      return "optimizer"
    for part, pattern in PARTS:
      if pattern.search(op_name):
        return part
  return "other"


def device_events(xspace_path: str, module_substring: str) -> list[tuple[str, str, float]]:
  """``(hlo_op, event name, duration_us)`` of every device event of the modules whose name
  contains ``module_substring`` (events that name no module are kept): kernels on a GPU's
  planes, thunks on the CPU's threads."""
  data = ProfileData.from_file(xspace_path)
  gpu = [p for p in data.planes if p.name.startswith("/device:")]
  planes = gpu or [p for p in data.planes if p.name == "/host:CPU"]
  events = []
  for plane in planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        if not gpu and "hlo_op" not in stats:  # host-side events of the CPU plane
          continue
        if module_substring not in str(stats.get("hlo_module", module_substring)):
          continue
        events.append((str(stats.get("hlo_op", event.name)), event.name,
                       event.duration_ns / 1e3))
  return events


def summarize(events: list[tuple[str, str, float]], names: dict[str, str], steps: int,
              top: int = 10) -> dict[str, Any]:
  """Per-step device time, event count, time by part and the ``top`` longest instructions."""
  by_part = collections.Counter()
  by_op = collections.Counter()
  kernel = {}
  for op, name, us in events:
    by_part[part_of(names.get(op))] += us
    by_op[op] += us
    kernel.setdefault(op, name)
  total = sum(by_part.values())
  return {
      "device_ms_per_step": total / steps / 1e3,
      "events_per_step": len(events) / steps,
      "parts_ms_per_step": {p: us / steps / 1e3 for p, us in by_part.most_common()},
      "top": [{"hlo_op": op, "kernel": kernel[op], "part": part_of(names.get(op)),
               "ms_per_step": us / steps / 1e3, "op_name": names.get(op, "")[-160:]}
              for op, us in by_op.most_common(top)],
  }


def profile(task: str, variant: tuple, args) -> dict:
  """One configuration: build, warm up, trace ``args.steps`` steps, summarize."""
  row = {"task": task, "attention": speed.variant_name(variant)}
  try:
    compiled, state, batch = speed.build_step(task, variant, args)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    row["bytes_accessed_mib"] = (None if not cost or "bytes accessed" not in cost
                                 else cost["bytes accessed"] / common.MIB)
    names = op_names(compiled.as_text())
    for _ in range(args.warmup):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as trace_dir:
      with jax.profiler.trace(trace_dir):
        for _ in range(args.steps):
          state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
      paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
      if not paths:
        raise RuntimeError(f"the profiler wrote no trace under {trace_dir}.")
      events = device_events(paths[0], module_substring="train_step")
    if not events:
      raise RuntimeError("the trace holds no device event of the train step.")
    row.update(summarize(events, names, args.steps))
  except Exception as err:  # pylint: disable=broad-except
    row["error"] = f"{type(err).__name__}: {str(err)[:500]}"
  print({k: row[k] for k in row if k != "top"}, flush=True)
  return row


def markdown(result: dict) -> str:
  """One table of parts per configuration, then each configuration's longest instructions."""
  rows = [r for r in result["rows"] if "error" not in r]
  order = [name for name, _ in PARTS] + ["optimizer", "other"]
  parts = sorted({p for r in rows for p in r["parts_ms_per_step"]}, key=order.index)
  lines = ["# Train step profile: device time by part of the model", "",
           common.environment_markdown(result["environment"]), "",
           f"{result['args']['steps']} traced steps after {result['args']['warmup']} warm-up "
           f"steps; model dtype {result['args']['dtype'] or 'the config default'}. Device ms "
           "sum the durations of the step's device events.", "",
           common.markdown_table(
               ["task", "attention", "device ms/step", "events/step", "bytes accessed MiB",
                *[f"{p} ms" for p in parts]],
               [[r["task"], r["attention"], r["device_ms_per_step"], r["events_per_step"],
                 r["bytes_accessed_mib"], *[r["parts_ms_per_step"].get(p, 0.0) for p in parts]]
                for r in rows])]
  for r in result["rows"]:
    if "error" in r:
      lines += ["", f"{r['task']} {r['attention']}: failed: {r['error']}"]
      continue
    lines += ["", f"## {r['task']} {r['attention']}: longest instructions", "",
              common.markdown_table(["instruction", "kernel", "part", "ms/step"],
                                    [[t["hlo_op"], t["kernel"][:60], t["part"],
                                      t["ms_per_step"]] for t in r["top"]])]
  return "\n".join(lines) + "\n"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--tasks", default="text")
  parser.add_argument("--attentions", default="flash,posrf-qmc",
                      help=f"comma separated: {', '.join(speed.BASELINES)} or component-weight")
  parser.add_argument("--dtype", default="", help="model.dtype (default: each config's)")
  parser.add_argument("--model", default="", help="model overrides, field=value,...")
  parser.add_argument("--m", type=int, default=128)
  parser.add_argument("--batch", type=int, default=0, help="0: the task's")
  parser.add_argument("--length", type=int, default=0, help="0: the task's")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--out_dir", default="docs/benchmarks")
  return parser.parse_args(argv)


def _without_command_buffers() -> None:
  """Asks XLA (GPU) to launch kernels one by one: inside a CUDA-graph command buffer the trace
  names the buffer, not the instruction each kernel runs.  Takes effect only if no JAX backend
  has started in this process yet."""
  flag = "--xla_gpu_enable_command_buffer="
  flags = os.environ.get("XLA_FLAGS", "")
  if flag not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


def main(argv: Optional[Sequence[str]] = None) -> dict:
  args = parse_args(argv)
  _without_command_buffers()
  if args.steps < 1:
    raise ValueError(f"--steps must be >= 1, got {args.steps}.")
  tasks = common.parse_list(args.tasks)
  for task in tasks:
    if task not in speed.TASK_SHAPES:
      raise ValueError(f"Unknown task {task!r}; choose from {sorted(speed.TASK_SHAPES)}.")
  variants = [speed.parse_variant(a) for a in common.parse_list(args.attentions)]
  rows = [profile(task, variant, args) for task in tasks for variant in variants]
  result = {"environment": common.environment(),
            "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
  os.makedirs(args.out_dir, exist_ok=True)
  common.write_json(os.path.join(args.out_dir, "profile_step.json"), result)
  common.write_text(os.path.join(args.out_dir, "profile_step.md"), markdown(result))
  return result


if __name__ == "__main__":
  main()
