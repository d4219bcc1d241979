"""The trainer: one data-parallel loop for every task (LRA, MQAR, byte-level LM) and attention.

``train_and_evaluate(config, workdir)`` trains with AdamW (linear warm-up and decay as the
Spectraformer study, or LRA's rsqrt schedule), evaluates on validation every
``config.eval_every`` steps, stops early after ``config.patience`` evaluations without
improvement, checkpoints every ``config.checkpoint_every`` steps with orbax (resuming from the
latest checkpoint in ``workdir``), and finally tests the checkpoint with the best validation
accuracy. It writes ``workdir/results.json``, TensorBoard events (``workdir/tensorboard``) and a
JSON-lines log (``workdir/metrics.jsonl``).

Per-token tasks (``Task.per_token``: MQAR, LM) train the causal ``models.Decoder`` on
token-level cross-entropy over the positions that have a target (``data.IGNORE`` elsewhere);
accuracy is over those positions (MQAR: the query positions).  Task options (vocabulary,
number of pairs, corpus split) come from ``config.task_options``; for ``lm``, results also
report bits per byte (mean nats per byte / ln 2).

Data parallelism: ``jax.jit`` over a one-axis device ``Mesh``; the state is replicated, each
batch is sharded over the ``data`` axis (``jax.make_array_from_process_local_data``), so the same
code runs on one CPU, several GPUs or several hosts (call ``jax.distributed.initialize()`` first).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Optional

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from lra_benchmarks import data as lra_data
from lra_benchmarks import models
from lra_benchmarks.data import IGNORE
from lra_benchmarks.data import input_pipeline
from lra_benchmarks.training import checkpoints as checkpoints_lib
from lra_benchmarks.training import evaluate as evaluate_lib
from lra_benchmarks.training import interrupts
from lra_benchmarks.training import progress as progress_lib
from lra_benchmarks.training import workdir as workdir_lib
from spectraformer_jax import layers

SCHEDULES = ("linear", "rsqrt", "constant")
_SPLITS = ("train", "validation", "test")
BITS_PER_BYTE_TASKS = ("lm",)  # byte-level tasks whose results report bits per byte


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
  if config.validation not in evaluate_lib.PROTOCOLS:
    bad("validation", f"must be one of {evaluate_lib.PROTOCOLS}")
  if not 0 < config.heldout_fraction < 1:
    bad("heldout_fraction", "must be in (0, 1)")
  if config.resume not in workdir_lib.RESUME_MODES:
    bad("resume", f"must be one of {workdir_lib.RESUME_MODES}")
  if not config.checkpoint_every_seconds >= 0:
    bad("checkpoint_every_seconds", "must be non-negative (0 disables)")
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
  vocab_size, num_classes = task.sizes(**task_options(config))
  model_config = models.ModelConfig.from_config(
      config.model, vocab_size=vocab_size, num_classes=num_classes, max_len=config.seq_len)
  model_config.validate()
  if task.causal:
    model_config.validate_causal()
  if not isinstance(config.model.redraw_every, int) or config.model.redraw_every < 0:
    raise ValueError(f"config.model.redraw_every={config.model.redraw_every!r}: must be a "
                     "non-negative integer (0: never)")
  return model_config


def task_options(config: ml_collections.ConfigDict) -> dict:
  """``config.task_options`` as keyword arguments of ``Task.load`` (``{}`` when absent)."""
  return config.task_options.to_dict() if "task_options" in config else {}


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
  """``(loss sum, correct, count)`` of a batch.  Classification: logits ``[B, C]``, targets
  ``int[B]``, example weights ``[B]``.  Per-token: logits ``[B, L, C]``, targets ``int[B, L]``
  (``IGNORE`` = no target), each target position weighted by its example's weight."""
  if targets.ndim == 2:
    has_target = targets != IGNORE
    weights = weights[:, None] * has_target
    targets = jnp.where(has_target, targets, 0)
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
                                   max_length=config.max_length, **task_options(config)),
                         config.seq_len)
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
# The model and its compiled steps.


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a config compiles to: the sharder, a fresh state and the jitted steps.

  ``redraw`` (a fresh fixed W for the state) is None unless ``config.model.redraw_every`` > 0;
  the loop calls it only for models that hold fixed random features.
  """
  shard: _Sharder
  init_state: Callable[[], TrainState]
  train_step: Callable
  eval_step: Callable
  redraw: Optional[Callable]


def build(config: ml_collections.ConfigDict, task: Any,
          model_config: models.ModelConfig) -> Setup:
  """The model of ``config`` on a one-axis ``data`` mesh over every device, its optimiser,
  state initialiser (init and step keys split from ``PRNGKey(config.seed)``) and jitted
  steps (nothing is compiled until first use)."""
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  shard = _Sharder(mesh)
  model = models.build_model(model_config, dual=task.dual, padded=task.padded,
                             per_token=task.per_token, causal=task.causal)
  tx = make_optimizer(config)
  example = models.model_inputs(
      {k: np.zeros((1, config.seq_len), np.int32) for k in ("inputs", "inputs1", "inputs2")},
      dual=task.dual)
  init_key, step_key = jax.random.split(jax.random.PRNGKey(config.seed))

  @functools.partial(jax.jit, out_shardings=shard.replicated)
  def init_state():
    variables = models.init_variables(model, init_key, example)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      random_features=variables.get("random_features", {}), rng=step_key)

  train_step = jax.jit(make_train_step(model, tx, learning_rate_schedule(config),
                                       dual=task.dual),
                       out_shardings=(shard.replicated, shard.replicated), donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(model, dual=task.dual), out_shardings=shard.replicated)
  redraw = None
  if config.model.redraw_every:

    def redraw_features(state):
      key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)
      variables = layers.redraw_random_features(
          model, {"params": state.params, "random_features": state.random_features}, key,
          *example, train=False)
      return state.replace(random_features=variables["random_features"])
    redraw = jax.jit(redraw_features, out_shardings=shard.replicated)
  return Setup(shard, init_state, train_step, eval_step, redraw)


def make_evaluator(setup: Setup, datasets: dict[str, dict], config: ml_collections.ConfigDict,
                   reporter: progress_lib.ProgressReporter,
                   should_stop: Callable[[], bool] = lambda: False) -> evaluate_lib.Evaluator:
  """An evaluator over this host's share of ``datasets`` (``config.eval_batch_size``)."""
  index, count = jax.process_index(), jax.process_count()
  host_batch = (config.eval_batch_size or config.batch_size) // count
  return evaluate_lib.Evaluator(
      setup.eval_step,
      lambda split: input_pipeline.eval_batches(datasets[split], host_batch,
                                                process_index=index, process_count=count),
      lambda split: input_pipeline.num_eval_batches(len(datasets[split]["targets"]), host_batch,
                                                    count),
      setup.shard, progress=reporter.evaluation if reporter.show_progress else None,
      should_stop=should_stop)


