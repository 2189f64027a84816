"""From an experiment config to the jitted train step: built once, used by every caller.

`make_setup(config)` checks the config (before anything is traced), builds the mesh, the
two-group optimizer, the train state's shapes and shardings (the initialiser is traced once, by
eval_shape) and the train step jitted with explicit shardings and a donated state. The trainer,
the train/memory benchmarks and compile checks all take their step from here, so what is measured
is what trains (MaxText's `setup_train_loop` plays the same role).
"""

import dataclasses
import functools
import logging
from typing import Any

import jax
import ml_collections

from ki import batch as batch_lib
from ki.model import params as params_lib
from ki.model import pi05
from ki.model import weights as weights_lib
from ki.train import optimizer as optimizer_lib
from ki.train import sharding as sharding_lib
from ki.train import state as state_lib
from ki.train import step as step_lib


def training_model(config: ml_collections.ConfigDict) -> pi05.Config:
  """The model an experiment config trains: config.model, with fast_loss on iff the token loss
  has a weight (one knob: loss.token_weight)."""
  return pi05.Config(**config.model, fast_loss=config.loss.token_weight > 0).validate()


def check_config(config: ml_collections.ConfigDict, mesh) -> pi05.Config:
  """Everything about the run that can be refused before compiling; returns the model config."""
  model = training_model(config)
  sharding_lib.check_batch_size(config.batch_size, mesh, config.grad_accum_steps)
  if config.loss.token_weight < 0 or config.loss.flow_weight < 0:
    raise ValueError(f"Loss weights must be >= 0, got {dict(config.loss)}.")
  if config.total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {config.total_steps}")
  return model


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """The compiled-program side of a run.

  step: jitted train_step(state, batch) -> (state, metrics), state donated.
  state_shapes: the TrainState as ShapeDtypeStructs; state_shardings: its NamedShardings.
  optimizer: the parameter groups (labels, which are trainable, {group: lr(step)}) and the optax
    transformation of the trainable part (ki.train.optimizer.Optimizer).
  """

  config: ml_collections.ConfigDict
  model_config: pi05.Config
  mesh: jax.sharding.Mesh
  optimizer: optimizer_lib.Optimizer
  settings: step_lib.StepSettings
  state_shapes: state_lib.TrainState
  state_shardings: state_lib.TrainState
  step: Any
  # Compiled steps by input signature: trainers sharing a setup compile once.
  _compiled: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

  def compile(self, state, batch):
    """The step compiled for these (concrete or abstract) inputs; its memory estimate logged."""
    signature = str(
      jax.tree.map(lambda x: (x.shape, x.dtype, getattr(x, "sharding", None)), (state, batch))
    )
    if signature not in self._compiled:
      compiled = self.step.lower(state, batch).compile()
      log_compiled_memory(compiled)
      self._compiled[signature] = compiled
    return self._compiled[signature]

  @property
  def batch_size(self) -> int:
    return self.config.batch_size

  @property
  def batch_sharding(self) -> jax.sharding.NamedSharding:
    return sharding_lib.batch_sharding(self.mesh)

  def abstract_state(self) -> state_lib.TrainState:
    """The state as ShapeDtypeStructs carrying their shardings (restore and lower into these)."""
    return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      self.state_shapes,
      self.state_shardings,
    )

  def abstract_batch(self) -> batch_lib.Batch:
    """A global batch as ShapeDtypeStructs with the batch sharding: compile without data."""
    return batch_lib.abstract_batch(
      self.model_config, self.batch_size, sharding=self.batch_sharding
    )

  def lower(self):
    """The step lowered for the abstract state and batch (nothing allocated)."""
    return self.step.lower(self.abstract_state(), self.abstract_batch())

  def init_state(self, loaded: dict[str, Any] | None = None) -> state_lib.TrainState:
    """A fresh state, born sharded: each device allocates only its shard.

    loaded: {parameter name: array} from ki.model.weights.load; those leaves replace the fresh
      initialisation (and its EMA copy); the others (e.g. the expert, for a PaliGemma checkpoint)
      keep it.
    """
    init = state_lib.initializer(self.model_config, self.optimizer.tx, use_ema=self.use_ema)
    state = jax.jit(init, out_shardings=self.state_shardings)(
      *state_lib.init_keys(self.config.seed)
    )
    if loaded:
      params = weights_lib.merge_into(state.params, loaded)
      ema = None if state.ema_params is None else weights_lib.merge_into(state.ema_params, loaded)
      state = state.replace(params=params, ema_params=ema)
    return state

  @property
  def use_ema(self) -> bool:
    return self.settings.ema_decay is not None


def make_setup(config: ml_collections.ConfigDict, *, devices=None) -> TrainSetup:
  """Builds the step for `config` over `devices` (default: every device of every process)."""
  mesh = sharding_lib.make_mesh(config.mesh, devices=devices)
  model_config = check_config(config, mesh)
  settings = step_lib.StepSettings(
    model=model_config,
    flow_weight=config.loss.flow_weight,
    token_weight=config.loss.token_weight,
    grad_accum_steps=config.grad_accum_steps,
    ema_decay=config.optimizer.ema_decay,
  )
  # The model's initialiser is traced once here, for shapes (and once more when a fresh state is
  # created); the optimizer's labels and state follow from the shapes.
  params_shapes = state_lib.abstract_params(model_config)
  optimizer = optimizer_lib.make_optimizer(config.optimizer, params_shapes)
  state_shapes = state_lib.abstract_state(
    params_shapes, optimizer.tx, use_ema=settings.ema_decay is not None
  )
  state_shardings = sharding_lib.fsdp_shardings(
    state_shapes, mesh, min_size_bytes=config.fsdp_min_size_bytes
  )
  step = jax.jit(
    functools.partial(step_lib.train_step, settings, optimizer),
    in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh)),
    out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
    donate_argnums=0,
  )
  return TrainSetup(
    config=config,
    model_config=model_config,
    mesh=mesh,
    optimizer=optimizer,
    settings=settings,
    state_shapes=state_shapes,
    state_shardings=state_shardings,
    step=step,
  )


def pretrained_weights(setup: TrainSetup) -> dict[str, Any] | None:
  """The leaves config.init names, checked against the model before anything is allocated on
  the devices; None for init.kind == "scratch"."""
  init = setup.config.init
  if init.kind == "scratch":
    return None
  logging.info("Loading %s weights from %s.", init.kind, init.path)
  loaded = weights_lib.load(
    init.kind, init.path, setup.state_shapes.params, cast_dtypes=init.cast_dtypes
  )
  if init.fresh_expert:  # the expert keeps the fresh initialisation of config.seed
    loaded = {k: v for k, v in loaded.items() if not params_lib.EXPERT_PATTERN.fullmatch(k)}
  logging.info(
    "Loaded %d of %d parameter arrays.",
    len(loaded),
    len(jax.tree.leaves(setup.state_shapes.params)),
  )
  return loaded


def log_compiled_memory(compiled) -> None:
  memory = compiled.memory_analysis()
  if memory is None:
    return
  mib = 2**20
  logging.info(
    "Compiled train step, memory per device: arguments %.1f MiB, outputs %.1f MiB, "
    "temporaries %.1f MiB, generated code %.1f MiB.",
    memory.argument_size_in_bytes / mib,
    memory.output_size_in_bytes / mib,
    memory.temp_size_in_bytes / mib,
    memory.generated_code_size_in_bytes / mib,
  )
