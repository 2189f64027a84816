"""Trainer tests share one persistent XLA compilation cache: the tiny model's train step compiles
once (~25 s on a 2-core CPU) and every later trainer, in this process or a subprocess, reuses it."""

import jax
import pytest


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("jax_cache"))
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  yield path
  jax.config.update("jax_compilation_cache_dir", None)
