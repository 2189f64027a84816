"""Subprocess entry for the SIGTERM and multi-host tests: trains the tiny model on FakeIterator.

  python -m tests.train.train_fake --workdir=DIR --total_steps=N [--num_processes=2
      --process_id=I --coordinator_port=P --devices_per_process=2]

Prints "LOSS <step> <loss> END" as each step's metrics are recorded, and at the end one line
"RESULT {json}" with {step: loss} of this run and the last checkpoint step.

Faults for tests/train/test_faults.py:
  --pause_commit_from_step=N: orbax's commit of checkpoints N and later (the rename of the fully
    written "<step>.orbax-checkpoint-tmp" folder) waits an hour after printing "COMMIT PAUSED
    <step>", so that a test can kill the process while that checkpoint is written, not committed;
  --max_file_bytes=B: RLIMIT_FSIZE of B bytes with SIGXFSZ ignored, so a write past B bytes fails
    with EFBIG ("File too large") as a full disk fails one with ENOSPC.
"""

import argparse
import asyncio
import json
import logging
import os
import resource
import signal
import sys

from tests import xla_flags


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


def _pause_commits(from_step: int):
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top

  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def paused_finalize(self):
    name = self._final_path.name
    if name.isdigit() and int(name) >= from_step:
      print(f"COMMIT PAUSED {name}", flush=True)
      await asyncio.sleep(3600)
    return await finalize(self)

  atomicity.AtomicRenameTemporaryPath.finalize = paused_finalize


def _printing_losses(trainer):
  record = trainer._record

  def printing_record(step, *args):
    record(step, *args)
    # Other threads log to stdout too: the markers make the line findable inside theirs.
    print(f"LOSS {step} {trainer.step_metrics[step]['loss']!r} END", flush=True)

  trainer._record = printing_record


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
  parser.add_argument("--heartbeat_timeout_s", type=int, default=60)
  parser.add_argument("--pause_commit_from_step", type=int, default=0)
  parser.add_argument("--max_file_bytes", type=int, default=0)
  args = parser.parse_args()
  if args.max_file_bytes:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (args.max_file_bytes, resource.RLIM_INFINITY))
  if args.pause_commit_from_step:
    _pause_commits(args.pause_commit_from_step)

  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = xla_flags.with_devices(args.devices_per_process)
  import jax  # pylint: disable=g-import-not-at-top

  if args.cache_dir:
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True)
  if args.num_processes > 1:
    # CPU collectives across processes go through gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from ki.train import distributed  # pylint: disable=g-import-not-at-top

    distributed.initialize(
      f"127.0.0.1:{args.coordinator_port}",
      args.num_processes,
      args.process_id,
      heartbeat_timeout_s=args.heartbeat_timeout_s,
    )

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
  _printing_losses(trainer)
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
