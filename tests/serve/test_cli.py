"""`python -m ki.serve` end to end: loads a workdir's latest checkpoint, compiles, serves plain and
real-time-chunking requests."""

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np

from ki.serve import observation as observation_lib
from tests.serve.client import OpenpiProtocolClient


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_healthy(port: int, process: subprocess.Popen, timeout: float) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if process.poll() is not None:
      raise AssertionError(f"the server exited with {process.returncode}:\n{process.stdout.read()}")
    try:
      with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
        if response.status == 200:
          return
    except (urllib.error.URLError, ConnectionError):
      time.sleep(0.5)
  raise AssertionError(f"the server did not answer /healthz within {timeout} s")


def test_serve_module_serves_a_workdir(checkpoint_workdir):
  port = _free_port()
  process = subprocess.Popen(
    [sys.executable, "-m", "ki.serve", f"--checkpoint={checkpoint_workdir}", f"--port={port}"],
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  try:
    _wait_healthy(port, process, timeout=240)
    client = OpenpiProtocolClient(port)
    assert client.metadata["step"] == 7
    request = observation_lib.fake_droid_observation()
    actions = client.infer(request)["actions"]
    assert actions.shape == (4, 8)
    # Real-time chunking through the CLI's server (its RTC program was compiled at start): the
    # client sends the chunk it is executing; the first `d` actions continue it exactly.
    rtc = {
      observation_lib.RTC_PREVIOUS_ACTIONS: actions,
      observation_lib.RTC_EXECUTED_STEPS: 1,
      observation_lib.RTC_INFERENCE_DELAY: 2,
    }
    continued = client.infer({**request, **rtc})["actions"]
    np.testing.assert_array_equal(continued[:2], actions[1:3])
    client.close()
  finally:
    process.terminate()
    returncode = process.wait(timeout=30)
  assert returncode == 0  # SIGTERM stops the server cleanly
