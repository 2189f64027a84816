"""Test setup: JAX on the CPU with 8 virtual devices, so sharding code runs as on a real mesh, the
tests' compiler settings (tests/xla_flags.py) and one persistent compilation cache for the run.

The flags must be set before jax is imported anywhere, which is why they live here.
"""

import os

import pytest

from tests import xla_flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " " + xla_flags.with_devices(8)
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow is only used for file I/O and TFDS; keep it off any accelerator and quiet.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# Programs that take longer than this to compile go into the persistent cache; the op-by-op
# programs of eager code are quicker and would only fill it.
MIN_CACHED_COMPILE_S = "0.5"


def pytest_configure(config):
  """One persistent XLA compilation cache for every process of the run, in pytest's cache folder:
  a program compiled by one xdist worker, or by a subprocess a test starts (the variables are
  inherited), is read back by the others instead of compiled again, and it survives between
  local runs. Entries are keyed by the program, the compile options and the XLA version, so a
  stale one is never used."""
  os.environ["JAX_COMPILATION_CACHE_DIR"] = str(config.cache.mkdir("ki_jax_compilation_cache"))
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = MIN_CACHED_COMPILE_S


@pytest.fixture(scope="session")
def compilation_cache() -> str:
  """The run's persistent compilation cache folder, for tests that pass it on explicitly."""
  return os.environ["JAX_COMPILATION_CACHE_DIR"]


def pytest_collection_modifyitems(items):
  """The tests marked slow (the ones that take tens of seconds: subprocess runs, end-to-end
  training) run first, the rest after them in their usual order. xdist's loadgroup hands out one
  test (or xdist group) at a time to whichever worker is free, so longest-first keeps both
  workers busy to the end instead of leaving one long test alone at the tail."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
