"""Test setup: JAX on the CPU with 8 virtual devices, so sharding code runs as on a real mesh, and
the tests' compiler settings (tests/xla_flags.py).

The flags must be set before jax is imported anywhere, which is why they live here.
"""

import os

from tests import xla_flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " " + xla_flags.with_devices(8)
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow is only used for file I/O and TFDS; keep it off any accelerator and quiet.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
