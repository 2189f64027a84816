r"""Training entry point.

  python -m ki.main --config=experiments/droid_ki.py[:variant] --workdir=DIR [--config.a.b=value]

Multi-host: under SLURM (SLURM_* variables set by srun) jax.distributed finds the coordinator
itself; elsewhere pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I. Every
process runs this same command. Restarting with the same workdir resumes from its latest
checkpoint.
"""

import logging
import os

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard logs and assets.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0 (multi-host without SLURM).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def _initialize_distributed():
  explicit = [_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value]
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise app.UsageError("--coordinator_address, --num_processes and --process_id go together.")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    # JAX reads the coordinator, process count and id from SLURM's environment.
    jax.distributed.initialize()


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
  logging.info("Process %d of %d, %d local / %d global devices (%s).", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].device_kind)
  if config.synthetic_data.dir:
    from ki.train import demo_data  # pylint: disable=g-import-not-at-top
    demo_data.ensure(config)

  from ki.train.trainer import Trainer  # pylint: disable=g-import-not-at-top
  trainer = Trainer(config, _WORKDIR.value)
  trainer.run()
  trainer.close()


if __name__ == "__main__":
  app.run(main)
