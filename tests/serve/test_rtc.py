"""Real-time chunking through the Policy and the websocket server (tiny checkpoint, horizon 4).

The RTC program is compiled once (by the first test that sends RTC keys) and reused: the delay
and the previous chunk's length are traced values.
"""

import numpy as np
import pytest

from ki.data import droid, normalize
from ki.serve import observation as observation_lib
from ki.serve import server as server_lib
from tests.serve.test_server import MAX_MESSAGE_BYTES, OpenpiProtocolClient, small_observation

PREVIOUS = observation_lib.RTC_PREVIOUS_ACTIONS
EXECUTED = observation_lib.RTC_EXECUTED_STEPS
DELAY = observation_lib.RTC_INFERENCE_DELAY


@pytest.fixture(scope="module")
def server(policy):
  server = server_lib.PolicyServer(policy, port=0, max_message_bytes=MAX_MESSAGE_BYTES)
  server.start_in_thread()
  yield server
  server.stop()


@pytest.fixture
def client(server):
  client = OpenpiProtocolClient(server.port)
  yield client
  client.close()


def test_policy_freezes_the_delay_and_guides_in_model_space(policy):
  obs = small_observation()
  previous = policy.infer(obs)["actions"]
  state = droid.state_vector(
    obs[observation_lib.JOINT_POSITION], obs[observation_lib.GRIPPER_POSITION]
  )
  # The target is the previous chunk's remaining actions in the model's space: undoing the
  # server's output path (unnormalise, delta -> absolute) gives the raw actions back.
  remaining = previous[1:]
  chunk = policy._previous_chunk(remaining, 2, state)
  assert int(chunk.prefix_length[0]) == 3 and int(chunk.delay[0]) == 2
  model_rows = np.asarray(chunk.actions)[0, :3, : policy.action_dims]
  raw = droid.to_absolute_actions(
    normalize.quantile_unnormalize(model_rows, policy.norm_stats["actions"]),
    state,
    policy.delta_action_mask,
  )
  np.testing.assert_allclose(raw, remaining, rtol=1e-5, atol=1e-4)
  assert np.all(np.asarray(chunk.actions)[0, 3:] == 0)

  actions = policy.infer({**obs, PREVIOUS: previous, EXECUTED: 1, DELAY: 2})["actions"]
  assert actions.shape == previous.shape and actions.dtype == np.float32
  np.testing.assert_array_equal(actions[:2], previous[1:3])  # exactly, in raw units
  assert np.all(np.isfinite(actions))


def test_server_round_trip_with_and_without_rtc_keys(client):
  plain = client.infer(small_observation())["actions"]
  assert plain.shape == (4, 8)
  # The simplest client: the server remembers the chunk it sent on this connection.
  continued = client.infer({**small_observation(), EXECUTED: 1, DELAY: 2})["actions"]
  np.testing.assert_array_equal(continued[:2], plain[1:3])
  # A client that sends the chunk itself (here the one just received, 2 of its actions run).
  sent = client.infer({**small_observation(), PREVIOUS: continued, EXECUTED: 2, DELAY: 1})
  np.testing.assert_array_equal(sent["actions"][:1], continued[2:3])
  # Everything executed and no delay: nothing to continue, a plain chunk.
  assert client.infer({**small_observation(), EXECUTED: 4})["actions"].shape == (4, 8)
  assert client.infer(small_observation())["server_timing"]["prev_total_ms"] > 0


def test_bad_rtc_values_are_refused_and_the_server_keeps_serving(client):
  obs = small_observation()
  # executed_steps refers to the last chunk on this connection; there is none yet.
  with pytest.raises(RuntimeError, match="bad request: .*none was sent yet"):
    client.infer({**obs, EXECUTED: 0, DELAY: 1})
  chunk = client.infer(obs)["actions"]
  nan_chunk = chunk.copy()
  nan_chunk[1, 2] = np.nan
  bad = [
    ({PREVIOUS: nan_chunk}, "non-finite"),
    ({PREVIOUS: chunk[:, :7]}, r"shape \[K, 8\]"),
    ({PREVIOUS: np.concatenate([chunk, chunk])}, r"1 <= K <= 4"),
    ({PREVIOUS: chunk.astype(str)}, "real numpy array"),
    ({PREVIOUS: chunk.tolist()}, "real numpy array"),
    ({PREVIOUS: chunk, DELAY: 5}, r"inference_delay must be in \[0, 4\]"),
    ({PREVIOUS: chunk, EXECUTED: 3, DELAY: 2}, r"inference_delay must be in \[0, 1\]"),
    ({PREVIOUS: chunk, DELAY: -1}, "inference_delay must be in"),
    ({PREVIOUS: chunk, DELAY: 1.5}, "inference_delay must be an integer"),
    ({PREVIOUS: chunk, DELAY: True}, "inference_delay must be an integer"),
    ({EXECUTED: 5}, r"executed_steps must be in \[0, 4\]"),
    ({DELAY: 1}, "need a previous chunk"),
  ]
  for keys, message in bad:
    with pytest.raises(RuntimeError, match=f"bad request: .*{message}"):
      client.infer({**obs, **keys})
  # Still serving, and still remembering the last chunk it *sent* (errors do not replace it).
  actions = client.infer({**obs, EXECUTED: 2, DELAY: 2})["actions"]
  np.testing.assert_array_equal(actions[:2], chunk[2:4])
