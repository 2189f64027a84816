"""The compiler settings every test process runs with, its own and the subprocesses it starts.

LLVM's optimisation level 0 for XLA's CPU backend: the tests' programs are tiny, so compiling them
costs far more than running them, and level 0 compiles the tiny train step ~2x faster (11 s vs 25 s
on the 2-core CI machine) for ~2.5x slower steps (28 ms vs 11 ms). The values are the same: the
smoke run's losses agree to every printed digit. Users' runs keep XLA's default.
"""

import os

FAST_COMPILE = "--xla_backend_optimization_level=0"


def with_devices(count: int) -> str:
  """XLA_FLAGS for a test process with `count` virtual CPU devices."""
  return f"{FAST_COMPILE} --xla_force_host_platform_device_count={count}"


def subprocess_env(*, fast_compile: bool = True, **overrides) -> dict[str, str]:
  """os.environ for a subprocess that runs JAX on the CPU with its own default device count (one);
  `overrides` are set on top.

  fast_compile: the tests' compiler settings; off (XLA's default, as users run) for a subprocess
    that trains long enough for the slower steps to cost more than the faster compile saves.
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE if fast_compile else "")
  env.update(overrides)
  return env
