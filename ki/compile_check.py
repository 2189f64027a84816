r"""Compile the real train step for a TPU slice on a machine without one: memory and FLOPs.

  python -m ki.compile_check --config=experiments/droid_ki.py:full --topology=v5p-8 \
    [--per_device_batch=8] [--config.model.remat_policy=none] [--config.x=...]

Needs libtpu (the TPU compiler), no TPU: `pip install "jax[tpu]==<your jax version>"`. The
topology's abstract devices (`jax.experimental.topologies`) go to the trainer's own factory,
`ki.train.setup.make_setup(config, devices=...)`, so the mesh, shardings, optimizer and jitted
step are exactly what `ki.main` would run; `lower().compile()` then runs the TPU compiler.
Multi-host slices (v5p-64, v6e-32, ...) compile in this one process: that checks the sharded
step is valid for the pod. Printed per device: XLA's memory plan (arguments, outputs, aliased =
the donated state, temporaries, generated code; total = arguments + outputs - aliased +
temporaries + code) against the chip's HBM, and the step's FLOPs:

- compiled: XLA's cost_analysis() of the per-device program. It counts a while loop's body once,
  and the Gemma and SigLIP layers are `nn.scan`s, so this is far below the real count.
- jaxpr matmuls: the dot_general / conv FLOPs of the traced step (forward, backward and remat
  recomputation), once with every scan body counted once (what the compiler's number should
  match) and once multiplied by the trip counts (the real count).
- compiled, trip-count corrected: compiled + (jaxpr full - jaxpr scans once) / devices.
- analytic: ki.model.flops (model FLOPs, no remat recomputation) x the global batch. With remat
  the corrected count exceeds it by about the recomputed forward (~1/3: backward = 2x forward).

Numbers are the compiler's plan for that chip, not a run: XLA's TPU runtime also keeps some HBM
for itself, so a plan within a few percent of the HBM is not a safe fit.
"""

import dataclasses
import importlib.metadata
import importlib.util
import math
import os
import time
from typing import Any

# Compiling for a topology needs no local TPU: keep the CPU as the default backend, so that a
# machine with libtpu installed but no TPU does not try to open one (set JAX_PLATFORMS to change).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from jax.extend import core as jax_core  # noqa: E402
import ml_collections  # noqa: E402

from ki.model import pi05  # noqa: E402
from ki.train import setup as setup_lib  # noqa: E402

GIB = 2**30
INSTALL_LINE = f'pip install "jax[tpu]=={jax.__version__}"'


@dataclasses.dataclass(frozen=True)
class Topology:
  """One TPU slice as Cloud TPU names it, and the arguments that describe it to libtpu.

  name: Cloud's accelerator type (v4 and v5p count TensorCores, 2 per chip; v5e and v6e count
    chips). shape: the chips' torus, libtpu's topology_name after the colon. hbm_gib: per chip,
    which is one JAX device (v4 and v5p as megacore).
  """

  name: str
  generation: str  # libtpu's name: v4, v5p, v5e, v6e
  shape: str
  chips_per_host_bounds: tuple[int, int, int]
  hbm_gib: float

  @property
  def topology_name(self) -> str:
    return f"{self.generation}:{self.shape}"

  @property
  def chip_config_name(self) -> str:
    # v4's default config exposes each TensorCore as a device; jobs run it as megacore (one
    # device per chip, as v5p's default already is).
    return "megacore" if self.generation == "v4" else "default"


def _slices(generation, hbm_gib, shapes, single_host_bounds=None):
  result = {}
  for name, shape in shapes.items():
    bounds = (single_host_bounds or {}).get(name, (2, 2, 1))
    result[f"{generation}-{name}"] = Topology(
      f"{generation}-{name}", generation, shape, bounds, hbm_gib
    )
  return result


# Shapes as Cloud TPU documents them; hosts hold 2x2x1 chips except single-host v5e/v6e slices.
# HBM per chip: v4 32 GiB, v5p 95 GiB, v5e 16 GiB, v6e 32 GiB.
_SMALL_HOSTS = {"1": (1, 1, 1), "4": (2, 2, 1), "8": (2, 4, 1)}
TOPOLOGIES: dict[str, Topology] = {
  **_slices("v4", 32, {"8": "2x2x1", "16": "2x2x2", "32": "2x2x4", "64": "2x4x4", "128": "4x4x4"}),
  **_slices("v5p", 95, {"8": "2x2x1", "16": "2x2x2", "32": "2x2x4", "64": "2x4x4", "128": "4x4x4"}),
  **_slices(
    "v5e",
    16,
    {"1": "1x1", "4": "2x2", "8": "2x4", "16": "4x4", "32": "4x8", "64": "8x8", "256": "16x16"},
    _SMALL_HOSTS,
  ),
  **_slices(
    "v6e",
    32,
    {"1": "1x1", "4": "2x2", "8": "2x4", "16": "4x4", "32": "4x8", "64": "8x8", "256": "16x16"},
    _SMALL_HOSTS,
  ),
}


