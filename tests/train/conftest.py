"""Trainer tests share one persistent XLA compilation cache, kept in pytest's cache folder
(.pytest_cache) so that it also survives between runs: the tiny model's train step compiles once
(~25-50 s on a 2-core CPU) and every later trainer, in this process or a subprocess, reuses it.
The cache is keyed by the compiled program and XLA version, so a stale entry is never used."""

import jax
import pytest


@pytest.fixture(scope="session")
def compilation_cache(request):
  path = str(request.config.cache.mkdir("ki_jax_compilation_cache"))
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  yield path
  jax.config.update("jax_compilation_cache_dir", None)
