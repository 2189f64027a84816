"""The training loop: setup (checks, mesh, state, checkpoints, data), steps, logging, eval, saving.

Order of setup, so that mistakes surface before anything expensive:
  1. config checks (model, mesh, batch divisibility, data/model agreement, tokenizer vocabulary);
  2. data iterator (first batch fetched: drops from a too-small max_token_len show up here);
  3. state: restored from the latest checkpoint in the workdir, or born sharded (optionally from
     pretrained weights);
  4. the train step compiled once; its memory estimate printed before step 1.
"""

import functools
import json
import logging
import os
import signal
import time
from typing import Any

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from ki.model import pi05
from ki.model import weights as weights_lib
from ki.train import checkpoint as checkpoint_lib
from ki.train import evaluation
from ki.train import metrics as metrics_lib
from ki.train import optimizer as optimizer_lib
from ki.train import sharding as sharding_lib
from ki.train import state as state_lib
from ki.train import step as step_lib

# The data config fields that must equal the model's (the pipeline pads and cuts to them).
_SHARED_DATA_FIELDS = ("action_dim", "action_horizon", "data_action_dim", "image_size")
# Training refuses to start when more than this fraction of the first batch's examples were
# dropped for being longer than max_token_len.
_MAX_TOO_LONG_FRACTION = 0.1


class NonFiniteLossError(RuntimeError):
  pass


def check_config(config: ml_collections.ConfigDict, mesh) -> pi05.Config:
  """Everything that can be refused before compiling; returns the validated model config."""
  model_config = pi05.Config(**config.model).validate()
  sharding_lib.check_batch_size(config.batch_size, mesh, config.grad_accum_steps)
  if config.get("data") is not None:
    mismatched = [
      f"data.{f}={config.data[f]} but model.{f}={getattr(model_config, f)}"
      for f in _SHARED_DATA_FIELDS
      if f in config.data and config.data[f] != getattr(model_config, f)
    ]
    if mismatched:
      raise ValueError(
        "The data and model configs disagree (set both to the same value): " + "; ".join(mismatched)
      )
  if config.loss.fast_weight and not model_config.fast_loss:
    raise ValueError("loss.fast_weight is non-zero but model.fast_loss is False; set one of them.")
  if config.total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {config.total_steps}")
  return model_config


def build_tokenizer(config: ml_collections.ConfigDict, model_config: pi05.Config):
  """The pi0.5 tokenizer from config.assets; vocabulary checked against the model's."""
  from ki.tokenizers import fast as fast_lib  # pylint: disable=g-import-not-at-top
  from ki.tokenizers import prompt as prompt_lib  # pylint: disable=g-import-not-at-top

  prompt_tokenizer = prompt_lib.PromptTokenizer(config.assets.prompt_tokenizer)
  if prompt_tokenizer.vocab_size != model_config.vocab_size:
    raise ValueError(
      f"The tokenizer {config.assets.prompt_tokenizer} has {prompt_tokenizer.vocab_size} pieces "
      f"but model.vocab_size={model_config.vocab_size}; set model.vocab_size to "
      f"{prompt_tokenizer.vocab_size} or use the matching tokenizer."
    )
  # The FAST postfix exists only when the model learns from it: a flow-only run's prompts carry no
  # FAST tokens (the data pipeline appends them iff the tokenizer has a FAST tokenizer).
  fast_tokenizer = None
  if model_config.fast_loss:
    if not config.assets.get("fast_tokenizer"):
      raise ValueError(
        "model.fast_loss is on but config.assets.fast_tokenizer is empty; set it to "
        "a FAST tokenizer folder (data_prep.fit_fast_tokenizer)."
      )
    fast_tokenizer = fast_lib.FastTokenizer.load(config.assets.fast_tokenizer)
  return prompt_lib.Pi05Tokenizer(
    prompt_tokenizer,
    fast_tokenizer,
    max_token_len=model_config.max_token_len,
    lm_vocab_size=model_config.vocab_size,
  )


def _read_assets(config: ml_collections.ConfigDict) -> dict[str, bytes]:
  """The files a policy needs next to the weights, plus the config that trained them."""
  assets = {"config.json": config.to_json_best_effort(indent=2).encode()}
  paths = config.get("assets") or {}
  if paths.get("norm_stats"):
    with open(paths.norm_stats, "rb") as f:
      assets["norm_stats.json"] = f.read()
  if paths.get("prompt_tokenizer"):
    with open(paths.prompt_tokenizer, "rb") as f:
      assets["tokenizer.model"] = f.read()
  if paths.get("fast_tokenizer"):
    for name in sorted(os.listdir(paths.fast_tokenizer)):
      with open(os.path.join(paths.fast_tokenizer, name), "rb") as f:
        assets[f"fast_tokenizer/{name}"] = f.read()
  return assets


