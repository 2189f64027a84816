"""The train state and its born-sharded creation.

`create_train_state` never materialises an unsharded copy: it traces the initialiser with
jax.eval_shape, derives FSDP shardings from the shapes, and runs the initialiser under jit with
those out_shardings, so each device only ever allocates its own shard (openpi / MaxText style).
"""

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ki.model import pi05
from ki.train import sharding as sharding_lib


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


def state_shardings(state_shapes, mesh, *, fsdp_min_size_bytes: int):
  """FSDP shardings for every leaf of a (shape) TrainState; optimizer moments follow their params
  because they have the same shapes and the rule depends on shape only."""
  return sharding_lib.fsdp_shardings(state_shapes, mesh, min_size_bytes=fsdp_min_size_bytes)


def _initializer(model_config: pi05.Config, tx: optax.GradientTransformation, use_ema: bool):
  def init(params_key, train_key, params):
    if params is None:
      params = pi05.init_params(model_config, params_key)
    return state_from_params(params, train_key, tx=tx, use_ema=use_ema)

  return init


def _keys(seed: int):
  params_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
  return params_key, train_key


def abstract_train_state(
  model_config: pi05.Config,
  tx: optax.GradientTransformation,
  mesh,
  *,
  seed: int,
  use_ema: bool,
  fsdp_min_size_bytes: int,
):
  """(shapes, shardings) of the state create_train_state would build; allocates nothing."""
  shapes = jax.eval_shape(_initializer(model_config, tx, use_ema), *_keys(seed), None)
  return shapes, state_shardings(shapes, mesh, fsdp_min_size_bytes=fsdp_min_size_bytes)


def create_train_state(
  model_config: pi05.Config,
  tx: optax.GradientTransformation,
  mesh,
  *,
  seed: int,
  use_ema: bool,
  fsdp_min_size_bytes: int,
  params=None,
):
  """Creates the state sharded over `mesh`. Returns (state, shardings).

  params: optional params already placed on the devices (e.g. pretrained weights put with
    `shardings.params`); when None the model's initialiser runs under jit, born sharded.
  """
  init = _initializer(model_config, tx, use_ema)
  _, shardings = abstract_train_state(
    model_config, tx, mesh, seed=seed, use_ema=use_ema, fsdp_min_size_bytes=fsdp_min_size_bytes
  )
  if params is None:
    state = jax.jit(init, static_argnums=2, out_shardings=shardings)(*_keys(seed), None)
  else:
    # Donated: the loaded params become the state's params without a second copy.
    state = jax.jit(init, out_shardings=shardings, donate_argnums=2)(*_keys(seed), params)
  return state, shardings
