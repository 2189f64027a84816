"""The training loop: state (restored or born sharded), steps, logging, eval, saving, preemption.

Order of setup (`Trainer.from_config`), so that mistakes surface before anything expensive:
  1. config checks (model, mesh, batch divisibility) and the step built: ki/train/setup.py;
  2. tokenizer (vocabulary checked against the model) and data streams (data config validated);
  3. state: restored from the latest checkpoint in the workdir (once ki/train/resume.py found
     nothing changed that the checkpoint cannot continue with), or born sharded (optionally from
     pretrained weights);
  4. first batch fetched (drops from a too-small max_token_len show up here), the train step
     compiled once, its memory estimate printed before step 1.
"""

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

from ki import checkpoint as checkpoint_lib
from ki.data import normalize, pipeline
from ki.model import pi05
from ki.tokenizers import fast as fast_lib
from ki.tokenizers import prompt as prompt_lib
from ki.train import evaluation, resume
from ki.train import metrics as metrics_lib
from ki.train import setup as setup_lib
from ki.train import sharding as sharding_lib

# Training refuses to start when more than this fraction of the first batch's examples were
# dropped for being longer than max_token_len.
_MAX_TOO_LONG_FRACTION = 0.1


class NonFiniteLossError(RuntimeError):
  pass


def build_tokenizer(config: ml_collections.ConfigDict, model_config: pi05.Config):
  """The pi0.5 tokenizer from config.assets; vocabulary checked against the model's."""
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
    if not config.assets.fast_tokenizer:
      raise ValueError(
        "loss.token_weight is on but config.assets.fast_tokenizer is empty; set it to "
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
  paths = config.assets
  if paths.norm_stats:
    with open(paths.norm_stats, "rb") as f:
      assets["norm_stats.json"] = f.read()
  if paths.prompt_tokenizer:
    with open(paths.prompt_tokenizer, "rb") as f:
      assets["tokenizer.model"] = f.read()
  if paths.fast_tokenizer:
    for name in sorted(os.listdir(paths.fast_tokenizer)):
      with open(os.path.join(paths.fast_tokenizer, name), "rb") as f:
        assets[f"fast_tokenizer/{name}"] = f.read()
  return assets


class Trainer:
  """One training run in `workdir`; resumes from the latest checkpoint there.

  setup: the compiled-program side (ki.train.setup.make_setup(config)).
  train_iterator: this host's training batches (ki.batch.Batch), e.g. ki.data.pipeline's
    iterator; its state is checkpointed when it has get_state/set_state.
  eval_sets: {name: zero-argument callable returning a fresh iterable of Batch}.
  norm_stats: {"state", "actions": NormStats}; eval reports action errors in raw units with them.
  `Trainer.from_config(config, workdir)` builds all of these from the experiment config.
  """

  def __init__(
    self,
    setup: setup_lib.TrainSetup,
    workdir: str,
    train_iterator,
    *,
    eval_sets: dict[str, Any] | None = None,
    norm_stats: dict[str, Any] | None = None,
  ):
    config = setup.config
    self.setup = setup
    self.config = config
    self.workdir = workdir
    self.mesh = setup.mesh
    self.model_config = setup.model_config
    self.per_host_batch_size = config.batch_size // jax.process_count()
    logging.info(
      "Mesh %s over %d devices (%d hosts); global batch %d, %d per host.",
      dict(self.mesh.shape),
      self.mesh.size,
      jax.process_count(),
      config.batch_size,
      self.per_host_batch_size,
    )
    self.train_iterator = train_iterator
    self.eval_sets = eval_sets or {}
    self.assets = _read_assets(config)

    self.checkpointer = checkpoint_lib.Checkpointer(
      workdir,
      max_to_keep=config.checkpoint.max_to_keep,
      keep_period=config.checkpoint.keep_period or None,
      asynchronous=config.checkpoint.asynchronous,
      model_config=self.model_config,  # LoRA: the served params item holds the adapters merged
    )
    # The newest checkpoint that restores; damaged newer ones are logged and set aside, and none
    # restoring (with checkpoints present) is an error, never a silent start from scratch. A
    # changed setting the checkpoint cannot continue with is refused before any state is read.
    safe_changes = []

    def check_assets(step_dir, assets):
      safe_changes[:] = resume.check_resumable(
        assets["config.json"], self.assets["config.json"], step_dir
      )

    self.state = self.checkpointer.restore_newest_good(
      setup.abstract_state(), data_iterator=self.train_iterator, check_assets=check_assets
    )
    if self.state is None:
      self.state = setup.init_state(setup_lib.pretrained_weights(setup))
    self.start_step = int(jax.device_get(self.state.step))
    if safe_changes:  # those of the checkpoint that restored
      logging.warning(
        "Checkpoint %d: resuming with changed settings:\n  %s",
        self.start_step,
        "\n  ".join(safe_changes),
      )

    self._compiled_step = None
    self.evaluator = None
    if self.eval_sets:
      self.evaluator = evaluation.Evaluator(
        self.model_config,
        self.mesh,
        setup.state_shardings.params,
        action_stats=(norm_stats or {}).get("actions"),
        num_flow_steps=config.eval.flow_steps,
      )
    # Closed-loop success in the simulator (config.eval.sim), checked here, before any compile.
    self.norm_stats = norm_stats
    self.sim_settings = None
    self._sim_policy = None
    if config.eval.sim.every:
      from ki.eval import metaworld as sim_eval  # pylint: disable=g-import-not-at-top

      if jax.process_count() > 1:
        raise ValueError(
          "eval.sim needs the whole model on one host and runs in single-process runs only; "
          "evaluate a multi-host run's checkpoints with python -m ki.eval.metaworld"
        )
      if not norm_stats:
        raise ValueError("eval.sim needs config.assets.norm_stats (the policy's units)")
      self.sim_settings = sim_eval.settings_from_config(config)
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

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, workdir: str, **kwargs) -> "Trainer":
    """The run an experiment config describes: setup, tokenizer, norm stats and data streams.

    The config is checked (make_setup) and the data validated (make_streams) before anything is
    compiled.
    """
    setup = setup_lib.make_setup(config)
    norm_stats = None
    if config.assets.norm_stats:
      norm_stats = normalize.load_norm_stats(config.assets.norm_stats)
    tokenizer = build_tokenizer(config, setup.model_config)
    streams = pipeline.make_streams(
      config,
      setup.model_config,
      tokenizer,
      norm_stats,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
    return cls(
      setup,
      workdir,
      streams.train,
      eval_sets=streams.eval_sets,
      norm_stats=norm_stats,
      **kwargs,
    )

  # --------------------------------------------------------------------------------------------
  # Setup helpers.

  def _drop_counts(self) -> dict[str, int]:
    return dict(getattr(self.train_iterator, "drop_counts", None) or {})

  def _check_drops(self, examples_seen: int, before: dict[str, int]):
    """Refuses a run whose first batch lost too many examples to the prompt length. `before`:
    the iterator's totals before that batch (a resumed iterator carries the run's totals)."""
    counts = self._drop_counts()
    if not counts:
      return
    too_long = counts.get("too_long", 0) - before.get("too_long", 0)
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

  def _should_stop(self, step: int) -> bool:
    """Whether this step is the one to save and stop at after a preemption notice (SIGTERM).

    Every host must stop at the same step, or the others would hang in the next collective. With
    several processes, jax's preemption service agrees on it: jax.distributed.initialize starts
    it and it catches SIGTERM itself; the host that gets the notice tells the coordinator, and
    every host sees `reached_preemption_sync_point` turn true at the same step (the largest step
    any host had reached, plus one). Each call is a local flag check: no collective and no host
    block per step, so the one-step-late metrics fetch keeps the devices busy.
    """
    if jax.process_count() == 1:
      return self._preempted
    if multihost_utils.reached_preemption_sync_point(step):
      self._preempted = True
    return self._preempted

  def _record(self, step: int, device_metrics, data_wait: float):
    """Fetches one step's metrics, stops on a non-finite loss, adds them to the log interval."""
    metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    bad = [
      name
      for name in ("loss", "token_ce", "flow_mse", "grad_norm")
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
    # The run's first step too: every counter (the data's drop counts, zeros included) exists
    # from the start, and the first progress line comes right after compiling.
    first = step == self.start_step + 1
    if first or step % self.config.log_every == 0 or step == self.config.total_steps:
      extra = {}
      if hasattr(self.train_iterator, "metrics"):
        extra = {k: float(v) for k, v in self.train_iterator.metrics().items()}
      self.metrics.write(step, extra)

  def _save(self, step: int, *, force: bool = False):
    # A failed background write (disk full, unwritable) surfaces here or in wait(), as a
    # CheckpointSaveError naming the step, its path and what is intact: the run stops non-zero.
    if self.checkpointer.save(
      step, self.state, data_iterator=self.train_iterator, assets=self.assets, force=force
    ):
      logging.info("Saving checkpoint %d (asynchronously).", step)

  def evaluate(self, step: int) -> dict[str, float]:
    start = time.perf_counter()
    results = {}
    for name, make_batches in self.eval_sets.items():
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

  def evaluate_sim(self, step: int) -> dict[str, float]:
    """Closed-loop success of the current weights (the EMA's when there is one, as served)."""
    # pylint: disable=g-import-not-at-top
    from ki.eval import metaworld as sim_eval
    from ki.model import lora
    from ki.serve import policy as policy_lib

    # pylint: enable=g-import-not-at-top
    start = time.perf_counter()
    params = self.state.ema_params if self.state.ema_params is not None else self.state.params
    model_config = self.model_config
    if any(model_config.loras):  # the policy reads the adapters merged, as a checkpoint does
      params = lora.merge(params, model_config)
      model_config = lora.without_lora(model_config)
    params = jax.device_get(params)
    if self._sim_policy is None:
      policy = policy_lib.Policy(
        params,
        model_config,
        build_tokenizer(self.config, self.model_config),
        self.norm_stats,
        delta_action_mask=tuple(self.config.data.delta_action_mask) or None,
        num_flow_steps=self.config.eval.flow_steps,
        seed=self.config.seed,
      )
      self._sim_policy = sim_eval.LocalPolicy(policy, batch_size=self.config.eval.sim.num_envs)
    self._sim_policy.policy.params = params
    result = sim_eval.run_policy(
      self._sim_policy,
      self.sim_settings,
      num_envs=self.config.eval.sim.num_envs,
      progress=False,
    )
    summary = sim_eval.summarize(result["episodes"], self.sim_settings.tasks)
    scalars = {"eval/sim/success": summary["average"]}
    scalars.update(
      {f"eval/sim/success/{task}": row["success_rate"] for task, row in summary["tasks"].items()}
    )
    self.metrics.write_scalars(step, scalars)
    seconds = time.perf_counter() - start
    logging.info(
      "step %d | eval/sim/success %.3f (%d episodes, %.0f s)",
      step,
      summary["average"],
      summary["episodes"],
      seconds,
    )
    self.metrics.exclude_time(seconds)
    return scalars

  def run(self) -> dict[int, dict[str, float]]:
    """Trains to config.total_steps (or until SIGTERM); returns {step: metrics} of this run."""
    config = self.config
    step = self.start_step
    if step >= config.total_steps:
      logging.info("Already at step %d of %d; nothing to do.", step, config.total_steps)
      return self.step_metrics
    if jax.process_index() == 0:
      self.metrics.write_hparams({k: v for k, v in flat_config(config).items()})
    # One process: our own handler. Several: jax's preemption service owns SIGTERM (a handler
    # installed here would replace its notifier).
    single = jax.process_count() == 1
    previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm) if single else None
    try:
      drops_before = self._drop_counts()
      batch, data_wait = self._next_batch()
      self._check_drops(self.per_host_batch_size, drops_before)
      if self._compiled_step is None:
        self._compiled_step = self.setup.compile(self.state, batch)
      self.metrics.restart_clock()  # throughput excludes compilation
      pending = None
      while True:
        self.state, device_metrics = self._compiled_step(self.state, batch)
        step += 1
        if pending is not None:
          self._record(*pending)
        pending = (step, device_metrics, data_wait)
        stop = self._should_stop(step)
        last = step >= config.total_steps
        saving = stop or last or step % config.checkpoint.every == 0
        evaluating = bool(
          self.eval_sets and config.eval.every and (step % config.eval.every == 0 or last)
        )
        sim_every = config.eval.sim.every
        simulating = bool(sim_every and (step % sim_every == 0 or last))
        if saving or evaluating or simulating:
          # Never save a state whose loss has not been checked.
          self._record(*pending)
          pending = None
        if saving:
          self._save(step, force=stop or last)
        if evaluating:
          self.evaluate(step)
        if simulating:
          self.evaluate_sim(step)
        if stop or last:
          break
        batch, data_wait = self._next_batch()
      if self._preempted:
        logging.warning("Stopped by SIGTERM at step %d; checkpoint saved.", step)
    finally:
      if single:
        signal.signal(signal.SIGTERM, previous_handler)
      self.checkpointer.wait()
    return self.step_metrics

  def close(self):
    self.checkpointer.close()
    self.metrics.close()


def flat_config(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  """Scalar config values as {"a.b": value} (others as JSON text): TensorBoard's hparams view,
  and comparing two configs field by field."""
  flat = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      flat.update(flat_config(value, f"{name}."))
    elif isinstance(value, (int, float, str, bool)):
      flat[name] = value
    else:
      flat[name] = json.dumps(value, default=str)
  return flat