# The config fields the data iterator's saved state depends on. Resuming with one of them changed
# cannot continue the same data stream (and Grain's restore fails obscurely, or not at all).
DATA_STATE_FIELDS = (
  "seed",
  "batch_size",
  "data.source",
  "data.num_workers",
  "data.robot_weight",
  "data.vlm_sources",
  "data.shuffle_window",
  "data.num_epochs",
)


def check_resumable(
  saved_config_json: str | bytes, config_json: str | bytes, checkpoint_dir: str
) -> None:
  """Refuses to resume from a checkpoint whose data settings (DATA_STATE_FIELDS) differ; both
  configs as the JSON a checkpoint's assets/config.json holds."""
  saved, current = json.loads(saved_config_json), json.loads(config_json)

  def get(tree, dotted):
    for key in dotted.split("."):
      tree = tree.get(key) if isinstance(tree, dict) else None
    return tree

  changed = [
    f"{field}: {get(saved, field)!r} in the checkpoint, {get(current, field)!r} now"
    for field in DATA_STATE_FIELDS
    if get(saved, field) != get(current, field)
  ]
  if changed:
    raise ValueError(
      f"Cannot resume from {checkpoint_dir}: the data stream it saved was made with other "
      "settings:\n  " + "\n  ".join(changed) + "\nResume with the settings in its "
      "assets/config.json, or start a new workdir from its weights (--config.init.kind=ki "
      f"--config.init.path={checkpoint_dir})."
    )


