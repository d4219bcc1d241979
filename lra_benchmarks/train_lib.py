"""The LRA trainer: one data-parallel loop for every task and attention.

``train_and_evaluate(config, workdir)`` trains with AdamW (linear warm-up and decay as the
Spectraformer study, or LRA's rsqrt schedule), evaluates on validation every
``config.eval_every`` steps, stops early after ``config.patience`` evaluations without
improvement, checkpoints every ``config.checkpoint_every`` steps with orbax (resuming from the
latest checkpoint in ``workdir``), and finally tests the checkpoint with the best validation
accuracy. It writes ``workdir/results.json``, TensorBoard events (``workdir/tensorboard``) and a
JSON-lines log (``workdir/metrics.jsonl``).

Data parallelism: ``jax.jit`` over a one-axis device ``Mesh``; the state is replicated, each
batch is sharded over the ``data`` axis (``jax.make_array_from_process_local_data``), so the same
code runs on one CPU, several GPUs or several hosts (call ``jax.distributed.initialize()`` first).
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable, Iterator, Optional

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from lra_benchmarks import models

SCHEDULES = ("linear", "rsqrt", "constant")
_SPLITS = ("train", "validation", "test")


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs: step, params, optimiser state, fixed W and the seed key."""
  step: jax.Array
  params: Any
  opt_state: Any
  random_features: Any
  rng: jax.Array  # raw uint32[2] key; step keys are fold_in(rng, step), so it never changes


# --------------------------------------------------------------------------------------------
# Config checks, optimiser.


def validate_config(config: ml_collections.ConfigDict, task: Any) -> models.ModelConfig:
  """Checks ``config`` (ValueError naming the field) and returns the model config."""
  def bad(field, why):
    raise ValueError(f"config.{field}={config[field]!r}: {why}")
  for field in ("batch_size", "num_train_steps", "eval_every", "checkpoint_every", "log_every",
                "max_length", "seq_len"):
    if not isinstance(config[field], int) or config[field] <= 0:
      bad(field, "must be a positive integer")
  for field in ("warmup_steps", "patience", "eval_batch_size", "keep_checkpoints"):
    if not isinstance(config[field], int) or config[field] < 0:
      bad(field, "must be a non-negative integer")
  if not isinstance(config.num_eval_steps, int) or not (
      config.num_eval_steps == -1 or config.num_eval_steps > 0):
    bad("num_eval_steps", "must be a positive integer, or -1 for the whole validation split")
  if config.schedule not in SCHEDULES:
    bad("schedule", f"must be one of {SCHEDULES}")
  if not config.learning_rate > 0:
    bad("learning_rate", "must be positive")
  for field in ("weight_decay", "grad_clip_value", "grad_clip_norm"):
    if config[field] < 0:
      bad(field, "must be non-negative (0 disables)")
  if config.seq_len < config.max_length:
    bad("seq_len", f"must be at least config.max_length={config.max_length}")
  if not task.padded and config.seq_len != config.max_length:
    bad("seq_len", f"task {task.name!r} has no padding token, so seq_len must equal "
        f"max_length={config.max_length}")
  model_config = models.ModelConfig.from_config(
      config.model, vocab_size=task.vocab_size, num_classes=task.num_classes,
      max_len=config.seq_len)
  model_config.validate()
  if not isinstance(config.model.redraw_every, int) or config.model.redraw_every < 0:
    raise ValueError(f"config.model.redraw_every={config.model.redraw_every!r}: must be a "
                     "non-negative integer (0: never)")
  return model_config