# --------------------------------------------------------------------------------------------
# Resuming.


def initial_meta() -> dict:
  """The run's bookkeeping saved with each checkpoint (JSON)."""
  return {"best_accuracy": -1.0, "best_step": -1, "evals_since_best": 0, "train_time_s": 0.0,
          "step_seconds": 0.0, "timed_steps": 0, "finished": False, "stopped_early": False}


def _verify(step: int, state: TrainState, meta: dict) -> None:
  """Raises ValueError unless a restored checkpoint is consistent with its step."""
  if int(state.step) != step:
    raise ValueError(f"its state is at step {int(state.step)}, not {step}")
  missing = set(initial_meta()) - set(meta) - {"step_seconds", "timed_steps"}
  if missing:
    raise ValueError(f"its meta lacks {sorted(missing)}")


def resume(latest: checkpoints_lib.CheckpointStore, best: checkpoints_lib.CheckpointStore,
           init_state: Callable[[], TrainState], config: ml_collections.ConfigDict,
           say: Callable[[str], None]) -> tuple[TrainState, dict]:
  """The newest readable checkpoint of ``latest`` (else ``init_state()``) and its meta, with
  ``finished`` recomputed for this config (a larger ``num_train_steps`` continues training; an
  early stop stands unless ``patience`` grew). Best checkpoints past the resume point are
  dropped (this run recomputes those steps)."""
  abstract = jax.eval_shape(init_state)  # shapes, dtypes and shardings; nothing computed
  hint = "Use a new --workdir for this config (or move the checkpoints directory away)."
  found = latest.restore_latest(abstract, verify=_verify, hint=hint)
  meta = initial_meta()
  if found is None:
    state = init_state()
  else:
    step, state, saved = found
    meta.update(saved)
    say(f"Resumed from {latest.directory}/{step}.")
  step = int(state.step)
  if step > config.num_train_steps:
    raise workdir_lib.WorkdirError(
        f"{os.path.dirname(latest.directory)} holds a checkpoint at step {step}, past "
        f"config.num_train_steps={config.num_train_steps}: pass --config.num_train_steps={step} "
        "or more to finish that run, or use a new --workdir.")
  meta["stopped_early"] = bool(config.patience and meta["evals_since_best"] >= config.patience)
  meta["finished"] = meta["stopped_early"] or step >= config.num_train_steps
  best.delete_after(step)
  return state, meta


