"""jax.distributed with the timeouts that bound how long a multi-host job outlives a dead host.

When one host dies (SIGKILL, a kernel panic, a lost node), the others are blocked in a collective
of the train step or in a checkpoint barrier, and would wait there until the allocation runs out.
jax's coordination service is what ends that wait: every process sends it heartbeats, and when a
process misses them for `heartbeat_timeout_s` the service marks it dead and tells every other
process, which then terminates itself (SIGABRT, "Terminating process because the JAX distributed
service detected fatal errors"). A dead coordinator (process 0, which runs the service) is noticed
by the others at once: their open calls to the service fail, and the same line ends them, naming
it as jax does: "Failed to send RPC to coordination service. Either the leader task was
preempted/died/restarted unexpectedly ...". jax ends the process from C++ (abort), so ki cannot
add a line of its own at that moment; `initialize` logs at the start which process and address the
coordinator (jax's "leader task") is, so every host's log names it. So a survivor exits non-zero
within about heartbeat_timeout_s, and the scheduler can restart the job, which resumes from the
last committed checkpoint (tests/train/test_multihost.py kills each kind of process).

jax's default heartbeat timeout is 100 s; ki's is 60 s: a dead host costs every other host that
long, while heartbeats come from a background thread, so long compiles or checkpoint writes do
not miss them.
"""

import logging

import jax

HEARTBEAT_TIMEOUT_S = 60


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
) -> None:
  """jax.distributed.initialize with ki's heartbeat timeout. Arguments left None are found by
  jax's cluster detection (SLURM's environment, for one)."""
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
    heartbeat_timeout_seconds=heartbeat_timeout_s,
  )
  logging.info(
    'Process %d of %d. The coordinator (jax\'s "leader task") is process 0 at %s; a process '
    "silent for %d s is declared dead and every other one exits non-zero.",
    jax.process_index(),
    jax.process_count(),
    coordinator_address or "the address jax's cluster detection found",
    heartbeat_timeout_s,
  )
