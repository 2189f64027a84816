"""The websocket server, driven by a client that speaks openpi's protocol byte for byte
(tests/serve/client.py)."""

import urllib.error
import urllib.request

import numpy as np
import pytest
import websockets.exceptions
import websockets.sync.client

from ki import msgpack_numpy
from ki.serve import client as client_lib
from ki.serve import observation as observation_lib
from ki.serve import server as server_lib
from tests.serve.client import MAX_MESSAGE_BYTES, OpenpiProtocolClient, small_observation


def test_serves_actions_and_metadata(client):
  assert client.metadata["action_horizon"] == 4 and client.metadata["action_dim"] == 8
  for _ in range(2):
    result = client.infer(small_observation())
    assert result["actions"].shape == (4, 8) and result["actions"].dtype == np.float32
    assert np.all(np.isfinite(result["actions"]))
    assert result["server_timing"]["infer_ms"] > 0
  # openpi's server reports the previous round trip from the second request on.
  assert result["server_timing"]["prev_total_ms"] > 0


def _without(key):
  obs = small_observation()
  del obs[key]
  return obs


def _with(key, value):
  obs = small_observation()
  obs[key] = value
  return obs


BAD_REQUESTS = {
  "missing key": lambda: msgpack_numpy.packb(_without(observation_lib.JOINT_POSITION)),
  "wrong image dtype": lambda: msgpack_numpy.packb(
    _with(observation_lib.WRIST_IMAGE, np.zeros((48, 48, 3), np.float32))
  ),
  "wrong image shape": lambda: msgpack_numpy.packb(
    _with(observation_lib.EXTERIOR_IMAGE, np.zeros((48, 48, 4), np.uint8))
  ),
  "wrong state shape": lambda: msgpack_numpy.packb(
    _with(observation_lib.JOINT_POSITION, np.zeros((8,), np.float32))
  ),
  "wrong state dtype": lambda: msgpack_numpy.packb(
    _with(observation_lib.GRIPPER_POSITION, np.array([True]))
  ),
  "non-finite state": lambda: msgpack_numpy.packb(
    _with(observation_lib.JOINT_POSITION, np.array([0, 0, np.inf, 0, 0, 0, 0], np.float32))
  ),
  "oversized message": lambda: msgpack_numpy.packb(small_observation(side=260)),
  "not msgpack": lambda: b"\xc1\xc1 definitely not msgpack",
  "not a dict": lambda: msgpack_numpy.packb([1, 2, 3]),
  "text frame": lambda: "hello",
}
EXPECTED = {
  "missing key": "lacks",
  "wrong image dtype": "dtype uint8",
  "wrong image shape": "shape",
  "wrong state shape": "shape",
  "wrong state dtype": "real numbers",
  "non-finite state": "non-finite",
  "oversized message": "the limit is",
  "not msgpack": "not msgpack",
  "not a dict": "must be a dict",
  "text frame": "binary msgpack",
}


def test_every_bad_request_gets_an_error_and_the_connection_keeps_serving(client):
  good = small_observation()
  for name, make in BAD_REQUESTS.items():
    with pytest.raises(RuntimeError, match="bad request") as error:
      client.send_raw(make())
    assert EXPECTED[name] in str(error.value), (name, str(error.value))
    # Same connection, next request: served.
    assert client.infer(good)["actions"].shape == (4, 8), name


def test_message_over_the_hard_limit_closes_only_that_connection(server, client):
  huge = msgpack_numpy.packb(small_observation(side=600))
  assert len(huge) > server_lib.HARD_LIMIT_FACTOR * MAX_MESSAGE_BYTES
  with pytest.raises(client_lib.ServerUnreachableError) as error:
    client.send_raw(huge)
  assert isinstance(error.value.__cause__, websockets.exceptions.ConnectionClosedError)
  assert error.value.__cause__.rcvd.code == 1009  # message too big
  other = OpenpiProtocolClient(server.port)
  assert other.infer(small_observation())["actions"].shape == (4, 8)
  other.close()


def test_health_check(server):
  with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as response:
    assert response.status == 200
    assert response.read() == b"OK\n"


class _FailingPolicy:
  metadata = {"name": "failing"}

  def __init__(self):
    self.calls = 0

  def infer(self, obs):
    del obs
    self.calls += 1
    if self.calls == 1:
      raise ZeroDivisionError("boom")
    return {"actions": np.zeros((2, 8), np.float32)}


def test_internal_error_is_reported_and_serving_continues():
  policy = _FailingPolicy()
  server = server_lib.PolicyServer(policy, port=0)
  server.start_in_thread()
  try:
    client = OpenpiProtocolClient(server.port)
    assert client.metadata == {"name": "failing"}
    with pytest.raises(RuntimeError, match="internal error(.|\n)*ZeroDivisionError: boom"):
      client.infer({"anything": 1})
    assert client.infer({"anything": 1})["actions"].shape == (2, 8)
    client.close()
  finally:
    server.stop()


def test_binds_localhost_by_default(policy):
  assert server_lib.PolicyServer(policy).host == "127.0.0.1"


def test_real_openpi_client_when_installed(server):
  websocket_client_policy = pytest.importorskip("openpi_client.websocket_client_policy")
  client = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=server.port)
  assert client.infer(small_observation())["actions"].shape == (4, 8)
  with pytest.raises(RuntimeError, match="bad request"):
    client.infer(_without(observation_lib.PROMPT))
  assert client.infer(small_observation())["actions"].shape == (4, 8)
