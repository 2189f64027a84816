"""The train state and its born-sharded creation.

The state is born sharded (ki/train/setup.py): its shapes come from `abstract_state` without
allocating, FSDP shardings from the shapes, and `initializer` runs under jit with those
out_shardings, so each device only ever allocates its own shard (openpi / MaxText style).
"""

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ki.model import pi05


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; what the checkpoint's "state" item holds.

  step: int32 [] — number of optimizer updates applied.
  params: the model's parameter tree (openpi layout).
  opt_state: the optax state (multi_transform over the parameter groups).
  rng: uint32 [2] — the run's base key; step k uses fold_in(rng, k), so resuming is exact.
  ema_params: exponential moving average of params, or None when config.optimizer.ema_decay is
    unset.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  ema_params: Any = None


def state_from_params(
  params, rng: jax.Array, *, tx: optax.GradientTransformation, use_ema: bool
) -> TrainState:
  """A fresh state (step 0, new optimizer state) around given params."""
  return TrainState(
    step=jnp.zeros([], jnp.int32),
    params=params,
    opt_state=tx.init(params),
    rng=rng,
    ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
  )


def abstract_params(model_config: pi05.Config):
  """The params tree as ShapeDtypeStructs, without allocating anything."""
  return jax.eval_shape(functools.partial(pi05.init_params, model_config), jax.random.PRNGKey(0))


def abstract_state(params_shapes, tx: optax.GradientTransformation, *, use_ema: bool) -> TrainState:
  """The state's ShapeDtypeStructs from the params' (the optimizer's init is traced, the model's
  is not)."""
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  return TrainState(
    step=jax.ShapeDtypeStruct((), jnp.int32),
    params=params_shapes,
    opt_state=jax.eval_shape(tx.init, params_shapes),
    rng=key,
    ema_params=params_shapes if use_ema else None,
  )


def initializer(model_config: pi05.Config, tx: optax.GradientTransformation, *, use_ema: bool):
  """init(params_key, train_key) -> a fresh TrainState (jit it with the state's out_shardings)."""

  def init(params_key, train_key):
    params = pi05.init_params(model_config, params_key)
    return state_from_params(params, train_key, tx=tx, use_ema=use_ema)

  return init


def init_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(params_key, train_key) of a run: the parameters' init and the base of every step's key."""
  params_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
  return params_key, train_key