def check_batch_divides(batch_size: int, what: str = "config.batch_size") -> None:
  """The global batch must split evenly over processes and devices."""
  devices, processes = jax.device_count(), jax.process_count()
  if batch_size % devices:
    raise ValueError(
        f"{what}={batch_size} does not divide by the number of devices ({devices}): the batch "
        f"is split evenly over all devices. Use a multiple of {devices}, or fewer devices "
        "(e.g. CUDA_VISIBLE_DEVICES).")
  if batch_size % processes:
    raise ValueError(f"{what}={batch_size} does not divide by the number of processes "
                     f"({processes}).")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """``linear``: OneCycle-linear as the study (warm up from lr/div to lr, decay linearly to
  lr/(div*final_div) at the last step); ``rsqrt``: LRA's ``lr * min(1, s/w) / sqrt(max(s, w))``;
  ``constant``."""
  lr, warmup, total = config.learning_rate, config.warmup_steps, config.num_train_steps
  if config.schedule == "constant":
    return optax.constant_schedule(lr)
  if config.schedule == "rsqrt":
    def rsqrt(step):
      step = jnp.asarray(step, jnp.float32)
      w = max(warmup, 1)
      return lr * jnp.minimum(1.0, step / w) / jnp.sqrt(jnp.maximum(step, w))
    return rsqrt
  start = lr / config.warmup_div_factor
  end = start / config.final_div_factor
  warmup = min(warmup, total)
  return optax.join_schedules(
      [optax.linear_schedule(start, lr, max(warmup, 1)),
       optax.linear_schedule(lr, end, max(total - warmup, 1))], [warmup])


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Gradient clipping, then AdamW with the configured schedule."""
  chain = []
  if config.grad_clip_value > 0:
    chain.append(optax.clip(config.grad_clip_value))
  if config.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  chain.append(optax.adamw(learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2,
                           eps=config.adam_eps, weight_decay=config.weight_decay))
  return optax.chain(*chain)


# --------------------------------------------------------------------------------------------
# Steps.


def _loss_and_counts(logits, targets, weights):
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return (losses * weights).sum(), (correct * weights).sum(), weights.sum()


def make_train_step(model, tx, schedule: optax.Schedule, *, dual: bool) -> Callable:
  """``(state, batch) -> (state, metrics)``; the loss is the weighted mean over the global batch."""
  def train_step(state: TrainState, batch: dict):
    step_rng = jax.random.fold_in(state.rng, state.step)
    inputs = models.model_inputs(batch, dual=dual)

    def loss_fn(params):
      logits = models.apply(model, params, state.random_features, inputs, train=True,
                            rng=step_rng)
      loss_sum, correct, count = _loss_and_counts(logits, batch["targets"], batch["weights"])
      count = jnp.maximum(count, 1.0)
      return loss_sum / count, correct / count

    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
  return train_step


def make_eval_step(model, *, dual: bool) -> Callable:
  """``(state, batch) -> (loss_sum, correct, count)`` (padding examples have weight 0)."""
  def eval_step(state: TrainState, batch: dict):
    logits = models.apply(model, state.params, state.random_features,
                          models.model_inputs(batch, dual=dual), train=False)
    return _loss_and_counts(logits, batch["targets"], batch["weights"])
  return eval_step


# --------------------------------------------------------------------------------------------
# Data.


def _pad_to(arrays: dict, seq_len: int) -> dict:
  """Right-pads the token arrays with 0 to ``seq_len`` (the power-of-two model length)."""
  out = {}
  for key, value in arrays.items():
    value = np.asarray(value)
    if key.startswith("inputs") and value.shape[1] < seq_len:
      value = np.pad(value, ((0, 0), (0, seq_len - value.shape[1])))
    elif key.startswith("inputs") and value.shape[1] > seq_len:
      raise ValueError(f"{key} has length {value.shape[1]} > config.seq_len={seq_len}.")
    out[key] = value
  return out


def load_datasets(config: ml_collections.ConfigDict, task: Any) -> dict[str, dict]:
  """``{split: arrays}`` for train, validation and test, padded to ``config.seq_len``."""
  return {split: _pad_to(task.load(split, data_dir=config.data_dir,
                                   max_length=config.max_length), config.seq_len)
          for split in _SPLITS}


class _Sharder:
  """Turns per-host numpy batches into global arrays sharded over the ``data`` mesh axis."""

  def __init__(self, mesh):
    self.data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    self.replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def __call__(self, host_batch: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(self.data, np.asarray(v))
            for k, v in host_batch.items()}


# --------------------------------------------------------------------------------------------
# Output: metrics writers, memory.


class MetricWriter:
  """TensorBoard (tensorboardX) + JSON lines, on process 0 only."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

  def write(self, step: int, split: str, metrics: dict) -> None:
    """Logs ``metrics`` (name -> scalar, cast with ``float``) at ``step``.

    TensorBoard gets ``"{split}/{name}"`` scalars; ``metrics.jsonl`` gets one line
    ``{"step", "split", "time", **metrics}``, flushed. No-op when disabled.
    """
    if not self.enabled:
      return
    metrics = {k: float(v) for k, v in metrics.items()}
    for k, v in metrics.items():
      self._tb.add_scalar(f"{split}/{k}", v, step)
    self._jsonl.write(json.dumps({"step": step, "split": split, "time": time.time(),
                                  **metrics}) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    """Closes the TensorBoard writer and the JSON lines file (no-op when disabled)."""
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def compiled_memory(compiled: Any) -> Optional[dict[str, int]]:
  """Static memory of a compiled executable (``jit(f).lower(...).compile()``).

  ``total_bytes`` = arguments + outputs + temporaries - aliased (donated) bytes: what the
  executable holds at once if nothing else is live. ``peak_bytes`` is XLA's own estimate
  where the backend reports one. Returns None if the backend has no memory analysis. (XLA:CPU's
  ``peak_memory_in_bytes`` leaves out temporaries, so ``total_bytes`` is the figure to use.)
  """
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if stats is None:
    return None
  out = {name: int(getattr(stats, f"{name}_size_in_bytes", 0) or 0)
         for name in ("argument", "output", "temp", "alias", "generated_code")}
  out["total_bytes"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  peak = getattr(stats, "peak_memory_in_bytes", None)
  out["peak_bytes"] = int(peak) if peak else None
  return out


def peak_memory(compiled_step) -> tuple[Optional[int], str]:
  """Peak device memory in bytes and where it comes from.

  ``memory_stats()["peak_bytes_in_use"]`` (max over local devices; process-lifetime peak) where
  the backend reports it (GPU, TPU); otherwise the compiled train step's ``memory_analysis()``
  (CPU): ``compiled_memory(...)['total_bytes']``, an XLA estimate of one step's footprint.
  """
  peaks = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  if peaks:
    return max(peaks), "memory_stats.peak_bytes_in_use"
  static = compiled_memory(compiled_step)
  if static is None:
    return None, "unavailable"
  return static["total_bytes"], "compiled.memory_analysis"


# --------------------------------------------------------------------------------------------
# The loop.


def _checkpoint_args(state: TrainState, meta: dict):
  return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))