class Trainer:
  """One training run in `workdir`; resumes from the latest checkpoint there.

  train_iterator / eval_sets: optional data in place of the configured pipeline (tests use a
  deterministic in-memory iterator). eval_sets maps a name to a zero-argument callable returning
  a fresh iterable of host batches.
  """

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    train_iterator=None,
    eval_sets: dict[str, Any] | None = None,
  ):
    self.config = config
    self.workdir = workdir
    self.mesh = sharding_lib.make_mesh(config.mesh)
    self.model_config = check_config(config, self.mesh)
    self.per_host_batch_size = config.batch_size // jax.process_count()
    logging.info(
      "Mesh %s over %d devices (%d hosts); global batch %d, %d per host.",
      dict(self.mesh.shape),
      self.mesh.size,
      jax.process_count(),
      config.batch_size,
      self.per_host_batch_size,
    )

    self.norm_stats = None
    if config.get("assets") and config.assets.get("norm_stats"):
      from ki.data import normalize  # pylint: disable=g-import-not-at-top

      self.norm_stats = normalize.load_norm_stats(config.assets.norm_stats)
    self.train_iterator = train_iterator
    self.eval_sets = eval_sets
    if train_iterator is None:
      self.train_iterator, self.eval_sets = self._make_pipeline()
    self.assets = _read_assets(config)

    abstract_params = state_lib.abstract_params(self.model_config)
    self.tx, self.labels, self.schedules = optimizer_lib.make_optimizer(
      config.optimizer, abstract_params
    )
    self.use_ema = config.optimizer.get("ema_decay") is not None
    state_args = dict(
      seed=config.seed, use_ema=self.use_ema, fsdp_min_size_bytes=config.fsdp_min_size_bytes
    )
    state_shapes, self.state_shardings = state_lib.abstract_train_state(
      self.model_config, self.tx, self.mesh, **state_args
    )

    ckpt = config.checkpoint
    self.checkpointer = checkpoint_lib.Checkpointer(
      workdir,
      save_every=ckpt.every,
      max_to_keep=ckpt.max_to_keep,
      keep_period=ckpt.get("keep_period") or None,
      asynchronous=ckpt.asynchronous,
      save_params_item=ckpt.params_item,
    )
    latest = self.checkpointer.latest_step()
    if latest is not None:
      logging.info("Resuming from checkpoint %d in %s.", latest, self.checkpointer.directory)
      check_resumable(
        self.checkpointer.restore_assets(latest)["config.json"],
        self.assets["config.json"],
        os.path.join(self.checkpointer.directory, str(latest)),
      )
      self.state = self.checkpointer.restore(
        latest,
        checkpoint_lib.abstract_with_shardings(state_shapes, self.state_shardings),
        data_iterator=self.train_iterator,
      )
    else:
      params = self._pretrained_params(abstract_params)
      self.state, _ = state_lib.create_train_state(
        self.model_config, self.tx, self.mesh, params=params, **state_args
      )
    self.start_step = int(jax.device_get(self.state.step))

    self.settings = step_lib.StepSettings(
      model=self.model_config,
      flow_weight=config.loss.flow_weight,
      fast_weight=config.loss.fast_weight,
      grad_accum_steps=config.grad_accum_steps,
      ema_decay=config.optimizer.get("ema_decay"),
    )
    self._jitted_step = jax.jit(
      functools.partial(step_lib.train_step, self.settings, self.tx, self.labels, self.schedules),
      in_shardings=(self.state_shardings, sharding_lib.batch_sharding(self.mesh)),
      out_shardings=(self.state_shardings, sharding_lib.replicated(self.mesh)),
      donate_argnums=0,
    )
    self._compiled_step = None
    self.evaluator = None
    if self.eval_sets:
      self.evaluator = evaluation.Evaluator(
        self.model_config,
        self.mesh,
        self.state_shardings.params,
        action_stats=(self.norm_stats or {}).get("actions"),
        num_flow_steps=config.eval.flow_steps,
      )
    self.metrics = metrics_lib.MetricsLogger(
      workdir,
      total_steps=config.total_steps,
      global_batch_size=config.batch_size,
      flops_per_example=pi05.training_flops_per_example(self.model_config),
      log_every=config.log_every,
      start_step=self.start_step,
    )
    self.step_metrics: dict[int, dict[str, float]] = {}
    self._preempted = False

  # --------------------------------------------------------------------------------------------
  # Setup helpers.

  def _make_pipeline(self):
    from ki.data import pipeline  # pylint: disable=g-import-not-at-top

    tokenizer = build_tokenizer(self.config, self.model_config)
    common = dict(
      tokenizer=tokenizer,
      norm_stats=self.norm_stats,
      seed=self.config.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
    train = pipeline.make_iterator(
      self.config.data,
      split="train",
      train=True,
      per_host_batch_size=self.per_host_batch_size,
      **common,
    )
    eval_sets = {}
    eval_batch_size = self.config.eval.batch_size // jax.process_count()
    if self.config.eval.every and self.config.data.get("eval_arrayrecord_dir"):
      eval_sets["robot"] = lambda: pipeline.make_iterator(
        self.config.data, split="eval", train=False, per_host_batch_size=eval_batch_size, **common
      )
    if self.config.eval.every and self.config.eval.get("vlm_heldout"):
      model = self.model_config
      eval_sets["vlm"] = lambda: evaluation.vlm_heldout_batches(
        self.config.eval.vlm_heldout,
        tokenizer=tokenizer,
        action_dim=model.action_dim,
        action_horizon=model.action_horizon,
        image_size=model.image_size,
        per_host_batch_size=eval_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
      )
    return train, eval_sets

  def _pretrained_params(self, abstract_params):
    init = self.config.init
    if init.kind == "scratch":
      return None
    logging.info("Loading %s weights from %s.", init.kind, init.path)
    # Checked before anything is allocated on the devices.
    loaded = weights_lib.load(
      init.kind, init.path, abstract_params, cast_dtypes=init.get("cast_dtypes", False)
    )
    shardings = sharding_lib.fsdp_shardings(
      abstract_params, self.mesh, min_size_bytes=self.config.fsdp_min_size_bytes
    )
    # Leaves the checkpoint lacks (the expert, for a PaliGemma checkpoint) keep a fresh init.
    fresh = jax.jit(
      functools.partial(pi05.init_params, self.model_config), out_shardings=shardings
    )(jax.random.PRNGKey(self.config.seed))
    logging.info("Loaded %d of %d parameter arrays.", len(loaded), len(jax.tree.leaves(fresh)))
    return weights_lib.merge_into(fresh, loaded)

  def _compile(self, batch):
    lowered = self._jitted_step.lower(self.state, batch)
    compiled = lowered.compile()
    memory = compiled.memory_analysis()
    if memory is not None:
      mib = 2**20
      logging.info(
        "Compiled train step, memory per device: arguments %.1f MiB, outputs %.1f MiB, "
        "temporaries %.1f MiB, generated code %.1f MiB.",
        memory.argument_size_in_bytes / mib,
        memory.output_size_in_bytes / mib,
        memory.temp_size_in_bytes / mib,
        memory.generated_code_size_in_bytes / mib,
      )
    return compiled

  def _check_drops(self, examples_seen: int):
    counts = getattr(self.train_iterator, "drop_counts", None)
    if not counts:
      return
    too_long = counts.get("too_long", 0)
    if too_long > _MAX_TOO_LONG_FRACTION * (examples_seen + too_long):
      raise ValueError(
        f"{too_long} of the first {examples_seen + too_long} examples were dropped as longer "
        f"than model.max_token_len={self.model_config.max_token_len}; raise model.max_token_len."
      )

  # --------------------------------------------------------------------------------------------
  # The loop.

  def _next_batch(self):
    start = time.perf_counter()
    batch = sharding_lib.global_batch(next(self.train_iterator), self.mesh)
    return batch, time.perf_counter() - start

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: finishing the current step, then saving and exiting.")
    self._preempted = True

  def _should_stop(self) -> bool:
    # Every host must stop at the same step, or the others would hang in the next collective.
    if jax.process_count() == 1:
      return self._preempted
    flags = multihost_utils.process_allgather(np.asarray(self._preempted, np.int32))
    return bool(np.any(flags))

  def _record(self, step: int, device_metrics, data_wait: float):
    """Fetches one step's metrics, stops on a non-finite loss, adds them to the log interval."""
    metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    bad = [
      name
      for name in ("loss", "fast_ce", "flow_mse", "grad_norm")
      if name in metrics and not np.isfinite(metrics[name])
    ]
    if bad:
      self.checkpointer.wait()
      raise NonFiniteLossError(
        f"Non-finite {', '.join(bad)} at step {step} "
        f"({', '.join(f'{n}={metrics[n]}' for n in bad)}); stopping. The last good checkpoint is "
        f"step {self.checkpointer.latest_step()} in {self.checkpointer.directory}."
      )
    self.step_metrics[step] = metrics
    self.metrics.add_step(metrics, data_wait)
    if step % self.config.log_every == 0 or step == self.config.total_steps:
      extra = {}
      if hasattr(self.train_iterator, "metrics"):
        extra = {k: float(v) for k, v in self.train_iterator.metrics().items()}
      self.metrics.write(step, extra)

  def _save(self, step: int, *, force: bool = False):
    saved = self.checkpointer.save(
      step, self.state, data_iterator=self.train_iterator, assets=self.assets, force=force
    )
    if saved:
      logging.info("Saving checkpoint %d (asynchronously).", step)

  def evaluate(self, step: int) -> dict[str, float]:
    start = time.perf_counter()
    results = {}
    for name, make_batches in (self.eval_sets or {}).items():
      scalars = self.evaluator.evaluate(
        self.state.params,
        make_batches(),
        rng=jax.random.PRNGKey(self.config.seed),
        max_batches=self.config.eval.max_batches or None,
      )
      results.update({f"eval/{name}/{k}": v for k, v in scalars.items()})
    if results:
      self.metrics.write_scalars(step, results)
    self.metrics.exclude_time(time.perf_counter() - start)
    return results

  def run(self) -> dict[int, dict[str, float]]:
    """Trains to config.total_steps (or until SIGTERM); returns {step: metrics} of this run."""
    config = self.config
    step = self.start_step
    if step >= config.total_steps:
      logging.info("Already at step %d of %d; nothing to do.", step, config.total_steps)
      return self.step_metrics
    if jax.process_index() == 0:
      self.metrics.write_hparams({k: v for k, v in _flat_config(config).items()})
    previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    try:
      batch, data_wait = self._next_batch()
      self._check_drops(self.per_host_batch_size)
      if self._compiled_step is None:
        self._compiled_step = self._compile(batch)
      self.metrics.restart_clock()  # throughput excludes compilation
      pending = None
      while True:
        self.state, device_metrics = self._compiled_step(self.state, batch)
        step += 1
        if pending is not None:
          self._record(*pending)
        pending = (step, device_metrics, data_wait)
        stop = self._should_stop()
        last = step >= config.total_steps
        saving = stop or last or step % config.checkpoint.every == 0
        evaluating = bool(
          self.eval_sets and config.eval.every and (step % config.eval.every == 0 or last)
        )
        if saving or evaluating:
          # Never save a state whose loss has not been checked.
          self._record(*pending)
          pending = None
        if saving:
          self._save(step, force=stop or last)
        if evaluating:
          self.evaluate(step)
        if stop or last:
          break
        batch, data_wait = self._next_batch()
      if self._preempted:
        logging.warning("Stopped by SIGTERM at step %d; checkpoint saved.", step)
    finally:
      signal.signal(signal.SIGTERM, previous_handler)
      self.checkpointer.wait()
    return self.step_metrics

  def close(self):
    self.checkpointer.close()
    self.metrics.close()


def _flat_config(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  """Scalar config values as {"a.b": value} for TensorBoard's hparams view."""
  flat = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      flat.update(_flat_config(value, f"{name}."))
    elif isinstance(value, (int, float, str, bool)):
      flat[name] = value
    else:
      flat[name] = json.dumps(value, default=str)
  return flat
