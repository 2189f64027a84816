"""Subprocess entry for the SIGTERM and multi-host tests: trains the tiny model on FakeIterator.

  python -m tests.train.train_fake --workdir=DIR --total_steps=N [--num_processes=2
      --process_id=I --coordinator_port=P --devices_per_process=2]

Prints one line "RESULT {json}" with {step: loss} of this run and the last checkpoint step.
"""

import argparse
import json
import logging
import os
import sys


class _CountingMultihost:
  """jax.experimental.multihost_utils, with process_allgather calls counted."""

  def __init__(self, inner):
    self._inner = inner
    self.allgathers = 0

  def process_allgather(self, *args, **kwargs):
    self.allgathers += 1
    return self._inner.process_allgather(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self._inner, name)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--total_steps", type=int, required=True)
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--coordinator_port", type=int, default=0)
  parser.add_argument("--devices_per_process", type=int, default=8)
  parser.add_argument("--checkpoint_every", type=int, default=2)
  parser.add_argument("--cache_dir", default="")
  args = parser.parse_args()

  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices_per_process}"
  import jax  # pylint: disable=g-import-not-at-top

  if args.cache_dir:
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  if args.num_processes > 1:
    # CPU collectives across processes go through gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{args.coordinator_port}",
      num_processes=args.num_processes,
      process_id=args.process_id,
    )
  logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True)

  from tests.train import tiny  # pylint: disable=g-import-not-at-top

  config = tiny.tiny_train_config(
    **{
      "total_steps": args.total_steps,
      "checkpoint.every": args.checkpoint_every,
      "mesh": (("data", -1), ("fsdp", args.num_processes)),
    }
  )
  # Counts the trainer's own host collectives (the step loop must not need one per step).
  from ki.train import trainer as trainer_lib  # pylint: disable=g-import-not-at-top

  counter = _CountingMultihost(trainer_lib.multihost_utils)
  trainer_lib.multihost_utils = counter
  trainer = tiny.make_trainer(config, args.workdir)
  history = trainer.run()
  trainer.close()
  result = {
    "losses": {str(k): v["loss"] for k, v in history.items()},
    "start_step": trainer.start_step,
    "latest_checkpoint": trainer.checkpointer.latest_step(),
    "allgathers": counter.allgathers,
  }
  print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
