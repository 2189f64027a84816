"""A real two-process run: jax.distributed over localhost with gloo CPU collectives, 2 devices per
process, (data=2, fsdp=2) mesh; both processes train, checkpoint, and see the same losses."""

import json
import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_train_and_checkpoint(tmp_path, compilation_cache):
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  processes = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        "tests.train.train_fake",
        f"--workdir={tmp_path}",
        "--total_steps=2",
        "--num_processes=2",
        f"--process_id={i}",
        f"--coordinator_port={port}",
        "--devices_per_process=2",
        f"--cache_dir={compilation_cache}",
      ],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = []
  try:
    for process in processes:
      outputs.append(process.communicate(timeout=300)[0])
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
  for process, output in zip(processes, outputs):
    assert process.returncode == 0, output[-4000:]
  results = []
  for output in outputs:
    line = [s for s in output.splitlines() if s.startswith("RESULT ")][-1]
    results.append(json.loads(line[len("RESULT ") :]))
  assert "Mesh {'data': 2, 'fsdp': 2} over 4 devices (2 hosts)" in outputs[0]
  assert results[0]["losses"] == results[1]["losses"]
  assert sorted(results[0]["losses"]) == ["1", "2"]
  assert results[0]["latest_checkpoint"] == 2
  step_dir = tmp_path / "checkpoints" / "2"
  assert (step_dir / "state").is_dir() and (step_dir / "params").is_dir()
  # Each host saved its own data iterator state.
  assert sorted(p.name for p in (step_dir / "data").iterdir() if p.suffix == ".json") == [
    "process_0-of-2.json",
    "process_1-of-2.json",
  ]
