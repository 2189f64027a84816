"""launch/slurm/train.sbatch run for real, on one machine, without SLURM: bash runs the script
(#SBATCH lines are comments to it) as sbatch would, a copy in a spool folder with the job's
SLURM_* variables, and a fake `srun` first on PATH starts its tasks as local processes with the
per-task variables real srun sets. ki.main finds SLURM itself, so the two tasks must form one
2-process JAX cluster (gloo CPU collectives, 2 devices each), train the smoke model on synthetic
DROID for two steps and save a checkpoint."""

import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

from tests import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SBATCH = os.path.join(REPO, "launch", "slurm", "train.sbatch")

# Stands in for srun inside a job allocation: one task per (node, local slot), every task with
# the variables jax's SLURM detection reads (jax/_src/clusters/slurm_cluster.py); waits for all
# and, like --kill-on-bad-exit, stops the others as soon as one fails. Each task's output goes to
# $FAKE_SRUN_LOGS/task_<rank>.log and then, labelled, to srun's stdout (the job's output file).
_FAKE_SRUN = r"""#!/bin/bash
set -u
echo "srun options: $*" >&2
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
IFS=, read -r -a nodes <<< "$SLURM_JOB_NODELIST"
per_node=$((SLURM_NTASKS / SLURM_NNODES))
pids=()
for ((rank = 0; rank < SLURM_NTASKS; rank++)); do
  node=$((rank / per_node))
  SLURM_STEP_ID=0 SLURM_PROCID=$rank SLURM_LOCALID=$((rank % per_node)) SLURM_NODEID=$node \
  SLURMD_NODENAME=${nodes[node]} SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST \
  SLURM_STEP_NUM_NODES=$SLURM_NNODES SLURM_STEP_NUM_TASKS=$SLURM_NTASKS \
  SLURM_STEP_TASKS_PER_NODE="$per_node(x$SLURM_NNODES)" \
    "$@" > "$FAKE_SRUN_LOGS/task_$rank.log" 2>&1 &
  pids+=($!)
done
status=0
for ((i = 0; i < ${#pids[@]}; i++)); do
  if ! wait -n; then
    status=1
    kill "${pids[@]}" 2> /dev/null
  fi
done
for ((rank = 0; rank < SLURM_NTASKS; rank++)); do
  sed "s/^/$rank: /" "$FAKE_SRUN_LOGS/task_$rank.log"
done
exit $status
"""


def _job_id_with_free_port():
  """A SLURM_JOB_ID whose coordinator port (jax: 61440 + job id % 4096) is free here."""
  for job_id in range(1000 + os.getpid() % 3000, 4096 + 1000 + os.getpid() % 3000):
    port = 61440 + job_id % 4096
    with socket.socket() as s:
      try:
        s.bind(("", port))
      except OSError:
        continue
    return job_id
  raise RuntimeError("no free port in 61440-65535")


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory):
  """Synthetic DROID for the smoke model, generated once by one process as a real multi-host run
  needs (ki.data.synthetic_cache refuses to generate it from several); small: ~10 s."""
  cache = tmp_path_factory.mktemp("ki_cache")
  code = (
    "import sys; from experiments import droid_ki; from ki.data import synthetic_cache; "
    "c = droid_ki.get_config('smoke'); c.unlock(); "
    "c.synthetic_data.update(dict(episodes=16, vlm_images=120)); synthetic_cache.ensure(c)"
  )
  env = xla_flags.subprocess_env(KI_CACHE=str(cache))
  result = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
  return cache


# Never beside the other multi-process test: four JAX processes with gloo on two cores can miss
# gloo's 30 s rendezvous deadline.
@pytest.mark.xdist_group("multiprocess")
@pytest.mark.multiprocess
@pytest.mark.slow
def test_sbatch_script_trains_two_processes_under_fake_slurm(
  tmp_path, synthetic_cache, compilation_cache
):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  srun = bin_dir / "srun"
  srun.write_text(_FAKE_SRUN)
  srun.chmod(0o755)
  # slurmd runs a copy of the batch script from its spool folder, not the submitted file.
  spool = tmp_path / "spool" / "job"
  spool.mkdir(parents=True)
  script = spool / "slurm_script"
  shutil.copy(SBATCH, script)
  logs = tmp_path / "logs"
  logs.mkdir()
  workdir = tmp_path / "work"

  job_id = _job_id_with_free_port()
  env = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("SLURM_", "XLA_FLAGS", "JAX_", "KI_REPO"))
  }
  env.update(
    {
      "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
      "FAKE_SRUN_LOGS": str(logs),
      # What sbatch sets in the batch script's environment (--nodes=2 --ntasks-per-node=1).
      "SLURM_JOB_ID": str(job_id),
      "SLURM_JOBID": str(job_id),
      "SLURM_JOB_NAME": "ki-train",
      "SLURM_JOB_NODELIST": "localhost,127.0.0.1",
      "SLURM_NODELIST": "localhost,127.0.0.1",
      "SLURM_NNODES": "2",
      "SLURM_JOB_NUM_NODES": "2",
      "SLURM_NTASKS": "2",
      "SLURM_NPROCS": "2",
      "SLURM_NTASKS_PER_NODE": "1",
      "SLURM_TASKS_PER_NODE": "1(x2)",
      "SLURM_NODEID": "0",
      "SLURM_PROCID": "0",
      "SLURM_LOCALID": "0",
      "SLURM_SUBMIT_DIR": REPO,
      "SLURM_SUBMIT_HOST": "localhost",
      "SLURMD_NODENAME": "localhost",
      # --gpus-per-node=2 (jax only logs which GPUs it would use: there are none here).
      "SLURM_GPUS_ON_NODE": "2",
      # This machine instead of GPUs: 2 CPU devices per process, collectives through gloo.
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": xla_flags.with_devices(2),
      "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "KI_CACHE": str(synthetic_cache),
    }
  )
  # The smoke experiment with tests/train/tiny.py's model widths (its vocabulary and token
  # lengths stay: they are the synthetic data's), so that compiling takes seconds.
  command = [
    "bash",
    str(script),
    "experiments/droid_ki.py:smoke",
    str(workdir),
    "--config.model.vlm_variant=tiny",
    "--config.model.expert_variant=tiny",
    "--config.model.image_size=32",
    "--config.batch_size=8",
    "--config.total_steps=2",
    "--config.log_every=1",
    "--config.checkpoint.every=2",
    "--config.eval.every=0",
    f"--config.compilation_cache_dir={compilation_cache}",
  ]
  # sbatch starts the script in the submission folder.
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-6000:]
  assert "srun options: --kill-on-bad-exit=1" in result.stderr
  tasks = [(logs / f"task_{rank}.log").read_text() for rank in range(2)]
  for rank, task in enumerate(tasks):
    assert re.search(rf"Process {rank} of 2, 2 local / 4 global devices", task), task[-4000:]
    # One task per node: each gets all of its node's GPUs, not just GPU SLURM_LOCALID.
    assert "JAX distributed initialized with visible devices: 0,1" in task, task[-4000:]
  assert "over 4 devices (2 hosts)" in tasks[0]
  step_dir = workdir / "checkpoints" / "2"
  assert (step_dir / "state").is_dir() and (step_dir / "params").is_dir()
  assert sorted(p.name for p in (step_dir / "data").iterdir() if p.suffix == ".json") == [
    "process_0-of-2.json",
    "process_1-of-2.json",
  ]
