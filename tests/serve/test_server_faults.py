"""Server faults on loopback: a client that disconnects mid-request, one that stalls in the middle
of a frame, one that floods, and SIGTERM with a request in flight. The policy is a stand-in that
takes a set time per request: these are the server's behaviours, whatever the model."""

import base64
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import websockets.exceptions
import websockets.sync.client

from ki import msgpack_numpy
from ki.serve import server as server_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_MESSAGE_BYTES = 20_000


class SlowPolicy:
  """Answers every request with zeros after `seconds`; counts the requests it finished."""

  metadata = {"name": "slow"}

  def __init__(self, seconds: float):
    self.seconds = seconds
    self.started = threading.Event()
    self.finished = 0

  def infer(self, obs):
    del obs
    self.started.set()
    time.sleep(self.seconds)
    self.finished += 1
    return {"actions": np.zeros((4, 8), np.float32)}


def _connect(port):
  ws = websockets.sync.client.connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None)
  assert msgpack_numpy.unpackb(ws.recv()) == {"name": "slow"}
  return ws


def _infer(ws, timeout=10.0):
  ws.send(msgpack_numpy.packb({"anything": 1}))
  reply = ws.recv(timeout=timeout)
  assert not isinstance(reply, str), reply
  return msgpack_numpy.unpackb(reply)


@pytest.fixture
def serving():
  servers = []

  def start(policy, **kwargs):
    server = server_lib.PolicyServer(
      policy, port=0, max_message_bytes=MAX_MESSAGE_BYTES, drain_timeout_s=1, **kwargs
    )
    server.start_in_thread()
    servers.append(server)
    return server

  yield start
  for server in servers:
    server.stop()


def test_client_disconnecting_mid_request_leaves_others_served(serving, caplog):
  policy = SlowPolicy(0.3)
  server = serving(policy)
  with caplog.at_level(logging.INFO):
    gone = _connect(server.port)
    gone.send(msgpack_numpy.packb({"anything": 1}))
    assert policy.started.wait(10)
    gone.close()  # before the reply
    with _connect(server.port) as other:
      for _ in range(2):
        assert _infer(other)["actions"].shape == (4, 8)
    # The reply to the gone client was dropped with a one-line note, not a handler traceback.
    deadline = time.time() + 10
    while "disconnected before its reply" not in caplog.text:
      assert time.time() < deadline, caplog.text
      time.sleep(0.05)
  assert policy.finished == 3
  errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
  assert not errors, [r.getMessage() for r in errors]


def _raw_websocket(port) -> socket.socket:
  """A websocket opened by hand on a plain socket, which will never answer a ping."""
  sock = socket.create_connection(("127.0.0.1", port), timeout=30)
  key = base64.b64encode(os.urandom(16)).decode()
  sock.sendall(
    (
      f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
  )
  response = b""
  while b"\r\n\r\n" not in response:
    response += sock.recv(4096)
  assert response.startswith(b"HTTP/1.1 101"), response
  return sock


def test_stalled_client_is_dropped_by_keepalive_and_others_served(serving):
  keepalive_s = 0.5
  server = serving(SlowPolicy(0.01), keepalive_s=keepalive_s)
  stalled = _raw_websocket(server.port)
  # A masked binary frame announcing 1000 payload bytes, of which 10 arrive; then nothing.
  stalled.sendall(bytes([0x82, 0x80 | 126]) + struct.pack("!H", 1000) + os.urandom(4 + 10))
  stalled_at = time.time()
  with _connect(server.port) as other:
    assert _infer(other)["actions"].shape == (4, 8)
  # The server pings, gets no pong, and drops the connection: the socket reaches end of file.
  while stalled.recv(4096):
    pass
  dropped_after = time.time() - stalled_at
  stalled.close()
  assert dropped_after < 10 * keepalive_s, dropped_after
  with _connect(server.port) as other:
    assert _infer(other)["actions"].shape == (4, 8)


def test_flooding_client_does_not_starve_others(serving):
  server = serving(SlowPolicy(0.01), keepalive_s=1.0)
  oversize = msgpack_numpy.packb({"pad": np.zeros(2 * MAX_MESSAGE_BYTES, np.uint8)})
  too_big = msgpack_numpy.packb({"pad": np.zeros(5 * MAX_MESSAGE_BYTES, np.uint8)})
  stop = threading.Event()
  closed_codes = []

  def flood():
    while not stop.is_set():
      flooder = _connect(server.port)
      try:
        for _ in range(20):  # never reads the bad-request replies
          flooder.send(oversize)
        flooder.send(too_big)  # over the hard limit: the server closes this connection
        flooder.recv(timeout=10)
        while True:
          flooder.recv(timeout=10)
      except websockets.exceptions.ConnectionClosedError as error:
        closed_codes.append(error.rcvd.code if error.rcvd else None)
      finally:
        flooder.close()

  flooders = [threading.Thread(target=flood) for _ in range(2)]
  for thread in flooders:
    thread.start()
  try:
    with _connect(server.port) as other:
      for _ in range(10):
        start = time.time()
        assert _infer(other)["actions"].shape == (4, 8)
        assert time.time() - start < 5
  finally:
    stop.set()
    for thread in flooders:
      thread.join(30)
  assert closed_codes and set(closed_codes) == {1009}, closed_codes  # message too big
  # Flooders that never read may never see the server's close frame either: the close handshake
  # times out with the keepalive instead of holding the shutdown for websockets' default 10 s.
  start = time.time()
  server.stop()
  assert time.time() - start < 5


_SERVE = r"""
import logging, sys, time
import numpy as np
from ki.serve import server as server_lib

class SlowPolicy:
  metadata = {"name": "slow"}
  def infer(self, obs):
    print("INFER START", flush=True)
    time.sleep(float(sys.argv[1]))
    return {"actions": np.ones((4, 8), np.float32)}

logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True)
server_lib.PolicyServer(SlowPolicy(), port=0).serve_forever()
print("EXITED CLEANLY", flush=True)
"""


@pytest.mark.timeout(120)
def test_sigterm_answers_the_request_in_flight_and_exits_cleanly():
  process = subprocess.Popen(
    [sys.executable, "-u", "-c", _SERVE, "1.0"],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  lines = []
  try:
    for line in process.stdout:
      lines.append(line)
      if match := re.search(r"Serving on ws://127.0.0.1:(\d+)", line):
        port = int(match.group(1))
        break
    else:
      raise AssertionError("".join(lines))
    with _connect(port) as client:
      client.send(msgpack_numpy.packb({"anything": 1}))
      for line in process.stdout:
        lines.append(line)
        if "INFER START" in line:
          break
      process.send_signal(signal.SIGTERM)  # mid-inference
      reply = client.recv(timeout=30)
      assert not isinstance(reply, str), reply
      np.testing.assert_array_equal(msgpack_numpy.unpackb(reply)["actions"], 1.0)
      # Then the connection closes with 1001 (going away).
      with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
        client.recv(timeout=30)
      assert closed.value.rcvd.code == 1001
    output, _ = process.communicate(timeout=30)
  finally:
    if process.poll() is None:
      process.kill()
  output = "".join(lines) + output
  assert process.returncode == 0, output
  assert "SIGTERM received: finishing 1 request(s) in flight" in output, output
  assert "EXITED CLEANLY" in output, output
