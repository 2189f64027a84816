"""The device mesh, FSDP parameter shardings and global batches.

The mesh has two axes: "data" (pure data parallelism, parameters replicated) and "fsdp" (data
parallelism with parameters and optimizer state sharded, ZeRO-3 style). The batch is split over
both; a parameter is split over "fsdp" only, along one axis chosen by `fsdp_partition_spec`.
"""

from collections.abc import Sequence
import math

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
import numpy as np

MESH_AXES = ("data", "fsdp")
# The batch's leading axis is split over every device.
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_config: Sequence[Sequence], num_devices: int) -> tuple[int, ...]:
  """Resolves config.mesh, e.g. (("data", -1), ("fsdp", 4)), to sizes for ("data", "fsdp").

  At most one size may be -1 (it takes the devices left over); the product must be num_devices.
  """
  sizes = dict((name, int(size)) for name, size in mesh_config)
  if set(sizes) != set(MESH_AXES):
    raise ValueError(f"config.mesh must name exactly the axes {MESH_AXES}; got {list(sizes)}.")
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1; got {dict(sizes)}.")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(
        f"config.mesh {dict(sizes)}: {num_devices} devices do not divide by the fixed axes "
        f"(product {fixed}); pick sizes that divide the device count."
      )
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(
      f"config.mesh {dict(sizes)} needs {math.prod(sizes.values())} devices but "
      f"{num_devices} are available; set one axis to -1 or change the sizes."
    )
  return tuple(sizes[name] for name in MESH_AXES)


def make_mesh(mesh_config: Sequence[Sequence], devices=None) -> Mesh:
  """A ("data", "fsdp") mesh over all devices (of every process)."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  # Auto axes: shardings are given at jit boundaries and XLA propagates them inside.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def fsdp_partition_spec(
  shape: Sequence[int], itemsize: int, fsdp_size: int, min_size_bytes: int
) -> PartitionSpec:
  """Where one array goes: split along its largest axis divisible by fsdp_size, else replicated.

  Arrays under min_size_bytes and scalars stay replicated (sharding them saves little memory and
  adds a collective per use). Ties between equal axes go to the earliest.
  """
  if fsdp_size == 1 or len(shape) == 0 or math.prod(shape) * itemsize < min_size_bytes:
    return PartitionSpec()
  candidates = [axis for axis, size in enumerate(shape) if size % fsdp_size == 0]
  if not candidates:
    return PartitionSpec()
  best = max(candidates, key=lambda axis: (shape[axis], -axis))
  spec = [None] * len(shape)
  spec[best] = "fsdp"
  return PartitionSpec(*spec)


def fsdp_shardings(shape_tree, mesh: Mesh, *, min_size_bytes: int = 4 * 2**20):
  """NamedShardings for a tree of arrays or ShapeDtypeStructs (params, optimizer state, ...)."""
  fsdp_size = mesh.shape["fsdp"]

  def sharding(leaf):
    shape = getattr(leaf, "shape", ())
    dtype = np.dtype(getattr(leaf, "dtype", np.float32))
    return NamedSharding(
      mesh, fsdp_partition_spec(shape, dtype.itemsize, fsdp_size, min_size_bytes)
    )

  return jax.tree.map(sharding, shape_tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def check_batch_size(global_batch_size: int, mesh: Mesh, grad_accum_steps: int = 1) -> None:
  """Refuses batch sizes that do not split evenly, before anything is compiled."""
  num_devices = mesh.size
  per_step = global_batch_size // max(grad_accum_steps, 1)
  if global_batch_size % grad_accum_steps:
    raise ValueError(
      f"config.batch_size={global_batch_size} is not divisible by "
      f"config.grad_accum_steps={grad_accum_steps}."
    )
  if per_step % num_devices:
    raise ValueError(
      f"config.batch_size={global_batch_size} (per micro-batch {per_step}) is not divisible by "
      f"the {num_devices} devices of the mesh; use a multiple of {num_devices * grad_accum_steps}."
    )
  if global_batch_size % jax.process_count():
    raise ValueError(
      f"config.batch_size={global_batch_size} is not divisible by {jax.process_count()} hosts."
    )


def global_batch(host_batch, mesh: Mesh):
  """Assembles each host's slice of the batch into global arrays, leaf by leaf.

  host_batch: a ki.batch.Batch (or any pytree) of numpy arrays; every host passes its own
  [B / num_hosts, ...] slice. The result has the same structure, each leaf [B, ...] split over
  the devices.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), host_batch
  )
