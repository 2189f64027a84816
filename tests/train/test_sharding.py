"""Mesh construction, the FSDP rule, born-sharded initialisation and global batches
(8 CPU devices)."""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from ki.train import sharding


def test_mesh_shape_fills_the_free_axis():
  assert sharding.mesh_shape((("data", -1), ("fsdp", 2)), 8) == (4, 2)
  assert sharding.mesh_shape((("fsdp", -1), ("data", 1)), 8) == (1, 8)


@pytest.mark.parametrize(
  "mesh_config, message",
  [
    ((("data", 3), ("fsdp", -1)), "do not divide"),
    ((("data", 2), ("fsdp", 2)), "needs 4 devices"),
    ((("data", -1), ("fsdp", -1)), "at most one"),
    ((("data", -1), ("model", 2)), "exactly the axes"),
  ],
)
def test_bad_mesh_config_is_refused(mesh_config, message):
  with pytest.raises(ValueError, match=message):
    sharding.mesh_shape(mesh_config, 8)


def test_make_mesh_uses_all_devices():
  mesh = sharding.make_mesh((("data", 2), ("fsdp", -1)))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}


@pytest.mark.parametrize(
  "shape, expected",
  [
    ((18, 2048, 16384), P(None, None, "fsdp")),  # largest divisible axis
    ((18, 8, 2048, 256), P(None, None, "fsdp", None)),
    ((257152, 2048), P("fsdp", None)),
    ((6, 6), P()),  # nothing divisible by 4
    ((2048,), P("fsdp")),
    ((), P()),
    ((8, 8), P("fsdp", None)),  # ties go to the first axis
  ],
)
def test_fsdp_rule(shape, expected):
  assert sharding.fsdp_partition_spec(shape, 4, 4, min_size_bytes=0) == expected


def test_fsdp_rule_keeps_small_arrays_and_fsdp_1_replicated():
  assert sharding.fsdp_partition_spec((1024, 1024), 4, 4, min_size_bytes=8 * 2**20) == P()
  assert sharding.fsdp_partition_spec((1024, 1024), 4, 1, min_size_bytes=0) == P()


def _init(rng):
  k1, k2 = jax.random.split(rng)
  return {
    "w": jax.random.normal(k1, (16, 12)),
    "b": jax.random.normal(k2, (3,)),
    "step": jnp.zeros([], jnp.int32),
  }


def test_born_sharded_init_matches_unsharded_values():
  mesh = sharding.make_mesh((("data", 2), ("fsdp", 4)))
  shapes = jax.eval_shape(_init, jax.random.key(0))
  shardings = sharding.fsdp_shardings(shapes, mesh, min_size_bytes=0)
  state = jax.jit(_init, out_shardings=shardings)(jax.random.key(0))
  assert state["w"].sharding.spec == P("fsdp", None)
  # Each device holds a quarter of w's rows, replicated across the 2 data replicas.
  assert {s.data.shape for s in state["w"].addressable_shards} == {(4, 12)}
  assert state["b"].sharding.spec == P()
  reference = _init(jax.random.key(0))
  np.testing.assert_array_equal(state["w"], reference["w"])
  np.testing.assert_array_equal(state["b"], reference["b"])


def test_global_batch_splits_leading_axis_over_all_devices():
  mesh = sharding.make_mesh((("data", 2), ("fsdp", 4)))
  host = {"image": {"base": np.arange(16 * 3).reshape(16, 3)}, "mask": np.ones(16, bool)}
  batch = sharding.global_batch(host, mesh)
  assert batch["image"]["base"].shape == (16, 3)
  assert {s.data.shape for s in batch["image"]["base"].addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(batch["image"]["base"], host["image"]["base"])


def test_batch_size_checks_name_the_fix():
  mesh = sharding.make_mesh((("data", -1), ("fsdp", 1)))
  sharding.check_batch_size(16, mesh)
  with pytest.raises(ValueError, match="multiple of 8"):
    sharding.check_batch_size(12, mesh)
  with pytest.raises(ValueError, match="grad_accum_steps"):
    sharding.check_batch_size(16, mesh, grad_accum_steps=3)
  with pytest.raises(ValueError, match="multiple of 16"):
    sharding.check_batch_size(8, mesh, grad_accum_steps=2)
