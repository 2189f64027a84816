"""Full-size pi0.5-KI, shapes only: the train step traces and lowers on an 8-device FSDP mesh and
FSDP really divides the state's memory (nothing is allocated)."""

import jax
import numpy as np

from experiments import droid_ki
from ki.train import setup as setup_lib


def _bytes_per_device(shapes, shardings):
  total = 0
  for shape, sharding_ in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)):
    shard = sharding_.shard_shape(shape.shape)
    total += int(np.prod(shard)) * np.dtype(shape.dtype).itemsize
  return total


def test_full_size_step_lowers_with_fsdp_8():
  config = droid_ki.get_config("full")
  config.unlock()
  config.mesh = (("data", 1), ("fsdp", 8))
  config.batch_size = 16
  setup = setup_lib.make_setup(config)
  shapes, shardings = setup.state_shapes, setup.state_shardings
  lowered = setup.lower()
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