def get_topology(name: str) -> Topology:
  if name not in TOPOLOGIES:
    raise ValueError(f"Unknown TPU topology {name!r}; known: {', '.join(TOPOLOGIES)}.")
  return TOPOLOGIES[name]


def libtpu_version() -> str | None:
  try:
    return importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return None


def topology_devices(topology: Topology) -> list:
  """The slice's abstract devices (every host's), from libtpu; no TPU needed."""
  if importlib.util.find_spec("libtpu") is None:
    raise RuntimeError(
      f"Compiling for {topology.name} needs the TPU compiler (libtpu), which is not installed. "
      f"Install it with: {INSTALL_LINE}"
    )
  # libtpu locks a file in the temp directory; without this a second process that loads it at
  # the same time (parallel tests, two checks) fails.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  description = topologies.get_topology_desc(
    platform="tpu",
    topology_name=topology.topology_name,
    chip_config_name=topology.chip_config_name,
    chips_per_host_bounds=topology.chips_per_host_bounds,
    num_slices=1,
  )
  return list(description.devices)


def with_batch(config: ml_collections.ConfigDict, per_device_batch: int | None, num_devices: int):
  """A copy of config whose global batch is per_device_batch x num_devices (unchanged if None)."""
  config = ml_collections.ConfigDict(config.to_dict())
  if per_device_batch is not None:
    config.batch_size = per_device_batch * num_devices
  config.lock()
  return config


# --- FLOPs of the traced program ---------------------------------------------------------------


