r"""Training entry point.

  python -m ki.main --config=experiments/droid_ki.py[:variant] --workdir=DIR [--config.a.b=value]

Multi-host: under SLURM (SLURM_* variables set by srun) jax.distributed finds the coordinator
itself; on Vertex AI ki.main reads them from CLUSTER_SPEC (see `vertex_cluster`); elsewhere pass
--coordinator_address=HOST:PORT --num_processes=N --process_id=I. Every process runs this same
command. Restarting with the same workdir resumes from its latest checkpoint.
"""

import json
import logging
import os
import re

from absl import app, flags
import jax
from ml_collections import config_flags

from ki.train import distributed


def define_config_flag(flag_values: flags.FlagValues = flags.FLAGS):
  """The --config flag: an experiment file[:variant], its fields overridden by --config.a.b=value
  (every field can be: tests/test_experiments.py overrides each leaf through this flag)."""
  return config_flags.DEFINE_config_file(
    "config", None, "Experiment file[:variant].", flag_values=flag_values, lock_config=True
  )


_CONFIG = define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard logs and assets.")
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "HOST:PORT of process 0 (multi-host without SLURM)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
  "heartbeat_timeout_s",
  distributed.HEARTBEAT_TIMEOUT_S,
  "Multi-host: a host silent this long is declared dead and every other host exits non-zero "
  "(ki/train/distributed.py).",
)
flags.mark_flags_as_required(["config", "workdir"])


_WORKER_POOL = re.compile(r"workerpool(\d+)")


def vertex_cluster(cluster_spec: str) -> tuple[str, int, int]:
  """(coordinator_address, num_processes, process_id) of this replica, from the CLUSTER_SPEC
  JSON that Vertex AI sets on every replica of a custom job:

    {"cluster": {"workerpool0": ["host:port"], "workerpool1": ["host:port", ...]},
     "task": {"type": "workerpool1", "index": i, ...}, ...}

  Replicas of one worker pool all get the same command line, so this is where each process
  finds its index. Every replica of every pool is one JAX process, numbered in pool order
  (workerpool0 first, so its single replica, the primary, is process 0). The coordinator is
  workerpool0's first entry as Vertex gives it, host and port: that port (2222) is the one
  Vertex reserves on the primary for the training code, and ki runs nothing else on it.
  Raises ValueError naming what is missing or malformed.
  """
  try:
    spec = json.loads(cluster_spec)
  except json.JSONDecodeError as e:
    raise ValueError(f"CLUSTER_SPEC is not JSON ({e}): {cluster_spec!r}") from e
  if not isinstance(spec, dict):
    raise ValueError(f"CLUSTER_SPEC is not a JSON object: {cluster_spec!r}")
  cluster, task = spec.get("cluster"), spec.get("task")
  if not isinstance(cluster, dict) or not cluster:
    raise ValueError(f"CLUSTER_SPEC has no 'cluster' mapping of worker pools: {cluster_spec!r}")
  pools = {}
  for name, addresses in cluster.items():
    match = _WORKER_POOL.fullmatch(name)
    if not match:
      raise ValueError(f"CLUSTER_SPEC cluster entry {name!r} is not a workerpoolN pool")
    if (
      not isinstance(addresses, list)
      or not addresses
      or not all(isinstance(a, str) and a for a in addresses)
    ):
      raise ValueError(f"CLUSTER_SPEC {name} is not a non-empty list of addresses: {addresses!r}")
    pools[int(match.group(1))] = (name, addresses)
  if 0 not in pools:
    raise ValueError(f"CLUSTER_SPEC has no workerpool0 (the coordinator): {cluster_spec!r}")
  coordinator = pools[0][1][0]
  host, sep, port = coordinator.rpartition(":")
  if not sep or not host or not port.isdigit():
    raise ValueError(f"CLUSTER_SPEC workerpool0 address {coordinator!r} is not host:port")
  if not isinstance(task, dict):
    raise ValueError(
      f"CLUSTER_SPEC has no 'task' (this replica's pool and index): {cluster_spec!r}"
    )
  pool, index = task.get("type"), task.get("index")
  if not isinstance(pool, str) or pool not in cluster:
    raise ValueError(f"CLUSTER_SPEC task type {pool!r} is not one of the pools {sorted(cluster)}")
  if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(cluster[pool]):
    raise ValueError(
      f"CLUSTER_SPEC task index {index!r} is not a replica of {pool} (0..{len(cluster[pool]) - 1})"
    )
  process_id = index
  for number in sorted(pools):
    name, addresses = pools[number]
    if name == pool:
      break
    process_id += len(addresses)
  num_processes = sum(len(addresses) for _, addresses in pools.values())
  return coordinator, num_processes, process_id


def _initialize_distributed():
  """jax.distributed from explicit flags, else Vertex's CLUSTER_SPEC, else SLURM's variables;
  nothing for a single process."""
  explicit = [_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise app.UsageError("--coordinator_address, --num_processes and --process_id go together.")
    distributed.initialize(
      _COORDINATOR.value,
      _NUM_PROCESSES.value,
      _PROCESS_ID.value,
      heartbeat_timeout_s=_HEARTBEAT_TIMEOUT.value,
    )
  elif os.environ.get("CLUSTER_SPEC"):
    coordinator, num_processes, process_id = vertex_cluster(os.environ["CLUSTER_SPEC"])
    if num_processes > 1:  # Vertex sets CLUSTER_SPEC on single-replica jobs too
      distributed.initialize(
        coordinator, num_processes, process_id, heartbeat_timeout_s=_HEARTBEAT_TIMEOUT.value
      )
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    # JAX reads the coordinator, process count and id from SLURM's environment.
    distributed.initialize(heartbeat_timeout_s=_HEARTBEAT_TIMEOUT.value)


class _QuietOrbaxInfo(logging.Filter):
  """Orbax logs every file it renames at INFO; keep its warnings, drop that chatter."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietOrbaxInfo())
  config = _CONFIG.value
  _initialize_distributed()
  if config.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
  logging.info(
    "Process %d of %d, %d local / %d global devices (%s).",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices()[0].device_kind,
  )
  if config.synthetic_data.dir:
    from ki.data import synthetic_cache  # pylint: disable=g-import-not-at-top

    synthetic_cache.ensure(config)

  from ki.train.trainer import Trainer  # pylint: disable=g-import-not-at-top

  trainer = Trainer.from_config(config, _WORKDIR.value)
  trainer.run()
  trainer.close()


if __name__ == "__main__":
  app.run(main)