def _restore(manager, step: int, abstract_state) -> tuple[TrainState, dict]:
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  return restored["state"], dict(restored["meta"])


def _say(message: str) -> None:
  """A message for the user, on process 0 (also logged)."""
  logging.info(message)
  if jax.process_index() == 0:
    print(message, flush=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       datasets: Optional[dict[str, dict]] = None,
                       stop_at_step: Optional[int] = None) -> dict:
  """Trains, evaluates and tests; returns (and writes to ``workdir/results.json``) the results.

  Args:
    config: a config from ``configs/`` (see ``configs/base.py`` for the fields).
    workdir: output directory; a run in a directory with checkpoints resumes from the latest.
    datasets: optional ``{"train"|"validation"|"test": arrays}`` in the format of
      ``Task.load`` instead of loading the task's data (tests, notebooks).
    stop_at_step: return after checkpointing at this step, without testing, as if the job were
      preempted there (the next call resumes); None trains to the end.
  """
  from lra_benchmarks import data as lra_data  # pylint: disable=g-import-not-at-top
  from lra_benchmarks.data import input_pipeline  # pylint: disable=g-import-not-at-top

  task = lra_data.get_task(config.task)
  model_config = validate_config(config, task)
  check_batch_divides(config.batch_size)
  eval_batch_size = config.eval_batch_size or config.batch_size
  check_batch_divides(eval_batch_size, "config.eval_batch_size")
  is_main = jax.process_index() == 0
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))

  if datasets is None:
    datasets = load_datasets(config, task)
  else:
    datasets = {split: _pad_to(arrays, config.seq_len) for split, arrays in datasets.items()}
  process_index, process_count = jax.process_index(), jax.process_count()
  host_batch = config.batch_size // process_count
  host_eval_batch = eval_batch_size // process_count

  # Model, optimiser, state.
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  shard = _Sharder(mesh)
  model = models.build_model(model_config, dual=task.dual, padded=task.padded)
  tx = make_optimizer(config)
  example = models.model_inputs(
      {k: np.zeros((1, config.seq_len), np.int32) for k in ("inputs", "inputs1", "inputs2")},
      dual=task.dual)
  root_key = jax.random.PRNGKey(config.seed)
  init_key, step_key = jax.random.split(root_key)

  @functools.partial(jax.jit, out_shardings=shard.replicated)
  def init_state():
    variables = models.init_variables(model, init_key, example)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      random_features=variables.get("random_features", {}), rng=step_key)

  state = init_state()
  num_params = models.param_count(state.params)

  # Checkpoints: the latest (resume) and the best by validation accuracy (final test).
  options = dict(create=True, enable_async_checkpointing=True)
  latest_mngr = ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"), item_names=("state", "meta"),
      options=ocp.CheckpointManagerOptions(max_to_keep=max(config.keep_checkpoints, 1), **options))
  best_mngr = ocp.CheckpointManager(
      os.path.join(workdir, "best"), item_names=("state", "meta"),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, **options))
  abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  meta = {"best_accuracy": -1.0, "best_step": -1, "evals_since_best": 0, "train_time_s": 0.0,
          "finished": False, "stopped_early": False}
  latest = latest_mngr.latest_step()
  if latest is not None:
    state, meta = _restore(latest_mngr, latest, abstract_state)
    _say(f"Resumed from {latest_mngr.directory} at step {latest}.")
  start_step = int(state.step)
  # A best checkpoint past the resume point was saved by the interrupted run after its last
  # regular checkpoint; this run recomputes those steps, so it must not outlive them.
  for stale in [s for s in best_mngr.all_steps() if s > start_step]:
    best_mngr.delete(stale)

  train_step = jax.jit(make_train_step(model, tx, learning_rate_schedule(config),
                                       dual=task.dual),
                       out_shardings=(shard.replicated, shard.replicated), donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(model, dual=task.dual), out_shardings=shard.replicated)
  redraw = None
  if config.model.redraw_every and state.random_features:
    from spectraformer_jax import layers  # pylint: disable=g-import-not-at-top

    def redraw_features(state):
      key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)
      variables = layers.redraw_random_features(
          model, {"params": state.params, "random_features": state.random_features}, key,
          *example, train=False)
      return state.replace(random_features=variables["random_features"])
    redraw = jax.jit(redraw_features, out_shardings=shard.replicated)

  def evaluate(state: TrainState, split: str, max_batches: int = -1) -> dict:
    totals = (0.0, 0.0, 0.0)  # (loss, correct, count) sums, kept on device until the end
    batches = input_pipeline.eval_batches(datasets[split], host_eval_batch,
                                          process_index=process_index,
                                          process_count=process_count)
    for i, batch in enumerate(batches):
      if 0 <= max_batches <= i:
        break
      totals = tuple(t + s for t, s in zip(totals, eval_step(state, shard(batch))))
    loss, correct, count = jax.device_get(totals)
    count = max(float(count), 1.0)
    return {"loss": float(loss) / count, "accuracy": float(correct) / count, "examples": count}

  writer = MetricWriter(workdir, is_main)
  train_iter: Iterator[dict] = input_pipeline.train_batches(
      datasets["train"], host_batch, seed=config.seed, start_step=start_step,
      process_index=process_index, process_count=process_count)
  first_batch = shard(next(train_iter))
  compiled = train_step.lower(state, first_batch).compile()  # AOT: also gives memory_analysis
  end_step = config.num_train_steps if stop_at_step is None else min(stop_at_step,
                                                                      config.num_train_steps)
  progress = None
  if is_main and config.progress_bar and not meta["finished"]:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    progress = tqdm(total=config.num_train_steps, initial=start_step, desc=f"{config.task}",
                    unit="step", dynamic_ncols=True)

  step_time = 0.0   # seconds in train steps only (excludes the first, compiling, step)
  timed_steps = 0
  run_start = time.perf_counter()
  segment_start, segment_steps = time.perf_counter(), 0
  pending = []  # device metrics since the last log
  step = start_step
  first_step_of_run = True

  def close_segment():
    nonlocal step_time, timed_steps, segment_start, segment_steps
    jax.block_until_ready(state.step)
    now = time.perf_counter()
    if segment_steps:
      step_time += now - segment_start
      timed_steps += segment_steps
    segment_start, segment_steps = now, 0

  def save(step: int) -> None:
    meta["train_time_s"] = meta_time_base + (time.perf_counter() - run_start)
    latest_mngr.save(step, args=_checkpoint_args(state, meta), force=True)

  meta_time_base = meta["train_time_s"]
  while not meta["finished"] and step < end_step:
    if redraw is not None and step % config.model.redraw_every == 0 and step > 0:
      state = redraw(state)
    if first_batch is not None:
      batch, first_batch = first_batch, None
    else:
      batch = shard(next(train_iter))
    state, metrics = compiled(state, batch)
    step += 1
    pending.append(metrics)
    if first_step_of_run:
      jax.block_until_ready(state.step)
      segment_start, first_step_of_run = time.perf_counter(), False
    else:
      segment_steps += 1
    if progress is not None:
      progress.update(1)

    if step % config.log_every == 0 or step == end_step:
      close_segment()
      values = jax.device_get(pending)
      pending = []
      summary = {k: float(np.mean([m[k] for m in values])) for k in values[0]}
      summary["steps_per_second"] = timed_steps / step_time if step_time > 0 else 0.0
      writer.write(step, "train", summary)
      if progress is not None:
        progress.set_postfix(loss=f"{summary['loss']:.4f}", acc=f"{summary['accuracy']:.3f}")
      segment_start = time.perf_counter()

    if step % config.eval_every == 0 or step == config.num_train_steps:
      close_segment()
      val = evaluate(state, "validation", config.num_eval_steps)
      writer.write(step, "validation", val)
      if progress is not None:
        progress.write(f"step {step}: validation loss {val['loss']:.4f} "
                       f"accuracy {val['accuracy']:.4f}")
      if val["accuracy"] > meta["best_accuracy"]:
        meta.update(best_accuracy=float(val["accuracy"]), best_step=step, evals_since_best=0)
        best_mngr.save(step, args=_checkpoint_args(state, meta), force=True)
      else:
        meta["evals_since_best"] += 1
        if config.patience and meta["evals_since_best"] >= config.patience:
          meta.update(stopped_early=True, finished=True)
          _say(f"Early stop at step {step}: no improvement in {config.patience} evaluations.")
      if step == config.num_train_steps:
        meta["finished"] = True
      segment_start = time.perf_counter()

    if (step % config.checkpoint_every == 0 or meta["finished"] or step == end_step):
      close_segment()
      save(step)
      segment_start = time.perf_counter()

  if progress is not None:
    progress.close()
  total_train_time = meta_time_base + (time.perf_counter() - run_start) if step > start_step \
      else meta["train_time_s"]
  latest_mngr.wait_until_finished()
  best_mngr.wait_until_finished()

  results: dict[str, Any] = {}
  if meta["finished"]:
    test_state = state
    if best_mngr.latest_step() is not None:
      test_state, _ = _restore(best_mngr, best_mngr.latest_step(), abstract_state)
    test = evaluate(test_state, "test")
    writer.write(step, "test", test)
    memory, memory_source = peak_memory(compiled)
    results = {
        "task": config.task,
        "attention": config.model.attention,
        "component": config.model.component if config.model.attention == "spectraformer" else None,
        "weight": config.model.weight if config.model.attention == "spectraformer" else None,
        "num_features": (config.model.num_features
                         if config.model.attention == "spectraformer" else None),
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "test_examples": test["examples"],
        "best_validation_accuracy": meta["best_accuracy"],
        "best_step": meta["best_step"],
        "steps": step,
        "stopped_early": meta["stopped_early"],
        # The training loop's wall time over all resumed runs: periodic evaluation and
        # checkpointing included; data loading and the train step's compilation excluded.
        "train_wall_time_s": total_train_time,
        "steps_per_second": timed_steps / step_time if step_time > 0 else None,
        "steps_per_second_note": "train steps of the last process run, excluding the compiling "
                                 "first step, evaluation and checkpointing",
        "peak_memory_bytes": memory,
        "peak_memory_source": memory_source,
        "param_count": num_params,
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "config": config.to_dict(),
    }
    if is_main:
      with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=str)
  writer.close()
  latest_mngr.close()
  best_mngr.close()
  return results


def final_params(workdir: str) -> Any:
  """The params of the latest checkpoint in ``workdir``, for inspection and tests."""
  with ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                             item_names=("state", "meta")) as mngr:
    restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))
  return restored["state"]["params"]

