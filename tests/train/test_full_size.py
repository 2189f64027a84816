"""Full-size pi0.5-KI, shapes only: the train step traces and lowers on an 8-device FSDP mesh and
FSDP really divides the state's memory (nothing is allocated)."""

import functools

import jax
import numpy as np

from experiments import droid_ki
from ki import batch as batch_lib
from ki.model import pi05
from ki.train import optimizer, sharding
from ki.train import state as state_lib
from ki.train import step as step_lib


def _bytes_per_device(shapes, shardings):
  total = 0
  for shape, sharding_ in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)):
    shard = sharding_.shard_shape(shape.shape)
    total += int(np.prod(shard)) * np.dtype(shape.dtype).itemsize
  return total


def test_full_size_step_lowers_with_fsdp_8():
  config = droid_ki.get_config("full")
  model = pi05.Config(**config.model).validate()
  mesh = sharding.make_mesh((("data", 1), ("fsdp", 8)))
  tx, labels, schedules = optimizer.make_optimizer(
    config.optimizer, state_lib.abstract_params(model)
  )
  shapes, shardings = state_lib.abstract_train_state(
    model, tx, mesh, seed=0, use_ema=False, fsdp_min_size_bytes=config.fsdp_min_size_bytes
  )
  step = jax.jit(
    functools.partial(
      step_lib.train_step, step_lib.StepSettings(model=model), tx, labels, schedules
    ),
    in_shardings=(shardings, sharding.batch_sharding(mesh)),
    out_shardings=(shardings, sharding.replicated(mesh)),
    donate_argnums=0,
  )
  lowered = step.lower(shapes, batch_lib.abstract_batch(model, 16))
  new_state, metrics = lowered.out_info
  assert [x.shape for x in jax.tree.leaves(new_state)] == [x.shape for x in jax.tree.leaves(shapes)]
  assert metrics["loss"].shape == ()
  assert {"grad_norm/vlm", "grad_norm/action_expert"} <= set(metrics)

  unsharded = sum(
    int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in jax.tree.leaves(shapes)
  )
  per_device = _bytes_per_device(shapes, shardings)
  # params + Adam moments in float32: ~40 GB unsharded; FSDP over 8 leaves ~1/8 of it per device.
  assert unsharded > 35e9
  assert per_device < unsharded / 7.5