def _dot_flops(eqn) -> float:
  """2 x every lhs element x the rhs dimensions that are neither contracted nor batch."""
  (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
  lhs, rhs = (v.aval.shape for v in eqn.invars)
  rhs_free = [d for i, d in enumerate(rhs) if i not in (*rhs_contract, *rhs_batch)]
  return 2.0 * math.prod(lhs) * math.prod(rhs_free)


def _conv_flops(eqn) -> float:
  """2 x every output element x the kernel's elements per output feature."""
  kernel = eqn.invars[1].aval.shape
  out_features = kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(kernel) / out_features


def _sub_jaxprs(value):
  if isinstance(value, jax_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax_core.Jaxpr):
    yield value
  elif isinstance(value, tuple | list):
    for item in value:
      yield from _sub_jaxprs(item)


def matmul_flops(jaxpr, *, trip_counts: bool = True) -> float:
  """FLOPs of every dot_general and convolution in `jaxpr` (global shapes, multiply-add = 2).

  trip_counts: multiply a scan's body by its length (False: count it once, as XLA's
  cost_analysis does). Branches of a cond count as the largest one.
  """
  if isinstance(jaxpr, jax_core.ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "cond":
      total += max(matmul_flops(b, trip_counts=trip_counts) for b in eqn.params["branches"])
    else:
      inner = sum(
        matmul_flops(j, trip_counts=trip_counts)
        for value in eqn.params.values()
        for j in _sub_jaxprs(value)
      )
      if name == "scan" and trip_counts:
        inner *= eqn.params["length"]
      total += inner
  return total


def _cost_flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):  # older jax: one dict per program
    cost = cost[0] if cost else None
  return None if not cost or "flops" not in cost else float(cost["flops"])


def analyse(
  setup: setup_lib.TrainSetup, *, hbm_gib: float | None = None, compiler_options=None
) -> dict[str, Any]:
  """Traces and compiles `setup`'s step for its (abstract) devices; memory and FLOPs per device.

  Works for any backend whose devices the mesh holds (the tests also use it on the CPU).
  """
  num_devices = setup.mesh.size
  traced = setup.step.trace(setup.abstract_state(), setup.abstract_batch())
  start = time.perf_counter()
  compiled = traced.lower().compile(compiler_options=compiler_options)
  compile_seconds = time.perf_counter() - start

  memory = compiled.memory_analysis()
  parts = {
    "arguments": memory.argument_size_in_bytes,
    "outputs": memory.output_size_in_bytes,
    "aliased": memory.alias_size_in_bytes,
    "temporaries": memory.temp_size_in_bytes,
    "generated_code": memory.generated_code_size_in_bytes,
  }
  total = (
    parts["arguments"]
    + parts["outputs"]
    - parts["aliased"]
    + parts["temporaries"]
    + parts["generated_code"]
  )
  memory_gib = {f"{k}_gib": v / GIB for k, v in parts.items()} | {"total_gib": total / GIB}

  jaxpr_full = matmul_flops(traced.jaxpr, trip_counts=True)
  jaxpr_once = matmul_flops(traced.jaxpr, trip_counts=False)
  compiled_raw = _cost_flops(compiled)
  per_example = pi05.training_flops_per_example(setup.model_config)
  flops = {
    "compiled_per_device": compiled_raw,
    "jaxpr_matmul_scans_once_per_device": jaxpr_once / num_devices,
    "jaxpr_matmul_per_device": jaxpr_full / num_devices,
    "compiled_corrected_per_device": (
      None if compiled_raw is None else compiled_raw + (jaxpr_full - jaxpr_once) / num_devices
    ),
    "analytic_per_device": per_example * setup.batch_size / num_devices,
    "analytic_per_example": per_example,
  }
  model = setup.model_config
  return {
    "num_devices": num_devices,
    "num_hosts": len({d.process_index for d in setup.mesh.devices.flat}),
    "device_kind": setup.mesh.devices.flat[0].device_kind,
    "mesh": dict(setup.mesh.shape),
    "global_batch": setup.batch_size,
    "per_device_batch": setup.batch_size // num_devices,
    "grad_accum_steps": setup.config.grad_accum_steps,
    "remat_policy": model.remat_policy,
    "token_weight": setup.config.loss.token_weight,
    "knowledge_insulation": model.knowledge_insulation,
    "action_horizon": model.action_horizon,
    "max_token_len": model.max_token_len,
    "cameras": len(model.image_keys),
    "compile_seconds": compile_seconds,
    "memory_per_device": memory_gib,
    "hbm_gib": hbm_gib,
    "fits": None if hbm_gib is None else total / GIB <= hbm_gib,
    "flops": flops,
  }


def check(
  config: ml_collections.ConfigDict, topology: str, *, per_device_batch: int | None = None
) -> dict[str, Any]:
  """Builds `config`'s step for the TPU slice `topology` and analyses its compiled program."""
  target = get_topology(topology)
  devices = topology_devices(target)
  setup = setup_lib.make_setup(with_batch(config, per_device_batch, len(devices)), devices=devices)
  report = analyse(setup, hbm_gib=target.hbm_gib)
  report["topology"] = target.name
  report["versions"] = {"jax": jax.__version__, "libtpu": libtpu_version()}
  return report


def format_report(report: dict[str, Any]) -> str:
  memory, flops = report["memory_per_device"], report["flops"]

  def tflop(value):
    if value is None:
      return "-"
    return f"{value / 1e12:.2f} TFLOP" if value >= 1e11 else f"{value / 1e9:.3f} GFLOP"

  def ratio(value, reference):
    return "-" if value is None or not reference else f"{value / reference:.3f}"

  compiled, corrected = flops["compiled_per_device"], flops["compiled_corrected_per_device"]
  once, full = flops["jaxpr_matmul_scans_once_per_device"], flops["jaxpr_matmul_per_device"]
  analytic = flops["analytic_per_device"]
  hbm = report["hbm_gib"]
  verdict = "-" if hbm is None else ("fits" if report["fits"] else "does NOT fit")
  lines = [
    f"{report.get('topology', report['device_kind'])}: {report['num_devices']} devices "
    f"({report['device_kind']}) on {report['num_hosts']} host(s), mesh {report['mesh']}",
    f"global batch {report['global_batch']} = {report['per_device_batch']} per device, "
    f"remat {report['remat_policy']}, token_weight {report['token_weight']}, "
    f"compiled in {report['compile_seconds']:.0f} s",
    "memory per device (GiB):",
    f"  arguments      {memory['arguments_gib']:8.2f}",
    f"  outputs        {memory['outputs_gib']:8.2f}",
    f"  aliased        {memory['aliased_gib']:8.2f}  (donated state, counted once)",
    f"  temporaries    {memory['temporaries_gib']:8.2f}",
    f"  generated code {memory['generated_code_gib']:8.2f}",
    f"  total          {memory['total_gib']:8.2f}  of {hbm if hbm is not None else '?'} HBM: "
    f"{verdict}",
    "FLOPs per device and step:",
    f"  compiled (XLA cost_analysis; scan bodies once)  {tflop(compiled)}",
    f"  jaxpr matmuls, scan bodies once                 {tflop(once)}"
    f"  (compiled / this = {ratio(compiled, once)})",
    f"  jaxpr matmuls, x trip counts                    {tflop(full)}",
    f"  compiled, trip-count corrected                  {tflop(corrected)}",
    f"  analytic model FLOPs (ki.model.flops)           {tflop(analytic)}"
    f"  (corrected / analytic = {ratio(corrected, analytic)};"
    " remat recomputes the forward: ~1.33 with it, ~1 without)",
  ]
  versions = report.get("versions")
  if versions:
    lines.append(f"jax {versions['jax']}, libtpu {versions['libtpu']}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    report = check(_CONFIG.value, _TOPOLOGY.value, per_device_batch=_PER_DEVICE_BATCH.value)
  except (ValueError, RuntimeError) as error:
    raise app.UsageError(str(error)) from error
  print(format_report(report))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  _CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file[:variant].", lock_config=True
  )
  _TOPOLOGY = flags.DEFINE_enum("topology", None, list(TOPOLOGIES), "TPU slice, e.g. v5p-8.")
  _PER_DEVICE_BATCH = flags.DEFINE_integer(
    "per_device_batch", None, "Examples per device per step (default: config.batch_size)."
  )
  flags.mark_flags_as_required(["config", "topology"])
  app.run(main)
