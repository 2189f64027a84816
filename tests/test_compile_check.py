"""ki.compile_check: the topology table, the FLOPs walk over the traced step, and the tiny model
compiled for a real TPU slice by libtpu (skipped when libtpu is not installed: it is the `tpu`
extra, not part of `test`)."""

import importlib.util
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ki import compile_check
from ki.model import pi05
from ki.train import setup as setup_lib
from tests.train.tiny import tiny_train_config

needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason=f"libtpu is not installed ({compile_check.INSTALL_LINE})",
)


def test_topology_table_matches_cloud_names():
  for name, topology in compile_check.TOPOLOGIES.items():
    generation, count = name.split("-")
    assert topology.generation == generation
    chips = math.prod(int(d) for d in topology.shape.split("x"))
    # v4 and v5p are named by TensorCores (2 per chip), v5e and v6e by chips.
    assert chips * (2 if generation in ("v4", "v5p") else 1) == int(count), name
    assert math.prod(topology.chips_per_host_bounds) <= max(chips, 1)


def test_unknown_topology_names_the_known_ones():
  with pytest.raises(ValueError, match="v5p-8"):
    compile_check.get_topology("v5p-7")


def test_missing_libtpu_says_how_to_install(monkeypatch):
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real_find_spec(name)
  )
  with pytest.raises(RuntimeError, match=r'pip install "jax\[tpu\]=='):
    compile_check.topology_devices(compile_check.get_topology("v5e-4"))


def test_matmul_flops_counts_scan_bodies_once_or_by_trip_count():
  def f(x, w, kernel):
    def body(carry, w_layer):
      return jnp.tanh(carry @ w_layer), None

    y, _ = jax.lax.scan(body, x, w)  # 3 x [4, 8] @ [8, 8]
    image = jax.lax.conv_general_dilated(
      y[None, :, :, None], kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )  # [1, 4, 8, 1] * [2, 2, 1, 5] -> [1, 3, 7, 5]
    return jnp.einsum("bij,bjk->bik", y[None], y.T[None]).sum() + image.sum()  # [1,4,8]@[1,8,4]

  args = (jnp.ones((4, 8)), jnp.ones((3, 8, 8)), jnp.ones((2, 2, 1, 5)))
  jaxpr = jax.make_jaxpr(f)(*args)
  layer, conv, einsum = 2 * 4 * 8 * 8, 2 * (3 * 7 * 5) * (2 * 2 * 1), 2 * 4 * 8 * 4
  assert compile_check.matmul_flops(jaxpr) == 3 * layer + conv + einsum
  assert compile_check.matmul_flops(jaxpr, trip_counts=False) == layer + conv + einsum
  # Under grad for both operands, the backward adds two matmuls per forward one.
  grad = jax.make_jaxpr(
    jax.grad(lambda x, w: jax.lax.scan(lambda c, wl: (c @ wl, None), x, w)[0].sum(), argnums=(0, 1))
  )(*args[:2])
  assert compile_check.matmul_flops(grad) == 3 * 3 * layer


@pytest.mark.slow
def test_tiny_step_flops_on_the_cpu():
  """The traced step's matmuls agree with the analytic count; XLA's count sees scans once."""
  config = compile_check.with_batch(tiny_train_config(), 2, 1)
  setup = setup_lib.make_setup(config, devices=jax.devices()[:1])
  # The CPU compiler without its expensive passes: same FLOPs, half the compile time.
  report = compile_check.analyse(
    setup,
    compiler_options={
      "xla_backend_optimization_level": 0,
      "xla_llvm_disable_expensive_passes": True,
    },
  )
  flops = report["flops"]
  analytic = pi05.training_flops_per_example(setup.model_config) * 2
  assert flops["analytic_per_device"] == analytic
  # ki.model.flops counts the big matmuls only; at the tiny size the small ones (time MLP, the
  # zero-padded action projections, SigLIP's head) add ~20%.
  assert 0.95 < flops["jaxpr_matmul_per_device"] / analytic < 1.3
  assert flops["jaxpr_matmul_scans_once_per_device"] < flops["jaxpr_matmul_per_device"]
  # XLA counts elementwise work too, and the scanned layers once.
  assert flops["compiled_per_device"] > flops["jaxpr_matmul_scans_once_per_device"]
  assert flops["compiled_per_device"] < flops["jaxpr_matmul_per_device"] * 1.5
  assert report["memory_per_device"]["total_gib"] > 0
  assert report["fits"] is None


@needs_libtpu
@pytest.mark.slow
def test_tiny_step_compiles_for_a_tpu_slice():
  report = compile_check.check(tiny_train_config(), "v5e-4", per_device_batch=2)
  assert report["topology"] == "v5e-4"
  assert report["num_devices"] == 4 and report["device_kind"] == "TPU v5 lite"
  assert report["global_batch"] == 8
  assert report["fits"] is True and report["hbm_gib"] == 16
  memory = report["memory_per_device"]
  assert 0 < memory["total_gib"] < 1
  # The state is donated: outputs alias the arguments.
  assert memory["aliased_gib"] > 0
  assert report["versions"]["libtpu"]
  flops = report["flops"]
  assert flops["compiled_corrected_per_device"] > flops["compiled_per_device"]
  assert np.isfinite(flops["compiled_per_device"])
  text = compile_check.format_report(report)
  assert "fits" in text and "libtpu" in text


@needs_libtpu
def test_pod_topology_spans_hosts():
  devices = compile_check.topology_devices(compile_check.get_topology("v5p-64"))
  assert len(devices) == 32
  assert len({d.process_index for d in devices}) == 8
  assert {d.device_kind for d in devices} == {"TPU v5"}