def _restore_best(best: checkpoints_lib.CheckpointStore, state: TrainState, step: int,
                  say: Callable[[str], None]) -> tuple[TrainState, int]:
  """The best checkpoint's state and step; ``(state, step)`` if there is none readable."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  try:
    found = best.restore_latest(abstract, verify=_verify)
  except checkpoints_lib.CheckpointError as e:
    say(f"{e} Testing the final state (step {step}) instead.")
    found = None
  return (found[1], found[0]) if found is not None else (state, step)


class _StepClock:
  """Seconds spent in train steps: runs between ``run()`` and ``pause(x)`` (which first waits
  for ``x``, so the device work dispatched before is included)."""

  def __init__(self):
    self.seconds, self.steps = 0.0, 0
    self._since, self._pending = None, 0

  def run(self) -> None:
    """Starts (or keeps) timing."""
    if self._since is None:
      self._since = time.perf_counter()

  def count(self) -> None:
    """Counts one dispatched step (credited at the next ``pause``)."""
    self._pending += 1

  def pause(self, ready: Any) -> None:
    """Waits for ``ready``, then adds the time and steps since ``run`` to the totals."""
    jax.block_until_ready(ready)
    if self._since is not None:
      self.seconds += time.perf_counter() - self._since
      self.steps += self._pending
    self._since, self._pending = None, 0


# --------------------------------------------------------------------------------------------
# The loop.


def _sayer(reporter: progress_lib.ProgressReporter) -> Callable[[str], None]:
  """A message for the user, printed on process 0 (also logged)."""
  def say(message: str) -> None:
    logging.info(message)
    reporter.message(message)
  return say


def _prepare(config: ml_collections.ConfigDict, task: Any, model_config: models.ModelConfig,
             datasets: Optional[dict[str, dict]]):
  """``(reporter, say, datasets, setup)`` of a run: the progress reporter (process 0 only), its
  message function, the splits of ``config.validation``'s protocol (loaded, or ``datasets``
  padded to ``config.seq_len``) and the built model/optimiser."""
  reporter = progress_lib.ProgressReporter(config.task, config.num_train_steps,
                                           enabled=jax.process_index() == 0,
                                           show_progress=config.progress_bar)
  datasets = evaluate_lib.protocol_splits(
      load_datasets(config, task) if datasets is None else
      {split: _pad_to(arrays, config.seq_len) for split, arrays in datasets.items()},
      config.validation, config.heldout_fraction)
  return reporter, _sayer(reporter), datasets, build(config, task, model_config)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       datasets: Optional[dict[str, dict]] = None,
                       stop_at_step: Optional[int] = None,
                       stop: Optional[interrupts.StopRequest] = None) -> dict:
  """Trains, evaluates and tests; returns (and writes to ``workdir/results.json``) the results.

  Args:
    config: a config from ``configs/`` (see ``lra_benchmarks.config_lib`` for the fields).
    workdir: output directory; a run in a directory with checkpoints resumes from the newest
      readable one (the directory's ``config.json`` must match, see ``training.workdir``).
    datasets: optional ``{"train"|"validation"|"test": arrays}`` in the format of
      ``Task.load`` instead of loading the task's data (tests, notebooks).
    stop_at_step: return ``{}`` after checkpointing at this step, without testing, as if the
      job were preempted there (the next call resumes); None trains to the end.
    stop: the stop request polled every step (default: SIGINT/SIGTERM handlers installed for
      the call). When it is set, the state is checkpointed and ``Interrupted`` raised.

  Raises:
    WorkdirError, CheckpointError, Interrupted, ValueError (bad config), DataNotFoundError.
  """
  task = lra_data.get_task(config.task)
  model_config = validate_config(config, task)
  check_batch_divides(config.batch_size)
  check_batch_divides(config.eval_batch_size or config.batch_size, "config.eval_batch_size")
  is_main = jax.process_index() == 0
  workdir = workdir_lib.prepare(workdir, config)
  reporter, say, datasets, setup = _prepare(config, task, model_config, datasets)
  results_path = os.path.join(workdir, "results.json")
  with checkpoints_lib.CheckpointStore(os.path.join(workdir, "checkpoints"),
                                       max_to_keep=config.keep_checkpoints, say=say) as latest, \
       checkpoints_lib.CheckpointStore(os.path.join(workdir, "best"), max_to_keep=1,
                                       say=say) as best, \
       stop or interrupts.StopRequest(say=say) as stop:
    state, meta = resume(latest, best, setup.init_state, config, say)
    if is_main:
      workdir_lib.store_config(workdir, config)
    previous = workdir_lib.load_json(results_path)
    if meta["finished"] and previous and previous.get("steps") == int(state.step):
      say(f"Already finished at step {int(state.step)}: results in {results_path}.")
      return previous
    evaluator = make_evaluator(setup, datasets, config, reporter, lambda: stop.requested)
    with contextlib.closing(MetricWriter(workdir, is_main)) as writer:
      state, compiled = _train(config, setup, state, meta, datasets["train"], stop_at_step,
                               stores=(latest, best), evaluator=evaluator, writer=writer,
                               reporter=reporter, stop=stop)
      step = int(state.step)
      if stop.requested:
        raise interrupts.Interrupted(stop.signum, step, latest.directory)
      if not meta["finished"]:
        return {}
      tested_state, tested_step = _restore_best(best, state, step, say)
      test = evaluator(tested_state, "test")
      reporter.close()
      if test is None:
        raise interrupts.Interrupted(stop.signum, step, latest.directory)
      writer.write(step, "test", test)
  results = _results(config, meta, test, step=step, tested_step=tested_step, compiled=compiled,
                     param_count=models.param_count(state.params))
  if is_main:
    workdir_lib.write_json(results_path, results)
  return results


def _train(config: ml_collections.ConfigDict, setup: Setup, state: TrainState, meta: dict,
           train: dict, stop_at_step: Optional[int], *,
           stores: tuple[checkpoints_lib.CheckpointStore, checkpoints_lib.CheckpointStore],
           evaluator: evaluate_lib.Evaluator, writer: MetricWriter,
           reporter: progress_lib.ProgressReporter,
           stop: interrupts.StopRequest) -> tuple[TrainState, Any]:
  """The training loop from ``state.step``: logs, validates (model selection, early stopping),
  checkpoints every ``checkpoint_every`` steps or ``checkpoint_every_seconds``, at the end and
  on a stop request. Updates ``meta``; returns the final state and the compiled train step."""
  latest, best = stores
  step = int(state.step)
  batches = input_pipeline.train_batches(
      train, config.batch_size // jax.process_count(), seed=config.seed, start_step=step,
      process_index=jax.process_index(), process_count=jax.process_count())
  batch = setup.shard(next(batches))
  compiled = setup.train_step.lower(state, batch).compile()  # AOT: also gives memory_analysis
  end_step = min(config.num_train_steps, stop_at_step or config.num_train_steps)
  clock, pending, shown = _StepClock(), [], {}
  run_start = last_save = time.perf_counter()
  earlier = (meta["train_time_s"], meta["step_seconds"], meta["timed_steps"])

  def save(step: int) -> None:
    nonlocal last_save
    clock.pause(state)
    meta.update(train_time_s=earlier[0] + time.perf_counter() - run_start,
                step_seconds=earlier[1] + clock.seconds, timed_steps=earlier[2] + clock.steps)
    latest.save(step, state, meta)
    last_save = time.perf_counter()

  def log(step: int) -> dict:
    """Writes the mean metrics of the steps since the last log; returns loss and accuracy."""
    nonlocal pending
    clock.pause(pending[-1])
    values, pending = jax.device_get(pending), []
    summary = {k: float(np.mean([m[k] for m in values])) for k in values[0]}
    summary["steps_per_second"] = clock.steps / clock.seconds if clock.seconds else 0.0
    writer.write(step, "train", summary)
    return {"loss": summary["loss"], "accuracy": summary["accuracy"]}

  reporter.start(step)
  while not meta["finished"] and step < end_step and not stop.requested:
    clock.run()
    if (setup.redraw is not None and state.random_features
        and step % config.model.redraw_every == 0 and step > 0):
      state = setup.redraw(state)
    batch = batch if batch is not None else setup.shard(next(batches))
    state, metrics = compiled(state, batch)
    batch, step = None, step + 1
    clock.count()
    pending.append(metrics)
    if step % config.log_every == 0 or step == end_step:
      shown = log(step)
    if reporter.due() or step == end_step:
      jax.block_until_ready(metrics)  # show only steps the device has finished
      reporter.train(step, **shown)
    if step % config.eval_every == 0 or step == config.num_train_steps:
      clock.pause(metrics)
      val = evaluator(state, "validation", config.num_eval_steps)
      if val is None:  # stopped during the evaluation: checkpoint below
        break
      writer.write(step, "validation", val)
      reporter.message(f"step {step}: validation loss {val['loss']:.4f} "
                       f"accuracy {val['accuracy']:.4f}")
      _select(meta, step, val, config, best, state, reporter.message)
    if (step % config.checkpoint_every == 0 or meta["finished"] or step == end_step or (
        config.checkpoint_every_seconds
        and time.perf_counter() - last_save >= config.checkpoint_every_seconds)):
      save(step)
  reporter.close()
  if pending:  # stopped between logs: nothing trained goes unlogged
    log(step)
  if stop.requested and step > 0 and step not in latest.steps():
    save(step)
  latest.wait()
  best.wait()
  return state, compiled


def _results(config: ml_collections.ConfigDict, meta: dict, test: dict, *, step: int,
             tested_step: int, compiled: Any, param_count: int) -> dict:
  """The ``results.json`` record of a finished run."""
  memory, memory_source = peak_memory(compiled)
  spectraformer = config.model.attention == "spectraformer"
  per_byte = ({"test_bits_per_byte": test["loss"] / math.log(2)}
              if config.task in BITS_PER_BYTE_TASKS else {})
  return {
      "task": config.task,
      "attention": config.model.attention,
      "component": config.model.component if spectraformer else None,
      "weight": config.model.weight if spectraformer else None,
      "num_features": config.model.num_features if spectraformer else None,
      "protocol": config.validation,
      "test_accuracy": test["accuracy"],
      "test_loss": test["loss"],
      "test_examples": test["examples"],  # per-token tasks: the number of target positions
      **per_byte,
      "validation_accuracy": meta["best_accuracy"],  # at best_step: the selected model
      "best_validation_accuracy": meta["best_accuracy"],
      "best_step": meta["best_step"],
      "tested_step": tested_step,
      "steps": step,
      "stopped_early": meta["stopped_early"],
      # The training loop's wall time over all resumed runs: periodic evaluation and
      # checkpointing included; data loading and the train step's compilation excluded.
      "train_wall_time_s": meta["train_time_s"],
      "steps_per_second": (meta["timed_steps"] / meta["step_seconds"]
                           if meta["step_seconds"] > 0 else None),
      "steps_per_second_note": "train steps over all resumed runs (compiled ahead of time), "
                               "excluding evaluation, logging and checkpointing",
      "peak_memory_bytes": memory,
      "peak_memory_source": memory_source,
      "param_count": param_count,
      "devices": jax.device_count(),
      "device_kind": jax.devices()[0].device_kind,
      "jax_version": jax.__version__,
      "config": config.to_dict(),
  }


def _select(meta: dict, step: int, val: dict, config: ml_collections.ConfigDict,
            best: checkpoints_lib.CheckpointStore, state: TrainState,
            say: Callable[[str], None]) -> None:
  """Model selection and early stopping after a validation at ``step``: a better accuracy
  saves ``state`` as the best checkpoint; ``config.patience`` evaluations without one stop."""
  if val["accuracy"] > meta["best_accuracy"]:
    meta.update(best_accuracy=float(val["accuracy"]), best_step=step, evals_since_best=0)
    best.save(step, state, meta)
  else:
    meta["evals_since_best"] += 1
    if config.patience and meta["evals_since_best"] >= config.patience:
      meta.update(stopped_early=True, finished=True)
      say(f"Early stop at step {step}: no improvement in {config.patience} evaluations.")
  if step == config.num_train_steps:
    meta["finished"] = True


def final_params(workdir: str) -> Any:
  """The params of the latest checkpoint in ``workdir``, for inspection and tests."""
  store = checkpoints_lib.CheckpointStore(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                          max_to_keep=1)
  try:
    return store.restore(store.steps()[-1])[0]["params"]
  finally:
    store.close()


def checkpoint_candidates(path: str) -> list[tuple[str, Optional[int]]]:
  """Where the model to evaluate lies: ``[(store directory, step or None for the newest)]``.

  ``path`` is a workdir (its ``best`` store, then ``checkpoints``), a store directory (holding
  ``<step>/`` directories) or one step's directory (``.../<step>`` holding ``state/``).
  """
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise checkpoints_lib.CheckpointError(f"--checkpoint={path} is not a directory.")
  stores = [os.path.join(path, d) for d in ("best", "checkpoints")
            if os.path.isdir(os.path.join(path, d))]
  if stores:
    return [(d, None) for d in stores]
  name = os.path.basename(path)
  if name.isdigit() and os.path.isdir(os.path.join(path, "state")):
    return [(os.path.dirname(path), int(name))]
  if any(d.isdigit() for d in os.listdir(path)):
    return [(path, None)]
  raise checkpoints_lib.CheckpointError(
      f"{path} holds no checkpoint: pass a workdir, its checkpoints/ or best/ directory, or "
      "one step's directory (e.g. WORKDIR/checkpoints/500).")


def evaluate_checkpoint(config: ml_collections.ConfigDict, path: str, *,
                        datasets: Optional[dict[str, dict]] = None) -> dict:
  """Validation and test figures of a saved model (whole splits, ``config.validation``
  protocol): ``{"checkpoint", "step", "protocol", "validation_accuracy", "validation_loss",
  "test_accuracy", "test_loss", ...}``. ``path`` as ``checkpoint_candidates``; the newest
  readable checkpoint of the first store that has one is used."""
  task = lra_data.get_task(config.task)
  model_config = validate_config(config, task)
  check_batch_divides(config.eval_batch_size or config.batch_size, "config.eval_batch_size")
  candidates = checkpoint_candidates(path)
  reporter, say, datasets, setup = _prepare(config, task, model_config, datasets)
  abstract = jax.eval_shape(setup.init_state)
  found, errors = None, []
  for directory, step in candidates:
    with checkpoints_lib.CheckpointStore(directory, max_to_keep=1, say=say) as store:
      try:
        if step is None:
          newest = store.restore_latest(abstract, verify=_verify)
          found = None if newest is None else (directory, *newest)
        else:
          found = (directory, step, *store.restore(step, abstract))
      except checkpoints_lib.CheckpointError as e:
        errors.append(str(e))
      except Exception as e:  # pylint: disable=broad-except
        errors.append(f"{directory}/{step}: {checkpoints_lib.short_error(e)}")
    if found is not None:
      break
  if found is None:
    raise checkpoints_lib.CheckpointError(
        f"No readable checkpoint for this config under {path}: {' '.join(errors)}")
  directory, step, state, _ = found
  evaluator = make_evaluator(setup, datasets, config, reporter)
  validation, test = evaluator(state, "validation"), evaluator(state, "test")
  reporter.close()
  return {"checkpoint": os.path.join(directory, str(step)), "step": step,
          "protocol": config.validation,
          "validation_accuracy": validation["accuracy"], "validation_loss": validation["loss"],
          "validation_examples": validation["examples"], "test_accuracy": test["accuracy"],
          "test_loss": test["loss"], "test_examples": test["examples"],
          "task": config.task, "attention": config.model.attention}
